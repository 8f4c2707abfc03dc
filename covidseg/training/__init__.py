"""Files to a checkpoint: building a Lightning run from its config and what happens around the loop.

Owns building the datamodule, module, callbacks, loggers, trainer and the model spec every
checkpoint carries (``build``), the checks of a training config (``settings``), resuming a run
(``resume``), checkpoints written whole (``checkpoint_io``) and covidseg's training callbacks, one
job to a module (``callbacks``). A new callback goes in ``callbacks``; a new network or loss in
:mod:`covidseg.models`. Train's test of its best checkpoint collects per image with
:mod:`covidseg.evaluation`'s collectors.

Imports from: core, data, models, inference, evaluation.
"""
