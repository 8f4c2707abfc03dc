"""Image files in, masks and overlays out: what ``predict`` reads and writes, apart from the model.

Inputs are a file, a folder (searched without following folder links, so a loop cannot be
followed) or a glob, each file once by its real path. Outputs land at ``<output>/<input relative
to its base>.<kind>.png`` beside ``predictions.csv``; predict never writes into a folder of inputs
it searched (unless told to), never replaces a file it did not write (a folder it wrote into holds
``.covidseg-predict``), never overwrites an input, and writes each file whole
(:mod:`covidseg.core.writing`).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from covidseg.core.errors import DataError
from covidseg.core.files import printable
from covidseg.core.writing import write_atomic
from covidseg.inference.segment import ImageResult

OUTPUT_MARKER = ".covidseg-predict"  # in a folder predict wrote into: a later run may replace those files
OUTPUT_KINDS = ("mask", "lung", "overlay", "probability")  # <file>.<kind>.png


def real(path: Path) -> Path:
    """``path`` with its links and ".." followed, as far as they go (a link loop stays as it is)."""
    return Path(os.path.realpath(path))


def _present(path: Path) -> bool:
    """A file or link of that name is there (a name the file system cannot hold is not)."""
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return False


def output_stem(output: Path, path: Path, base: Path) -> Path:
    """``<output>/<path relative to base>``, suffix kept, so ``x.png`` and ``x.jpg`` stay apart."""
    return output / path.relative_to(base)


def check_output(output: Path, files: list[Path], base: Path, recursive: bool, allow_inside: bool) -> None:
    """The output is a folder; unless ``allow_output_in_input``, no output lands in a folder that holds
    an input file, nor anywhere below a folder searched recursively (a later run would read it back).
    Inputs themselves are never overwritten (see :func:`write_outputs`)."""
    if output.exists() and not output.is_dir():
        raise DataError(f"output {printable(output)!r} is an existing file; expected a folder (new or existing)")
    if allow_inside:
        return
    if recursive and real(output).is_relative_to(real(base)):
        raise DataError(
            f"output {printable(output)!r} is inside the input folder {printable(base)!r}; choose another output "
            "or set allow_output_in_input=true"
        )
    input_folders = {folder for path in files for folder in (real(path.parent), real(path).parent)}
    for path in files:
        folder = real(output_stem(output, path, base).parent)
        if folder in input_folders:
            raise DataError(
                f"output {printable(output)!r} would write into {printable(folder)!r}, which holds input files; "
                "choose another output or set allow_output_in_input=true"
            )


def check_nothing_replaced(output: Path, files: list[Path], base: Path) -> None:
    """A folder predict has not written into holds none of the files it would write: predict
    replaces only its own outputs (a folder it wrote into carries :data:`OUTPUT_MARKER`)."""
    if not output.is_dir() or (output / OUTPUT_MARKER).is_file():
        return
    stems = [output_stem(output, path, base) for path in files]
    names = [output / "predictions.csv"] + [
        stem.with_name(f"{stem.name}.{kind}.png") for stem in stems for kind in OUTPUT_KINDS
    ]
    taken = next((name for name in names if _present(name)), None)
    if taken is not None:
        raise DataError(
            f"output {printable(output)!r} already holds {printable(taken.relative_to(output))!r}, which predict "
            "did not write: choose another output (predict never replaces a file it did not write)"
        )


def write_png(path: Path, array: np.ndarray) -> None:
    """Encode in memory, then write whole or not at all (:func:`covidseg.core.writing.write_atomic`),
    to reach the disk with the batch's flush."""
    encoded, data = cv2.imencode(".png", array)
    if not encoded:
        raise OSError(f"could not encode {printable(path)!r} as PNG")
    write_atomic(path, data.tobytes(), durable=False)


def write_outputs(result: ImageResult, stem: Path, save_probability: bool, inputs: set[Path]) -> None:
    """Write ``<stem>.mask.png``, ``.overlay.png`` (and ``.lung.png``, ``.probability.png``), each
    through a temporary file, so a failed write leaves no half or stale-looking output. They reach
    the disk with the batch's :func:`covidseg.core.writing.flush_to_disk`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = {"mask": result.mask.astype(np.uint8) * 255}
    if result.lung is not None:
        files["lung"] = result.lung.astype(np.uint8) * 255
    files["overlay"] = cv2.cvtColor(result.overlay(), cv2.COLOR_RGB2BGR)
    if save_probability:
        files["probability"] = (result.probability * 255).round().astype(np.uint8)
    for suffix, array in files.items():
        target = stem.with_name(f"{stem.name}.{suffix}.png")
        if Path(os.path.realpath(target)) in inputs:
            raise DataError(f"refusing to overwrite the input {printable(target)!r}")
        write_png(target, array)
