"""A model scored on a labelled split: what eval, calibrate and distill share.

Owns running a loaded model over ``data.split`` in Lightning's test loop (``test_loop``), what that
loop collects per image, Dice, IoU, areas, presence and severity (``collectors``), and the sweep
and scoring that choose the thresholds on Val (``thresholds``), the 95 % intervals of eval's
figures (``intervals``) and the paired comparison of models on the same images (``comparison``).

Imports from: core, data, models, inference.
"""
