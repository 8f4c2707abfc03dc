"""Objects that tests put into configs with ``_target_: helpers.<name>`` (tests/ on PYTHONPATH)."""

from __future__ import annotations

import time

import lightning as L
import torch

from covidseg.models import BCEDiceLoss


class SlowSteps(L.Callback):
    """Makes each training step last a while, so that a test can interrupt a run mid-epoch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)


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
