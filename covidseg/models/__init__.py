"""Networks, losses and the LightningModule that trains them."""

from covidseg.models.losses import BCEDiceLoss
from covidseg.models.module import SegmentationModule
from covidseg.models.unet import UNet

__all__ = ["BCEDiceLoss", "SegmentationModule", "UNet"]
