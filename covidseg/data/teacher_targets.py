"""Soft targets for distillation: a teacher's infection probabilities per training image, on disk.

``python -m covidseg.distill`` writes them once (the teacher runs before training, not in every
step); ``data.teacher_targets`` hands them to the training set, where they are augmented together
with the masks. The file is an ``.npz`` read without pickle and checked like any outside file:
names must be text, probabilities uint8 (probability × 255) of the data's image size, and every
training image needs one.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidseg.data.index import DataError, printable

FORMAT_VERSION = 1


def save_teacher_targets(path: Path, names: Sequence[str], probabilities: np.ndarray) -> None:
    """``probabilities`` (N, S, S) in [0, 1], one per name, stored as uint8."""
    quantised = np.rint(np.clip(probabilities, 0.0, 1.0) * 255).astype(np.uint8)
    np.savez(path, names=np.array(list(names), dtype=str), probabilities=quantised, version=np.array(FORMAT_VERSION))


def load_teacher_targets(path: str | Path, names: Sequence[str], image_size: int) -> np.ndarray:
    """The targets of ``names``, in that order: (N, S, S) uint8; a ``DataError`` naming the file otherwise."""
    where = f"data.teacher_targets {printable(path)!r}"
    try:
        with np.load(path, allow_pickle=False) as stored:
            missing_keys = {"names", "probabilities", "version"} - set(stored.files)
            if missing_keys:
                raise DataError(f"{where}: lacks {sorted(missing_keys)}; write it with python -m covidseg.distill")
            version, stored_names, probabilities = stored["version"], stored["names"], stored["probabilities"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{where} is not a readable .npz of teacher targets ({error})") from None
    if version.shape != () or version.item() != FORMAT_VERSION:
        raise DataError(f"{where}: format version {version.tolist()!r}, expected {FORMAT_VERSION}")
    if stored_names.dtype.kind != "U" or stored_names.ndim != 1:
        raise DataError(f"{where}: 'names' is {stored_names.dtype} of shape {stored_names.shape}, expected a text list")
    expected_shape = (len(stored_names), image_size, image_size)
    if probabilities.dtype != np.uint8 or probabilities.shape != expected_shape:
        raise DataError(
            f"{where}: probabilities are {probabilities.dtype} {probabilities.shape}, expected uint8 {expected_shape} "
            "(data.image_size must match the teacher's)"
        )
    rows = {str(name): row for row, name in enumerate(stored_names)}
    missing = [name for name in names if name not in rows]
    if missing:
        raise DataError(
            f"{where} has no target for {len(missing)} training image(s), e.g. {printable(missing[0])!r}: "
            "write it for the same data.root and data.classes"
        )
    return probabilities[[rows[name] for name in names]]
