"""covidseg's own networks by name: the only classes a model file can make covidseg build.

A checkpoint or an exported model names its network (``unet``) and gives plain keyword options;
loading looks the name up here and validates the options with the entry's pydantic model before
any object is built. Training configs keep Hydra's ``_target_`` (that is the user's own code);
only what comes from a model file goes through this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from covidseg.models.attention_unet import AttentionUNet
from covidseg.models.res_unet import ResUNet
from covidseg.models.unet import UNet
from covidseg.models.unetpp import UNetPlusPlus


class UNetOptions(BaseModel):
    """Constructor options of the U-Net family that a model file may set (plain values only)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    in_channels: int = Field(1, ge=1, le=4)
    out_channels: int = Field(1, ge=1, le=2)
    base_width: int = Field(32, ge=1, le=256)
    depth: int = Field(4, ge=1, le=6)


class UNetPlusPlusOptions(UNetOptions):
    deep_supervision: bool = False


@dataclass(frozen=True)
class RegisteredNetwork:
    """A network class, the options a model file may give it, and the extra halvings its input
    side must survive beyond one per ``depth`` level (a stride-2 stem adds one)."""

    cls: type[nn.Module]
    options: type[UNetOptions]
    extra_halvings: int = 0

    def side_multiple(self, depth: int) -> int:
        """Input sides must be a multiple of this."""
        return 2 ** (depth + self.extra_halvings)


NETWORKS: dict[str, RegisteredNetwork] = {
    "unet": RegisteredNetwork(UNet, UNetOptions),
    "attention_unet": RegisteredNetwork(AttentionUNet, UNetOptions),
    "unetpp": RegisteredNetwork(UNetPlusPlus, UNetPlusPlusOptions),
    "res_unet": RegisteredNetwork(ResUNet, UNetOptions, extra_halvings=1),
}


def network_name(net: nn.Module) -> str | None:
    """The registry name of ``net``'s exact class (``None``: not one of covidseg's networks)."""
    return next((name for name, entry in NETWORKS.items() if type(net) is entry.cls), None)


def build_network(name: str, options: dict) -> nn.Module:
    """Build a registered network from validated plain options."""
    entry = NETWORKS[name]
    return entry.cls(**entry.options.model_validate(options).model_dump())
