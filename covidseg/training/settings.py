"""Check a training run's settings before any work starts: one line that names the key, the value
and what is expected, exit code 2 (pydantic does the type and range checks).

Only the keys covidseg relies on are checked; the rest of each section passes through to the
objects Hydra builds. Sizes a network cannot divide are checked once the network is known
(:func:`check_network_sides`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from pydantic import Field, field_validator

from covidseg.core.errors import ConfigError
from covidseg.core.validation import CheckedSettings, validated
from covidseg.data.settings import DataSettings
from covidseg.models.registry import NETWORKS


class OptimizerSettings(CheckedSettings):
    lr: float = Field(gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)


class ModelSettings(CheckedSettings):
    optimizer: OptimizerSettings | None = None
    threshold: float = Field(0.5, gt=0, lt=1)
    input_size: int | None = Field(None, ge=16, le=4096)
    presence_weight: float = Field(0.0, ge=0)
    presence_label_smoothing: float = Field(0.0, ge=0, lt=1)
    distill_weight: float = Field(0.0, ge=0)


# Lightning's accepted precision values (its Trainer fails with a traceback on any other)
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", 64, 32, 16, "64", "32", "16", "bf16")  # fmt: skip


class TrainerSettings(CheckedSettings):
    max_epochs: int | None = Field(None, ge=-1)
    max_time: str | None = None  # DD:HH:MM:SS (Lightning's keyword form does not pass through Hydra)
    precision: Literal[PRECISIONS] | None = None  # type: ignore[valid-type]
    min_epochs: int | None = Field(None, ge=0)
    accumulate_grad_batches: int = Field(1, ge=1)
    check_val_every_n_epoch: int | None = Field(1, ge=1)
    log_every_n_steps: int | None = Field(None, ge=1)
    gradient_clip_val: float | None = Field(None, ge=0)

    @field_validator("max_time")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", value.strip()):
            raise ValueError("expected DD:HH:MM:SS, e.g. 00:01:30:00")
        return value


class RunSettings(CheckedSettings):
    seed: int | None = None
    data: DataSettings
    trainer: TrainerSettings | None = None
    model: ModelSettings | None = None


def check_settings(cfg: DictConfig) -> None:
    """Validate ``seed``, ``data.*``, ``model.*`` and ``trainer.*`` of a composed training config."""
    values: dict[str, Any] = {
        name: OmegaConf.to_container(cfg[name], resolve=True)
        for name in ("data", "model", "trainer")
        if cfg.get(name) is not None
    } | {"seed": cfg.get("seed")}
    validated(RunSettings, values)
    check_network_options((values.get("model") or {}).get("net") or {})
    distill_weight = (values.get("model") or {}).get("distill_weight", 0.0)
    if distill_weight > 0 and not (values.get("data") or {}).get("teacher_targets"):
        raise ConfigError(
            f"model.distill_weight={distill_weight!r} needs data.teacher_targets: the .npz that "
            "python -m covidseg.distill writes"
        )


def check_network_options(net: dict[str, Any]) -> None:
    """``model.net``'s options, when it names one of covidseg's networks, as a model file's are
    checked (the registry's options model), so a width of 0 is one line, not a traceback."""
    try:
        cls = get_class(net["_target_"])
    except (KeyError, ImportError, ValueError):  # not a class path: Hydra says so when it builds
        return
    entry = next((entry for entry in NETWORKS.values() if entry.cls is cls), None)
    if entry is None:
        return
    validated(entry.options, {key: value for key, value in net.items() if not key.startswith("_")}, "model.net.")


def check_network_sides(sides: Iterable[int], multiple: int, network: str) -> None:
    """Every side the network will see is a multiple of what its pooling levels halve."""
    for side in sides:
        if side % multiple:
            raise ConfigError(
                f"{network} needs image sides divisible by {multiple} (one halving per level), "
                f"got {side}: change data.image_size, model.input_size or model.net.depth"
            )
