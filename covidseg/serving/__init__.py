"""The HTTP server: the FastAPI app, its limits, and the page it serves (``web/``).

Owns turning uploads into answers over HTTP: reading an upload in memory within its limits, a
bounded worker pool, one line of JSON for every error, and the page. A new page or endpoint goes
here; how a model answers stays in :mod:`covidseg.inference`.

Imports from: core, inference.
"""
