"""covidseg: segment COVID-19 infection in chest X-rays with Lightning + Hydra.

Two paths meet only at the checkpoint: files -> ``data`` -> ``models`` -> ``training`` -> a
checkpoint, and a checkpoint -> ``inference`` -> ``evaluation`` / ``serving`` / the commands. The
modules at this level are the commands users type (``python -m covidseg.<command>`` and the
installed ``covidseg-<command>`` scripts): each reads its config, calls the machinery in the
folders below and reports. ``core`` is the ground floor every path reads through; ``reports``
turns what runs leave into pages and figures; ``benchmarks`` times the commands.

Commands import from: core, data, models, inference, training, evaluation, serving, reports.
"""

__version__ = "0.1.0"
