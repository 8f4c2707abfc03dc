"""A model scored on a labelled split: what eval, calibrate and distill share.

Owns running a loaded model over ``data.split`` in Lightning's test loop (``test_loop``), what that
loop collects per image, Dice, IoU, areas, presence and severity (``collectors``), and the sweep
and scoring that choose the thresholds on Val (``thresholds``).

Imports from: core, data, models, inference.
"""
