"""Check the settings a command was given before any work starts: one line that names the key, the
value and what is expected, exit code 2 (pydantic does the type and range checks).

Only the keys covidseg relies on are checked; the rest of each section passes through to the
objects Hydra builds. Sizes a network cannot divide are checked once the network is known
(:func:`check_network_sides`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from covidseg.data.index import CLASSES
from covidseg.errors import ConfigError
from covidseg.model_spec import TARGETS, first_error
from covidseg.models.registry import NETWORKS


class _Checked(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class SyntheticSettings(_Checked):
    """The phantoms ``data=synthetic`` writes: how many per split and class, and their side."""

    counts: dict[str, Annotated[int, Field(ge=0, le=100_000)]]
    classes: list[Literal[CLASSES]] = Field(min_length=1)  # type: ignore[valid-type]
    image_size: int = Field(ge=16, le=4096)
    seed: int = 0


class DataSettings(_Checked):
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


class OptimizerSettings(_Checked):
    lr: float = Field(gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)


class ModelSettings(_Checked):
    optimizer: OptimizerSettings | None = None
    threshold: float = Field(0.5, gt=0, lt=1)
    input_size: int | None = Field(None, ge=16, le=4096)
    presence_weight: float = Field(0.0, ge=0)
    presence_label_smoothing: float = Field(0.0, ge=0, lt=1)
    distill_weight: float = Field(0.0, ge=0)


# Lightning's accepted precision values (its Trainer fails with a traceback on any other)
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", 64, 32, 16, "64", "32", "16", "bf16")  # fmt: skip


class TrainerSettings(_Checked):
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


class RunSettings(_Checked):
    seed: int | None = None
    data: DataSettings
    trainer: TrainerSettings | None = None
    model: ModelSettings | None = None


class CalibrationSettings(_Checked):
    """``calibrate``'s candidates (its data section is checked as every command's)."""

    thresholds: list[Annotated[float, Field(gt=0, lt=1)]] = Field(min_length=1)
    presence_thresholds: list[Annotated[float, Field(ge=0, le=1)]]
    min_region_shares: list[Annotated[float, Field(ge=0, lt=1)]]
    min_healthy_rate: float = Field(ge=0, le=1)


class PredictSettings(_Checked):
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


def check_command_keys(cfg: DictConfig, settings: type[BaseModel]) -> None:
    """Validate a command's own top-level keys (``settings``' fields) of its composed config."""
    composed = OmegaConf.to_container(cfg, resolve=True)
    values = {key: composed.get(key) for key in settings.model_fields}
    try:
        settings.model_validate(values)
    except ValidationError as error:
        key, value, message = first_error(error)
        raise ConfigError(f"{key}={value!r}: {message}") from None


def check_settings(cfg: DictConfig, sections: Iterable[str] = ("data", "model", "trainer")) -> None:
    """Validate ``seed`` and the given sections of a composed config."""
    present = {name: cfg.get(name) for name in sections if cfg.get(name) is not None}
    values: dict[str, Any] = {
        name: OmegaConf.to_container(section, resolve=True) for name, section in present.items()
    } | {"seed": cfg.get("seed")}
    try:
        RunSettings.model_validate(values)
    except ValidationError as error:
        key, value, message = first_error(error)
        raise ConfigError(f"{key}={value!r}: {message}") from None
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
    try:
        entry.options.model_validate({key: value for key, value in net.items() if not key.startswith("_")})
    except ValidationError as error:
        key, value, message = first_error(error)
        raise ConfigError(f"model.net.{key}={value!r}: {message}") from None


def check_network_sides(sides: Iterable[int], multiple: int, network: str) -> None:
    """Every side the network will see is a multiple of what its pooling levels halve."""
    for side in sides:
        if side % multiple:
            raise ConfigError(
                f"{network} needs image sides divisible by {multiple} (one halving per level), "
                f"got {side}: change data.image_size, model.input_size or model.net.depth"
            )
