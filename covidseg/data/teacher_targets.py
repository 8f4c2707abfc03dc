"""Soft targets for distillation: a teacher's infection probabilities per training image, on disk.

``python -m covidseg.distill`` writes them once (the teacher runs before training, not in every
step); ``data.teacher_targets`` hands them to the training set, where they are augmented together
with the masks. The file is an ``.npz`` read without pickle and checked like any outside file:
names must be text, probabilities uint8 (probability × 255) of the data's image size, sizes are
checked from the array headers before any array data is read, and every training image needs one.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidseg.core.errors import DataError
from covidseg.core.files import open_regular_file, printable
from covidseg.core.writing import write_atomic

FORMAT_VERSION = 1
# A file may hold targets for other classes too (the teacher ran on all three), but not many times
# the training set: that bounds what a file can make covidseg allocate.
MAX_ROWS_PER_IMAGE = 4
MAX_NAME_BYTES = 4 * 1024  # numpy stores 4 bytes per character
MAX_FILE_BYTES = 1 << 40  # the limit only keeps out what is not a file


def save_teacher_targets(path: Path, names: Sequence[str], probabilities: np.ndarray) -> None:
    """``probabilities`` (N, S, S) in [0, 1], one per name, stored as uint8."""
    quantised = np.rint(np.clip(probabilities, 0.0, 1.0) * 255).astype(np.uint8)
    archive = io.BytesIO()
    np.savez(archive, names=np.array(list(names), dtype=str), probabilities=quantised, version=np.array(FORMAT_VERSION))
    write_atomic(Path(path), archive.getvalue())


def _array_headers(path: str | Path, where: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in the archive, from the .npy headers alone (the first bytes of
    each member), so that a small file declaring a huge array is refused before its data is read."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as handle:
                    if np.lib.format.read_magic(handle) == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                headers[member.removesuffix(".npy")] = (shape, dtype)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{where} is not a readable .npz of teacher targets ({error})") from None
    missing_keys = {"names", "probabilities", "version"} - set(headers)
    if missing_keys:
        raise DataError(f"{where}: lacks {sorted(missing_keys)}; write it with python -m covidseg.distill")
    return headers


def load_teacher_targets(path: str | Path, names: Sequence[str], image_size: int) -> np.ndarray:
    """The targets of ``names``, in that order: (N, S, S) uint8; a ``DataError`` naming the file otherwise."""
    where = f"data.teacher_targets {printable(path)!r}"
    try:  # a FIFO or a device would block the zip reader below: only a regular file is read
        with open_regular_file(Path(path), MAX_FILE_BYTES, "a .npz of teacher targets", DataError):
            pass
    except OSError as error:
        raise DataError(f"{where} is not a readable .npz of teacher targets ({error.strerror or error})") from None
    headers = _array_headers(path, where)
    names_shape, names_dtype = headers["names"]
    if names_dtype.kind != "U" or len(names_shape) != 1 or names_dtype.itemsize > MAX_NAME_BYTES:
        raise DataError(f"{where}: 'names' is {names_dtype} of shape {names_shape}, expected a text list")
    if names_shape[0] > MAX_ROWS_PER_IMAGE * len(names):
        raise DataError(
            f"{where} holds {names_shape[0]} targets for {len(names)} training images: "
            f"more than {MAX_ROWS_PER_IMAGE} per image is refused (write it for the same data.root)"
        )
    expected_shape = (names_shape[0], image_size, image_size)
    shape, dtype = headers["probabilities"]
    if dtype != np.uint8 or shape != expected_shape:
        raise DataError(
            f"{where}: probabilities are {dtype} {shape}, expected uint8 {expected_shape} "
            "(data.image_size must match the teacher's)"
        )
    try:
        with np.load(path, allow_pickle=False) as stored:
            version, stored_names, probabilities = stored["version"], stored["names"], stored["probabilities"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{where} is not a readable .npz of teacher targets ({error})") from None
    if version.shape != () or version.item() != FORMAT_VERSION:
        raise DataError(f"{where}: format version {version.tolist()!r}, expected {FORMAT_VERSION}")
    rows = {str(name): row for row, name in enumerate(stored_names)}
    missing = [name for name in names if name not in rows]
    if missing:
        raise DataError(
            f"{where} has no target for {len(missing)} training image(s), e.g. {printable(missing[0])!r}: "
            "write it for the same data.root and data.classes"
        )
    return probabilities[[rows[name] for name in names]]
