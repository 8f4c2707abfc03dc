"""Networks, losses and the LightningModule that trains them.

Owns the networks (``unet``, ``attention_unet``, ``unetpp``, ``res_unet`` and their ``blocks``),
the registry of those a model file may name (``registry``), the wrapper that resizes, runs channels
last and adds the presence head (``network``), the losses (``losses``) and the LightningModule
(``module``). A new network or loss goes here; inference builds networks from the registry only.

Imports from: core.
"""

from covidseg.models.attention_unet import AttentionUNet
from covidseg.models.losses import BCEDiceLoss
from covidseg.models.module import SegmentationModule
from covidseg.models.res_unet import ResUNet
from covidseg.models.unet import UNet
from covidseg.models.unetpp import UNetPlusPlus

__all__ = ["AttentionUNet", "BCEDiceLoss", "ResUNet", "SegmentationModule", "UNet", "UNetPlusPlus"]
