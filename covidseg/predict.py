"""Segment any X-ray: masks, overlays and a CSV of infected areas.

python -m covidseg.predict ckpt_path=<ckpt|pretrained|pretrained:lung_infection|list|k-fold folder|model.onnx> \
    input=<file|folder|glob> output=<dir>

The files it reads and writes, and the rules that keep the user's files safe, are
:mod:`covidseg.inference.image_files`; the model's answer is :mod:`covidseg.inference.segment`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from pydantic import Field, field_validator
from rich.console import Console
from rich.progress import track

from covidseg.core.config import CONF_DIR, check_output_folder
from covidseg.core.errors import DataError, hydra_errors_in_one_line, user_errors
from covidseg.core.files import printable
from covidseg.core.images import find_inputs, read_unchanged, xray_gray
from covidseg.core.run_files import make_output_folder, write_run_info
from covidseg.core.validation import CheckedSettings, check_command_keys
from covidseg.core.writing import exclusive_lock, write_csv
from covidseg.inference.image_files import (
    check_nothing_replaced,
    check_output,
    output_stem,
    write_outputs,
)
from covidseg.inference.loader import inference_bf16
from covidseg.inference.manifest import Manifest, run_digest
from covidseg.inference.predictor import Answer
from covidseg.inference.segment import Backend, LoadedBackend, load_configured_backend, segment

log = logging.getLogger(__name__)
SOME_IMAGES_FAILED = 3  # exit code: the run finished, but some images were not read, answered or written


class PredictSettings(CheckedSettings):
    """``predict``'s own keys (its inference keys are checked with the model file's)."""

    input: Any
    output: Any
    batch_size: int = Field(ge=1)
    save_probability: bool
    allow_output_in_input: bool
    resume: bool
    xray_check: bool

    @field_validator("input", "output")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if value is None or not str(value).strip():  # an unset variable in a script, most likely
            raise ValueError("expected a path; an empty value would mean the current folder")
        return value


@dataclass
class PredictRun:
    """What ``predict`` did: the CSV, the rows written, and the images it could not read or write."""

    csv_path: Path
    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable inputs
    failed: list[tuple[Path, str]] = field(default_factory=list)  # outputs that could not be written
    refused: list[tuple[Path, str]] = field(default_factory=list)  # pictures unlike the model's X-rays
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to ``stage_seconds[name]`` (``predict_bench`` prints the shares)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] += time.perf_counter() - started

    def timed(self, name: str, backend: Backend) -> Backend:
        def run(images: np.ndarray) -> Answer:
            with self.stage(name):
                return backend(images)

        return run


STAGES = ("read and decode", "networks", "resize and post-process", "draw, encode and write", "CSV")


def predict(cfg: DictConfig) -> PredictRun:
    """Write mask, overlay (and optional probability) PNGs per image and ``predictions.csv``."""
    check_command_keys(cfg, PredictSettings)
    files, base = find_inputs(str(cfg.input))
    # the folder the path names once its links and ".." are followed: "<new>/../<yours>" is yours
    output = Path(os.path.realpath(Path(str(cfg.output)).expanduser()))
    recursive = Path(str(cfg.input)).expanduser().is_dir() or "**" in str(cfg.input)
    check_output(output, files, base, recursive, cfg.allow_output_in_input)
    check_nothing_replaced(output, files, base)
    model = load_configured_backend(cfg)
    make_output_folder(output)
    with exclusive_lock(output) as locked:  # one predict at a time writes into a folder
        if not locked:
            raise DataError(
                f"output {printable(output)!r} is being written by another covidseg command right now: wait for "
                "it to finish or choose another output"
            )
        check_nothing_replaced(output, files, base)  # again, now that no other predict can write here
        settings = {"spec": model.spec.to_plain(), "backend": cfg.backend, "bf16": inference_bf16(cfg),
                    "refuse_above": model.refuse_above, "save_probability": cfg.save_probability}  # fmt: skip
        if model.int8_graph is not None:  # its name digests the calibration images too
            settings["int8_graph"] = model.int8_graph.name
        manifest = Manifest.open(output, run_digest(model.paths, settings), cfg.resume)
        return _predict_into(cfg, model, files, base, output, manifest)


def _predict_into(
    cfg: DictConfig, model: LoadedBackend, files: list[Path], base: Path, output: Path, manifest: Manifest
) -> PredictRun:
    inputs = {Path(os.path.realpath(path)) for path in files}
    run = PredictRun(output / "predictions.csv")
    todo = [path for path in files if manifest.entry(path) is None]
    if len(todo) < len(files):
        log.info("resuming: %d of %d image(s) were finished by an earlier run", len(files) - len(todo), len(files))
    batches = [todo[start : start + cfg.batch_size] for start in range(0, len(todo), cfg.batch_size)]
    networks = run.timed("networks", model.run)
    for batch in track(batches, description="predicting", console=Console(stderr=True)):
        started = time.perf_counter()
        images, readable, finished = [], [], []
        with run.stage("read and decode"):
            for path in batch:
                try:
                    images.append(xray_gray(read_unchanged(path), str(path)))
                    readable.append(path)
                except (DataError, OSError) as error:
                    run.skipped.append((path, str(error)))  # not recorded: a rerun reads it again
        if not images:
            continue
        with run.stage("resize and post-process"):  # the networks' share is taken out below
            results = segment(networks, model.spec, images, model.refuse_above)
        seconds = (time.perf_counter() - started) / len(images)
        with run.stage("draw, encode and write"):
            for path, result in zip(readable, results, strict=True):
                if result.refused:
                    finished.append(manifest.finished_entry(path, "refused", reason=result.refusal()))
                    continue
                try:
                    write_outputs(result, output_stem(output, path, base), cfg.save_probability, inputs)
                except (DataError, OSError) as error:
                    run.failed.append((path, str(error)))  # not recorded: a rerun tries it again
                    continue
                row = {"file": printable(path), **result.stats(), **(result.severity() or {})}
                row["seconds"] = round(seconds, 4)
                finished.append(manifest.finished_entry(path, "predicted", row=row))
            manifest.record(finished)
    run.stage_seconds["resize and post-process"] -= run.stage_seconds["networks"]
    for path in files:  # in the inputs' order, this run's and earlier runs' alike
        entry = manifest.entry(path)
        if entry is not None and entry["status"] == "predicted":
            run.rows.append(entry["row"])
        elif entry is not None:
            run.refused.append((path, entry["reason"]))
    header = list(run.rows[0]) if run.rows else ["file"]
    with run.stage("CSV"):
        write_csv(run.csv_path, header, ([row[key] for key in header] for row in run.rows))
    problems = (("skipped (unreadable)", run.skipped), ("refused", run.refused), ("failed (not written)", run.failed))
    for label, listed in problems:
        for path, reason in listed:
            log.warning("%s %s: %s", label, printable(path), reason)
    refused = f", {len(run.refused)} refused (not like chest X-rays)" if model.refuse_above is not None else ""
    Console().print(
        f"{len(run.rows)} image(s) predicted, {len(run.skipped)} skipped{refused}, {len(run.failed)} failed; "
        f"results in {printable(output)}",
        markup=False,
        highlight=False,
    )
    return run


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        check_output_folder(cfg)  # this run's own folder, before anything is written
        write_run_info(cfg.paths.output_dir)
        run = predict(cfg)
    if run.skipped or run.refused or run.failed:
        sys.exit(SOME_IMAGES_FAILED)


if __name__ == "__main__":
    main()
