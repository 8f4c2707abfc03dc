"""What a run leaves for people: run info, metric files, a per-image CSV and a summary table."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
from rich.console import Console
from rich.table import Table

import covidseg
from covidseg.core.errors import DataError
from covidseg.core.files import printable, read_file_bytes, read_plain_yaml
from covidseg.core.writing import write_atomic, write_csv

log = logging.getLogger(__name__)
MAX_RUN_FILE_BYTES = 10 * 1024 * 1024  # a run_info.json or metrics.json is a few kB


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(covidseg.__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def read_run_file(path: Path) -> dict[str, Any]:
    """A JSON object a run wrote (``run_info.json``, ``metrics.json``), read as untrusted: anything
    else is one line naming the file."""
    try:
        content = json.loads(read_file_bytes(path, MAX_RUN_FILE_BYTES, f"a {path.name}", DataError))
    except DataError:  # not a regular file, or too large: already one line naming it
        raise
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"{str(path)!r} is not a {path.name} covidseg wrote: {error}") from None
    if not isinstance(content, dict):
        raise DataError(f"{str(path)!r} holds a {type(content).__name__}, expected names and values")
    return content


@dataclass(frozen=True)
class Folds:
    """The folds of a k-fold multirun, from its jobs' recorded ``data.num_folds`` and ``data.fold``."""

    missing: list[int]  # folds without a finished job (its metrics.json, written last)
    finished: list[Path]  # the job folders that finished
    unrecorded: list[Path]  # job folders without a recorded config: which fold they ran is unknown

    def describe_missing(self) -> str:
        folds = (
            f"no finished run of fold(s) {', '.join(map(str, self.missing))} (a metrics.json)" if self.missing else ""
        )
        jobs = ", ".join(job.name for job in self.unrecorded)
        unknown = (
            f"job(s) {jobs} without a recorded .hydra/config.yaml (which fold they ran is unknown)" if jobs else ""
        )
        return "; ".join(part for part in (folds, unknown) if part)

    @property
    def incomplete(self) -> bool:
        return bool(self.missing or self.unrecorded)


def _recorded_folds(config: Any) -> tuple[int | None, int | None]:
    data = config.get("data") if isinstance(config, dict) else None
    count, fold = (data.get("num_folds"), data.get("fold")) if isinstance(data, dict) else (None, None)
    valid_count = isinstance(count, int) and not isinstance(count, bool) and 2 <= count <= 1000
    return (count if valid_count else None), (fold if isinstance(fold, int) and not isinstance(fold, bool) else None)


def kfold_folds(jobs: Sequence[Path], error: type[Exception]) -> Folds | None:
    """The folds of ``jobs`` (the job folders of one multirun) when they are a k-fold multirun
    (``None`` otherwise), from each job's recorded config or the multirun's ``multirun.yaml``; the
    recorded configs are read as untrusted YAML."""
    folds: set[int] = set()
    finished: dict[int, Path] = {}
    unrecorded: list[Path] = []
    for job in jobs:
        recorded = job / ".hydra" / "config.yaml"
        if not recorded.is_file():
            unrecorded.append(job)
            continue
        count, fold = _recorded_folds(read_plain_yaml(recorded, MAX_RUN_FILE_BYTES, "a run's recorded config", error))
        if count is not None and fold is not None:
            folds |= set(range(count))
            if (job / "metrics.json").is_file():
                if fold in finished:
                    raise error(
                        f"jobs {finished[fold].name!r} and {job.name!r} of {str(job.parent)!r} both ran fold {fold}: "
                        "a fold counts once; move one of them away"
                    )
                finished[fold] = job
    sweep_record = jobs[0].parent / "multirun.yaml" if jobs else None
    if not folds and unrecorded and sweep_record is not None and sweep_record.is_file():
        count, _ = _recorded_folds(read_plain_yaml(sweep_record, MAX_RUN_FILE_BYTES, "a multirun's record", error))
        folds = set(range(count)) if count is not None else set()
    if not folds:
        return None
    return Folds(sorted(folds - set(finished)), [finished[fold] for fold in sorted(finished)], unrecorded)


def make_output_folder(output: Path) -> Path:
    """``output`` made, parents included, for a command's files; one line naming it when it cannot
    be (a parent that is a file, a read-only or virtual file system)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"output {printable(output)!r} cannot be made: {error.strerror or error}") from None
    return output


def write_run_info(output_dir: str | Path) -> dict[str, Any]:
    """Record the exact command, versions and commit next to Hydra's composed config; returns what
    was written, so that :func:`add_to_run_info` adds to it without reading the file back."""
    info = {
        "started": time.time(),  # wall-clock origin of the run's learning curves (covidseg.learning_curves)
        "command": [Path(sys.executable).name, *sys.argv],
        "covidseg": covidseg.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(output_dir, "run_info.json"), json.dumps(info, indent=2) + "\n")
    return info


def add_to_run_info(output_dir: str | Path, info: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """``run_info.json`` written again as ``info`` (what :func:`write_run_info` returned) with what
    the run learnt as it went (such as the backend that ran): the file is not read back, so whatever
    was put in its place meanwhile is replaced, not trusted."""
    write_atomic(Path(output_dir, "run_info.json"), json.dumps(dict(info) | dict(values), indent=2) + "\n")


def write_metrics(output_dir: str | Path, metrics: Mapping[str, float]) -> Path:
    path = Path(output_dir, "metrics.json")
    write_atomic(path, json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
    return path


def write_per_image(output_dir: str | Path, names: Sequence[str], columns: Mapping[str, Sequence[float]]) -> Path:
    """One CSV row per image: its file name and each per-image value (Dice, IoU, areas)."""
    rows = ([name, *(f"{values[row]:.6g}" for values in columns.values())] for row, name in enumerate(names))
    return write_csv(Path(output_dir, "per_image.csv"), ["file", *columns], rows)


def print_summary(
    title: str,
    metrics: Mapping[str, float],
    locations: Mapping[str, str | Path | None],
    intervals: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """A compact table of the final metrics (with their 95 % intervals where given), then where
    the outputs are."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if intervals:
        table.add_column("95 % interval", justify="right")
    for name in sorted(metrics):
        if name.split("/")[0] in ("val", "test", "severity") and not name.endswith("_epoch"):
            interval = (intervals or {}).get(name)
            shown = [f"[{interval['low']:.4f}, {interval['high']:.4f}]"] if interval else [""] if intervals else []
            table.add_row(name, f"{metrics[name]:.4f}", *shown)
    console = Console()
    console.print(table)
    for label, location in locations.items():
        if location:
            console.print(f"{label}: {printable(location)}", markup=False, highlight=False, soft_wrap=True)
