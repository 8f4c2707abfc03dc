"""Check a training run's settings before any work starts: one line that names the key, the value
and what is expected, exit code 2 (pydantic does the type and range checks).

Only the keys covidseg relies on are checked; the rest of each section passes through to the
objects Hydra builds. Sizes a network cannot divide are checked once the network is known
(:func:`check_network_sides`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any, Literal

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from pydantic import Field, ValidationInfo, field_validator, model_validator

from covidseg.core.errors import ConfigError
from covidseg.core.validation import CheckedSettings, Seed, validated
from covidseg.data.settings import DataSettings
from covidseg.models.registry import NETWORKS


class OptimizerSettings(CheckedSettings):
    lr: float = Field(gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)


class LossSettings(CheckedSettings):
    """The weights of :class:`~covidseg.models.losses.BCEDiceLoss`: a negative one trains against its term."""

    bce_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    dice_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    smooth: float = Field(1.0, gt=0, allow_inf_nan=False)
    lovasz_weight: float = Field(0.0, ge=0, allow_inf_nan=False)
    focal_tversky_weight: float = Field(0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _something_to_learn(self) -> LossSettings:
        if not (self.bce_weight or self.dice_weight or self.lovasz_weight or self.focal_tversky_weight):
            raise ValueError("every loss weight is 0: the network would learn nothing; give one a weight > 0")
        return self


class ModelSettings(CheckedSettings):
    optimizer: OptimizerSettings | None = None
    loss: LossSettings | None = None
    threshold: float = Field(0.5, gt=0, lt=1)
    input_size: int | None = Field(None, ge=16, le=4096)
    presence_weight: float = Field(0.0, ge=0)
    presence_label_smoothing: float = Field(0.0, ge=0, lt=1)
    distill_weight: float = Field(0.0, ge=0)


# Lightning's precision values that covidseg's networks and data run in (its Trainer fails with a
# traceback on any other; in 64-, 16- and bf16-"true" precision the float32 batches meet weights of
# another type)
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-mixed", "bf16-mixed", "32-true", 32, "32",
              "bf16")  # fmt: skip
CORES = os.cpu_count() or 1


class TrainerSettings(CheckedSettings):
    max_epochs: int = Field(ge=1)  # covidseg's schedules (OneCycle, the time budget) need an end
    max_time: str | None = None  # DD:HH:MM:SS (Lightning's keyword form does not pass through Hydra)
    precision: Literal[PRECISIONS] | None = None  # type: ignore[valid-type]
    min_epochs: int | None = Field(None, ge=0)
    accumulate_grad_batches: int = Field(1, ge=1)
    check_val_every_n_epoch: int | None = Field(1, ge=1)
    log_every_n_steps: int | None = Field(None, ge=1)
    gradient_clip_val: float | None = Field(None, ge=0)
    limit_train_batches: int | float | None = Field(None, ge=0)
    limit_val_batches: int | float | None = Field(None, ge=0)
    accelerator: str | None = None
    devices: int | str | list[int] | None = None

    @field_validator("limit_train_batches", "limit_val_batches")
    @classmethod
    def _some_batches(cls, batches: int | float | None, info: ValidationInfo) -> int | float | None:
        if batches is not None and batches == 0:
            what = "trains nothing" if info.field_name == "limit_train_batches" else (
                "validates nothing, and the best checkpoint is chosen by val/dice")  # fmt: skip
            raise ValueError(f"{what}: give a count of batches >= 1 or a share of them in (0, 1]")
        return batches

    @field_validator("devices")
    @classmethod
    def _devices_that_exist(cls, devices: int | str | list[int] | None, info: ValidationInfo) -> object:
        if info.data.get("accelerator") == "cpu" and isinstance(devices, int) and devices > CORES:
            raise ValueError(f"this machine has {CORES} CPU cores: at most that many CPU processes")
        return devices

    @field_validator("max_time")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", value.strip()):
            raise ValueError("expected DD:HH:MM:SS, e.g. 00:01:30:00")
        return value


class RunSettings(CheckedSettings):
    seed: Seed | None = None
    train: bool = True
    test: bool = True
    resume_with_changes: bool = False
    optimized_metric: str | None = Field(None, pattern=r"^(train|val|test|severity)/\w+$")
    data: DataSettings
    trainer: TrainerSettings | None = None
    model: ModelSettings | None = None

    @field_validator("test")
    @classmethod
    def _something_to_do(cls, test: bool, info: ValidationInfo) -> bool:
        if not test and info.data.get("train") is False:
            raise ValueError("with train=false too, the run would do nothing: set train=true or test=true")
        return test


def check_settings(cfg: DictConfig) -> None:
    """Validate ``seed``, ``data.*``, ``model.*`` and ``trainer.*`` of a composed training config."""
    values: dict[str, Any] = {
        name: OmegaConf.to_container(cfg[name], resolve=True)
        for name in ("data", "model", "trainer")
        if cfg.get(name) is not None
    } | {key: cfg.get(key, default) for key, default in
         (("seed", None), ("train", True), ("test", True), ("resume_with_changes", False),
          ("optimized_metric", None))}  # fmt: skip
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
