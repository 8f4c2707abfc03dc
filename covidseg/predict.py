"""Segment any X-ray: masks, overlays and a CSV of infected areas.

python -m covidseg.predict ckpt_path=<ckpt|pretrained|pretrained:infection|list|k-fold folder|model.onnx> \
    input=<file|folder|glob> output=<dir>

The files it reads and writes, and the rules that keep the user's files safe, are
:mod:`covidseg.inference.image_files`; the model's answer is :mod:`covidseg.inference.segment`.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf
from pydantic import Field, field_validator
from rich.console import Console
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from covidseg.core.config import CONF_DIR, check_output_folder
from covidseg.core.errors import DataError, hydra_errors_in_one_line, user_errors
from covidseg.core.files import printable
from covidseg.core.framework_noise import quiet_framework_noise
from covidseg.core.images import find_inputs
from covidseg.core.run_files import make_output_folder, write_run_info
from covidseg.core.validation import CheckedSettings, check_command_keys
from covidseg.core.writing import exclusive_lock, write_csv
from covidseg.evaluation.test_loop import check_loop_precision
from covidseg.inference.image_files import check_nothing_replaced, check_output
from covidseg.inference.loader import inference_bf16
from covidseg.inference.manifest import Manifest, run_digest
from covidseg.inference.prediction_loop import (
    LOOP_STAGES,
    InputShards,
    OutputWriter,
    ProgressLog,
    SegmentImages,
    StageClock,
    StopOnSigterm,
    prediction_trainer,
)
from covidseg.inference.segment import LoadedBackend, load_configured_backend

log = logging.getLogger(__name__)
STAGES = (*LOOP_STAGES, "CSV")  # the stages predict_bench times
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
    stage_seconds: dict[str, float] = field(default_factory=dict)  # of the command's own process (one process)


def predict(cfg: DictConfig) -> PredictRun:
    """Write mask, overlay (and optional probability) PNGs per image and ``predictions.csv``."""
    check_command_keys(cfg, PredictSettings)
    check_loop_precision(cfg)
    files, base = find_inputs(str(cfg.input))
    # the folder the path names once its links and ".." are followed: "<new>/../<yours>" is yours
    output = Path(os.path.realpath(Path(str(cfg.output)).expanduser()))
    recursive = Path(str(cfg.input)).expanduser().is_dir() or "**" in str(cfg.input)
    check_output(output, files, base, recursive, cfg.allow_output_in_input)
    check_nothing_replaced(output, files, base)
    clock = StageClock()
    writer = OutputWriter(output, base, {Path(os.path.realpath(path)) for path in files}, cfg.save_probability, clock)
    trainer = prediction_trainer(cfg, [writer, StopOnSigterm(), ProgressLog()])
    model = load_configured_backend(cfg)
    make_output_folder(output)
    if trainer.node_rank > 0:  # the first machine's command holds the lock, keeps the record and writes the CSV
        _run_loop(trainer, cfg, model, files, None, output, clock)
        return PredictRun(output / "predictions.csv")
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
        Manifest.parts_folder(output)  # checked here, where a refusal is one line, before any process writes
        todo = [path for path in files if manifest.entry(path) is None]
        if len(todo) < len(files):
            log.info("resuming: %d of %d image(s) were finished by an earlier run", len(files) - len(todo), len(files))
        try:
            if todo or trainer.num_nodes > 1:  # the other machines wait for this one's processes
                _run_loop(trainer, cfg, model, files, todo, output, clock)
        finally:  # what the ranks finished is kept even when the run stops early
            unfinished = manifest.fold_parts()
        return _report(model, files, output, manifest, unfinished, clock)


def _run_loop(
    trainer: L.Trainer,
    cfg: DictConfig,
    model: LoadedBackend,
    files: list[Path],
    todo: list[Path] | None,
    output: Path,
    clock: StageClock,
) -> None:
    """Lightning's predict loop over ``todo`` (:mod:`covidseg.inference.prediction_loop`); the processes
    it starts load the very files this one loaded, and an error in one of them comes back in one line."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["ckpt_path"] = [str(path) for path in model.paths] if len(model.paths) > 1 else str(model.paths[0])
    meeting = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    interrupt = signal.getsignal(signal.SIGINT)
    segmenter = SegmentImages(OmegaConf.create(resolved), model, clock)
    try:
        trainer.predict(segmenter, InputShards(files, todo, output, cfg.batch_size), return_predictions=False)
    except SystemExit as exit_:  # Lightning answers Ctrl-C with exit code 1 after its own message
        if isinstance(exit_.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    except (ProcessRaisedException, ProcessExitedException) as error:  # a started process failed
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise DataError(f"a predict process stopped: {(lines or ['?'])[-1][:300]}") from None
    finally:  # Lightning ignores Ctrl-C from its first one on, and leaves its meeting point set
        # the runtime is released here, not whenever the garbage collector breaks the Trainer's cycles:
        # an OpenVINO model freed later, at a random moment of another run, can crash the process
        segmenter.model = segmenter.networks = None
        gc.collect()  # the Trainer's cycles (module, loops, progress bar) freed now, in this thread
        signal.signal(signal.SIGINT, interrupt)
        for key, value in meeting.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _report(
    model: LoadedBackend,
    files: list[Path],
    output: Path,
    manifest: Manifest,
    unfinished: list[dict[str, Any]],
    clock: StageClock,
) -> PredictRun:
    """The CSV in the inputs' order (this run's and earlier runs' images alike), and the summary."""
    run = PredictRun(output / "predictions.csv", stage_seconds=dict(clock.seconds))
    order = {str(path): index for index, path in enumerate(files)}
    for entry in sorted(unfinished, key=lambda entry: order.get(entry["input"], len(order))):
        (run.skipped if entry["status"] == "skipped" else run.failed).append((Path(entry["input"]), entry["reason"]))
    attempted = {entry["input"] for entry in unfinished}
    for path in files:
        entry = manifest.entry(path)
        if entry is not None and entry["status"] == "predicted":
            run.rows.append(entry["row"])
        elif entry is not None:
            run.refused.append((path, entry["reason"]))
        elif str(path) not in attempted:  # no process got to it (stopped early): a rerun does it
            run.failed.append((path, "not done: the run stopped before it"))
    header = list(run.rows[0]) if run.rows else ["file"]
    started = time.perf_counter()
    write_csv(run.csv_path, header, ([row[key] for key in header] for row in run.rows))
    run.stage_seconds["CSV"] = time.perf_counter() - started
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
    quiet_framework_noise()
    with user_errors():
        check_output_folder(cfg)  # this run's own folder, before anything is written
        write_run_info(cfg.paths.output_dir)
        run = predict(cfg)
    if run.skipped or run.refused or run.failed:
        sys.exit(SOME_IMAGES_FAILED)


if __name__ == "__main__":
    main()
