"""Segment any X-ray: masks, overlays and a CSV of infected areas.

python -m covidseg.predict ckpt_path=<ckpt|pretrained|list|k-fold folder|model.onnx> \
    input=<file|folder|glob> output=<dir>
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig
from pydantic import Field, field_validator
from rich.console import Console
from rich.progress import track

from covidseg.core.config import CONF_DIR
from covidseg.core.errors import DataError, hydra_errors_in_one_line, user_errors
from covidseg.core.files import printable
from covidseg.core.images import IMAGE_SUFFIXES, read_unchanged, xray_gray
from covidseg.core.run_files import make_output_folder, write_run_info
from covidseg.core.validation import CheckedSettings, check_command_keys
from covidseg.core.writing import exclusive_lock, write_atomic, write_csv
from covidseg.inference.loader import allow_missing_folds, inference_bf16, inference_overrides
from covidseg.inference.segment import ImageResult, LoadedBackend, load_backend, segment

log = logging.getLogger(__name__)
SOME_IMAGES_FAILED = 3  # exit code: the run finished, but some images could not be read or written
OUTPUT_MARKER = ".covidseg-predict"  # in a folder predict wrote into: a later run may replace those files
OUTPUT_KINDS = ("mask", "lung", "overlay", "probability")  # <file>.<kind>.png


class PredictSettings(CheckedSettings):
    """``predict``'s own keys (its inference keys are checked with the model file's)."""

    input: Any
    output: Any
    batch_size: int = Field(ge=1)
    save_probability: bool
    allow_output_in_input: bool

    @field_validator("input", "output")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if value is None or not str(value).strip():  # an unset variable in a script, most likely
            raise ValueError("expected a path; an empty value would mean the current folder")
        return value


def _walk(folder: Path) -> list[Path]:
    """Image files below ``folder``; symlinked folders are not entered, so a loop cannot be followed."""
    files = []
    for root, folders, names in os.walk(folder, followlinks=False):
        folders.sort()
        files += [Path(root, name) for name in sorted(names) if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return files


def _first_magic_part(path: Path) -> int:
    return next((index for index, part in enumerate(path.parts) if glob.has_magic(part)), len(path.parts))


def find_inputs(pattern: str) -> tuple[list[Path], Path]:
    """Image files named by a file, a folder (searched recursively) or a glob, and their common base.

    Each file is listed once (by its real path), and symlinked folders are not followed (pathlib's
    ``**`` does not follow them either).
    """
    path = Path(pattern).expanduser()
    if path.is_file():
        candidates, base = [path], path.parent
    elif path.is_dir():
        candidates, base = _walk(path), path
    else:
        magic = _first_magic_part(path)
        base = Path(*path.parts[:magic]) if magic else Path()
        rest = Path(*path.parts[magic:]) if magic < len(path.parts) else None
        candidates = sorted(p for p in base.glob(str(rest)) if p.is_file()) if rest and base.is_dir() else []
    chosen: dict[str, Path] = {}  # real path -> the name it is predicted under (a link only if no other)
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if real not in chosen or (chosen[real].is_symlink() and not candidate.is_symlink()):
            chosen[real] = candidate
    files = [candidate for candidate in candidates if chosen[os.path.realpath(candidate)] is candidate]
    if not files:
        raise DataError(f"input {printable(pattern)!r} names no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files, base


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
    if recursive and output.resolve().is_relative_to(base.resolve()):
        raise DataError(
            f"output {printable(output)!r} is inside the input folder {printable(base)!r}; choose another output "
            "or set allow_output_in_input=true"
        )
    input_folders = {
        folder for path in files for folder in (path.parent.resolve(), Path(os.path.realpath(path)).parent)
    }
    for path in files:
        folder = output_stem(output, path, base).parent.resolve()
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
    taken = next((name for name in names if name.exists() or name.is_symlink()), None)
    if taken is not None:
        raise DataError(
            f"output {printable(output)!r} already holds {printable(taken.relative_to(output))!r}, which predict "
            "did not write: choose another output (predict never replaces a file it did not write)"
        )


@dataclass
class PredictRun:
    """What ``predict`` did: the CSV, the rows written, and the images it could not read or write."""

    csv_path: Path
    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable inputs
    failed: list[tuple[Path, str]] = field(default_factory=list)  # outputs that could not be written


def predict(cfg: DictConfig) -> PredictRun:
    """Write mask, overlay (and optional probability) PNGs per image and ``predictions.csv``."""
    check_command_keys(cfg, PredictSettings)
    files, base = find_inputs(str(cfg.input))
    # the folder the path names once its links and ".." are followed: "<new>/../<yours>" is yours
    output = Path(os.path.realpath(Path(str(cfg.output)).expanduser()))
    recursive = Path(str(cfg.input)).expanduser().is_dir() or "**" in str(cfg.input)
    check_output(output, files, base, recursive, cfg.allow_output_in_input)
    check_nothing_replaced(output, files, base)
    run_folder = Path(cfg.paths.output_dir)  # covidseg's own: a graph exported for backend=onnx goes there
    model = load_backend(
        cfg.ckpt_path,
        cfg.paths.log_dir,
        cfg.backend,
        inference_overrides(cfg),
        inference_bf16(cfg),
        run_folder,
        allow_missing_folds(cfg),
    )
    make_output_folder(output)
    with exclusive_lock(output) as locked:  # one predict at a time writes into a folder
        if not locked:
            raise DataError(
                f"output {printable(output)!r} is being written by another predict right now: wait for it to "
                "finish or choose another output"
            )
        check_nothing_replaced(output, files, base)  # again, now that no other predict can write here
        (output / OUTPUT_MARKER).touch()
        return _predict_into(cfg, model, files, base, output)


def _predict_into(cfg: DictConfig, model: LoadedBackend, files: list[Path], base: Path, output: Path) -> PredictRun:
    inputs = {Path(os.path.realpath(path)) for path in files}
    run = PredictRun(output / "predictions.csv")
    batches = [files[start : start + cfg.batch_size] for start in range(0, len(files), cfg.batch_size)]
    for batch in track(batches, description="predicting", console=Console(stderr=True)):
        started = time.perf_counter()
        images, readable = [], []
        for path in batch:
            try:
                images.append(xray_gray(read_unchanged(path), str(path)))
                readable.append(path)
            except (DataError, OSError) as error:
                run.skipped.append((path, str(error)))
        if not images:
            continue
        results = segment(model.run, model.spec, images)
        seconds = (time.perf_counter() - started) / len(images)
        for path, result in zip(readable, results, strict=True):
            try:
                write_outputs(result, output_stem(output, path, base), cfg.save_probability, inputs)
            except (DataError, OSError) as error:
                run.failed.append((path, str(error)))
                continue
            row = {"file": printable(path), **result.stats(), **(result.severity() or {})}
            run.rows.append(row | {"seconds": round(seconds, 4)})
    header = list(run.rows[0]) if run.rows else ["file"]
    write_csv(run.csv_path, header, ([row[key] for key in header] for row in run.rows))
    for label, problems in (("skipped (unreadable)", run.skipped), ("failed (not written)", run.failed)):
        for path, reason in problems:
            log.warning("%s %s: %s", label, printable(path), reason)
    Console().print(
        f"{len(run.rows)} image(s) predicted, {len(run.skipped)} skipped, {len(run.failed)} failed; "
        f"results in {printable(output)}",
        markup=False,
        highlight=False,
    )
    return run


def write_png(path: Path, array: np.ndarray) -> None:
    """Encode in memory, then write whole or not at all (:func:`covidseg.core.writing.write_atomic`)."""
    encoded, data = cv2.imencode(".png", array)
    if not encoded:
        raise OSError(f"could not encode {printable(path)!r} as PNG")
    write_atomic(path, data.tobytes())


def write_outputs(result: ImageResult, stem: Path, save_probability: bool, inputs: set[Path]) -> None:
    """Write ``<stem>.mask.png``, ``.overlay.png`` (and ``.lung.png``, ``.probability.png``), each
    through a temporary file, so a failed write leaves no half or stale-looking output."""
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


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        write_run_info(cfg.paths.output_dir)
        run = predict(cfg)
    if run.skipped or run.failed:
        sys.exit(SOME_IMAGES_FAILED)


if __name__ == "__main__":
    main()
