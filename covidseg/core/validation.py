"""pydantic's refusals as covidseg's one line: the dotted key, the value given, what was expected.

Model files (:mod:`covidseg.inference.model_spec`), every command's settings and the server's
settings are checked by pydantic models; this is where a failed check becomes a :class:`ConfigError`
or a message.
"""

from __future__ import annotations

from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from covidseg.core.errors import ConfigError


class CheckedSettings(BaseModel):
    """A section of a command's settings: the keys covidseg relies on are checked, strictly typed;
    the rest pass through to the objects Hydra builds."""

    model_config = ConfigDict(extra="allow", strict=True)


# what a random seed may be (numpy's and Lightning's range); outside it Lightning fails mid-run
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def first_error(error: ValidationError) -> tuple[str, Any, str]:
    """pydantic's first complaint as (dotted key, the value given, what was expected)."""
    first = error.errors()[0]
    loc = [part for part in first["loc"] if part not in ("str", "bool", "int", "float")]  # union members tried
    return ".".join(str(part) for part in loc), first.get("input"), first["msg"].removeprefix("Value error, ")


def validated(settings: type[BaseModel], values: dict[str, Any], prefix: str = "") -> BaseModel:
    """``values`` checked by ``settings``; a refusal is a :class:`ConfigError` naming ``<prefix><key>``."""
    try:
        return settings.model_validate(values)
    except ValidationError as error:
        key, value, message = first_error(error)
        raise ConfigError(f"{prefix}{key}={value!r}: {message}") from None


def check_command_keys(cfg: DictConfig, settings: type[BaseModel]) -> None:
    """Validate a command's own top-level keys (``settings``' fields) of its composed config."""
    composed = OmegaConf.to_container(cfg, resolve=True)
    validated(settings, {key: composed.get(key) for key in settings.model_fields})
