"""The ``data.*`` settings and ``seed``, checked before any file is read: one line that names the
key, the value and what is expected (pydantic does the type and range checks). Training checks
them with its own sections (:mod:`covidseg.training.settings`); eval, calibrate and distill alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import Field

from covidseg.core.labels import CLASSES, TARGETS
from covidseg.core.validation import CheckedSettings, validated


class SyntheticSettings(CheckedSettings):
    """The phantoms ``data=synthetic`` writes: how many per split and class, and their side."""

    counts: dict[str, Annotated[int, Field(ge=0, le=100_000)]]
    classes: list[Literal[CLASSES]] = Field(min_length=1)  # type: ignore[valid-type]
    image_size: int = Field(ge=16, le=4096)
    seed: int = 0


class DataSettings(CheckedSettings):
    classes: list[Literal[CLASSES]] = Field(min_length=1)  # type: ignore[valid-type]
    eval_classes: list[Literal[CLASSES]] | None = None  # type: ignore[valid-type]
    targets: list[Literal[TARGETS]] = Field(min_length=1, max_length=2)  # type: ignore[valid-type]
    image_size: int = Field(ge=16, le=4096)
    batch_size: int = Field(ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    num_folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    teacher_targets: str | None = None
    synthetic: SyntheticSettings | None = None


class DataRunSettings(CheckedSettings):
    seed: int | None = None
    data: DataSettings


def check_data_settings(cfg: DictConfig) -> None:
    """Validate ``seed`` and ``data.*`` of a composed config."""
    validated(DataRunSettings, {"seed": cfg.get("seed"), "data": OmegaConf.to_container(cfg.data, resolve=True)})
