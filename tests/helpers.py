"""Objects that tests put into configs with ``_target_: helpers.<name>`` (tests/ on PYTHONPATH),
and small helpers the test modules share."""

from __future__ import annotations

import os
import signal
import time

import cv2
import lightning as L
import numpy as np
import torch

from covidseg.models import BCEDiceLoss


class SlowSteps(L.Callback):
    """Makes each training step last a while, so that a test can interrupt a run mid-epoch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)


class StopDuringValidation(L.Callback):
    """Sends the process SIGTERM after the first validation batch of epoch ``epoch`` (counted from
    0), as a scheduler pre-empting a job would, so that a test can stop a run mid-validation."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int, *rest) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


class NaNAfter(BCEDiceLoss):
    """The study's loss, which turns NaN from the ``step``-th call on."""

    def __init__(self, step: int, **loss_args: float) -> None:
        super().__init__(**loss_args)
        self.step = step
        self.calls = 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = super().forward(logits, target)
        return loss * torch.nan if self.calls >= self.step else loss


def png_bytes(image: np.ndarray, extension: str = ".png") -> bytes:
    """An image encoded in memory (PNG by default; the extension picks the format)."""
    return cv2.imencode(extension, image)[1].tobytes()


def dicom_bytes(pixels: np.ndarray, **attributes) -> bytes:
    """A DICOM Part 10 file made by pydicom: unsigned ``pixels`` (uint8 or uint16, 2-D) and any
    extra attributes (``RescaleSlope``, ``WindowCenter``, ``PhotometricInterpretation``, ``Rows``...)."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    bits = pixels.dtype.itemsize * 8
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PixelRepresentation = 1, "MONOCHROME2", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    dataset.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
