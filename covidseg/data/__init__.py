"""Files to batches: the training path's data.

Owns finding the COVID-QU-Ex Train/Val/Test files and pairing images with masks (``index``),
decoding them once into arrays behind a self-checking cache (``decode``), tensors and augmentation
(``dataset``), the datamodule with its splits, folds and samplers (``datamodule``), the synthetic
phantoms (``synthetic``), a teacher's probabilities for distillation (``teacher_targets``) and the
checks of the ``data.*`` settings (``settings``). It knows nothing of networks or models.

Imports from: core.
"""

from covidseg.data.datamodule import CovidQuExDataModule
from covidseg.data.synthetic import SyntheticPhantoms

__all__ = ["CovidQuExDataModule", "SyntheticPhantoms"]
