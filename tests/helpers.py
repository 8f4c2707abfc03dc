"""Objects that tests put into configs with ``_target_: helpers.<name>`` (tests/ on PYTHONPATH),
and small helpers the test modules share."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


class SignalAfterStep(L.Callback):
    """Sends the process ``signal_name`` (``SIGINT``: a Ctrl-C) once training step ``step`` is done,
    so that a test can interrupt a run at a step it chooses, in its own process."""

    def __init__(self, signal_name: str, step: int) -> None:
        self.signal, self.step = signal.Signals[signal_name], step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


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


def run_command(main: Callable[[], object], *args: str) -> int:
    """Runs a command's ``main`` with ``args`` as its command line, in this process, and returns its
    exit status; stdout and stderr go wherever the test captures them. A subprocess would spend
    about 10 s importing torch and Lightning on each call; tests that need the process itself
    (signals, DDP, the installed scripts) still start one. The logging set-up a Hydra app makes
    is undone afterwards, so that it does not write to the next test's closed streams."""
    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    handlers, level, argv = root.handlers[:], root.level, sys.argv
    sys.argv = [main.__module__, *args]
    try:
        main()
        return 0
    except SystemExit as stopped:
        return stopped.code if isinstance(stopped.code, int) else int(stopped.code is not None)
    finally:
        sys.argv = argv
        root.handlers[:], root.level = handlers, level
        GlobalHydra.instance().clear()


@contextmanager
def served(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free port of 127.0.0.1, in a thread of this process; yields
    its URL. For a browser test of a model the tests made; ``python -m covidseg.serve`` itself is
    started as a process once (conftest's ``server``)."""
    import threading

    import uvicorn

    from covidseg.benchmarks.serve import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"uvicorn did not start on port {port}"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
