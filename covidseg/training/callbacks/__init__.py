"""covidseg's training callbacks, one job to a module; the rest come from Lightning. The configs'
``_target_``s name them from here (``covidseg.training.callbacks.<Name>``)."""

from covidseg.training.callbacks.checkpoints import EmbedModelSpec, EpochEndCheckpoint, RecordRunStart, SaveOnInterrupt
from covidseg.training.callbacks.progress import EpochLines, progress_display
from covidseg.training.callbacks.resizing import ProgressiveResizing
from covidseg.training.callbacks.tensorboard import ValidationCharts, ValidationImageLogger
from covidseg.training.callbacks.time_budget import TimeBudget

__all__ = [
    "EmbedModelSpec",
    "EpochEndCheckpoint",
    "EpochLines",
    "ProgressiveResizing",
    "RecordRunStart",
    "SaveOnInterrupt",
    "TimeBudget",
    "ValidationCharts",
    "ValidationImageLogger",
    "progress_display",
]
