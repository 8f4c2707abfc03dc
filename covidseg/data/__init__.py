"""Data: file index, decoding cache, dataset, datamodule and synthetic phantoms."""

from covidseg.data.datamodule import CovidQuExDataModule
from covidseg.data.index import CLASSES, SPLITS, DataError
from covidseg.data.synthetic import SyntheticPhantoms

__all__ = ["CLASSES", "SPLITS", "CovidQuExDataModule", "DataError", "SyntheticPhantoms"]
