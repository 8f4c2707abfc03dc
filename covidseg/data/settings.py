"""The ``data.*`` settings and ``seed``, checked before any file is read: one line that names the
key, the value and what is expected (pydantic does the type and range checks). Training checks
them with its own sections (:mod:`covidseg.training.settings`); eval, calibrate and distill alone.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import Field, ValidationInfo, field_validator

from covidseg.core.labels import CLASSES, TARGETS
from covidseg.core.validation import CheckedSettings, Seed, validated

CORES = os.cpu_count() or 1
# each loader worker is a process with its own copy of the pipeline: more than a few per core only
# fills memory (a thousand start until the kernel kills the run)
MAX_WORKERS = min(64, 4 * CORES)


def _distinct(values: list[str] | None) -> list[str] | None:
    if values is not None and len(set(values)) != len(values):
        twice = next(value for value in values if values.count(value) > 1)
        raise ValueError(f"names {twice!r} twice (a class's images would count twice, a target's mask be learnt twice)")
    return values


class SyntheticSettings(CheckedSettings):
    """The phantoms ``data=synthetic`` writes: how many per split and class, and their side."""

    counts: dict[str, Annotated[int, Field(ge=0, le=100_000)]]
    classes: list[Literal[CLASSES]] = Field(min_length=1)  # type: ignore[valid-type]
    image_size: int = Field(ge=16, le=4096)
    seed: Seed = 0

    _distinct_classes = field_validator("classes")(_distinct)


class DataSettings(CheckedSettings):
    classes: list[Literal[CLASSES]] = Field(min_length=1)  # type: ignore[valid-type]
    eval_classes: list[Literal[CLASSES]] | None = None  # type: ignore[valid-type]
    targets: list[Literal[TARGETS]] = Field(min_length=1, max_length=2)  # type: ignore[valid-type]
    image_size: int = Field(ge=16, le=4096)
    batch_size: int = Field(ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False
    seed: Seed = 0
    num_folds: int | None = Field(None, ge=2, le=100)
    fold: int = Field(0, ge=0)
    teacher_targets: str | None = None
    synthetic: SyntheticSettings | None = None

    _distinct_classes = field_validator("classes", "eval_classes", "targets")(_distinct)

    @field_validator("num_workers")
    @classmethod
    def _within_the_machine(cls, workers: int) -> int:
        if workers > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} loader processes on this machine of {CORES} cores")
        return workers

    @field_validator("fold")
    @classmethod
    def _fold_exists(cls, fold: int, info: ValidationInfo) -> int:
        folds = info.data.get("num_folds")
        if folds is not None and fold >= folds:
            raise ValueError(f"not one of the {folds} folds of data.num_folds (0 to {folds - 1})")
        return fold


class DataRunSettings(CheckedSettings):
    seed: Seed | None = None
    data: DataSettings


def check_data_settings(cfg: DictConfig) -> None:
    """Validate ``seed`` and ``data.*`` of a composed config."""
    validated(DataRunSettings, {"seed": cfg.get("seed"), "data": OmegaConf.to_container(cfg.data, resolve=True)})
