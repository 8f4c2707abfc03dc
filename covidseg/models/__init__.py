"""Networks, losses and the LightningModule that trains them."""

from covidseg.models.attention_unet import AttentionUNet
from covidseg.models.losses import BCEDiceLoss
from covidseg.models.module import SegmentationModule
from covidseg.models.res_unet import ResUNet
from covidseg.models.unet import UNet
from covidseg.models.unetpp import UNetPlusPlus

__all__ = ["AttentionUNet", "BCEDiceLoss", "ResUNet", "SegmentationModule", "UNet", "UNetPlusPlus"]
