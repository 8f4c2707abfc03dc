"""``trainer.max_time`` that warns ahead and stops at an epoch's end, so a resume finishes the schedule."""

from __future__ import annotations

import logging
import math
from datetime import timedelta

import lightning as L
from lightning.pytorch.callbacks import Timer

log = logging.getLogger(__name__)


class TimeBudget(L.Callback):
    """Says, once an epoch shows it, that ``trainer.max_time`` will stop training before
    ``max_epochs`` (again if a later epoch's pace makes the forecast a quarter longer, as
    progressive resizing does); stops at the end of the last epoch that fits rather than in the
    middle of the next; says after how many epochs it stopped and the limit to resume with.

    A recipe's schedule (one-cycle learning rate, progressive resizing, the weight average) spans
    its ``max_epochs``; a run that the time limit cuts short ends mid-schedule and scores below what
    the recipe was measured at. The recipes are timed on a CPU with native bf16; where it is
    missing they train in fp32, several times slower, and the limit meant as a guard decides the
    result. Lightning's ``Timer`` only says that it stopped, and stops mid-epoch, where it counts the
    cut epoch as done: a resume would skip the rest of it. Stopping at an epoch's end instead, when
    the last epoch's pace says the next would not finish in time, makes a resume from ``last.ckpt``
    with a longer limit end where an uncut run ends. The Timer stays as the hard limit for an epoch
    slower than its predecessor.
    """

    def __init__(self) -> None:
        self.epoch_started: float | None = None  # None for an epoch resumed midway: its length is unknown
        self.epoch_time = 0.0
        self.forecast = 0.0  # the total training time last announced
        self.stopped_early = False  # stopped by this callback, at an epoch's end

    @staticmethod
    def _timer(trainer: L.Trainer) -> Timer | None:
        if trainer.max_epochs is None or trainer.max_epochs < 0:  # no planned end to fall short of
            return None
        return next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)

    @staticmethod
    def _limit_for(seconds: float) -> str:
        """A ``trainer.max_time`` value (DD:HH:MM:SS) 10 % above ``seconds``, in whole minutes."""
        minutes = math.ceil(seconds * 1.1 / 60)
        return f"{minutes // 1440:02d}:{minutes // 60 % 24:02d}:{minutes % 60:02d}:00"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timer = self._timer(trainer)
        if timer is not None:
            self.epoch_started = timer.time_elapsed("train")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timer = self._timer(trainer)
        if timer is None:
            return
        elapsed, epochs_left = timer.time_elapsed("train"), trainer.max_epochs - trainer.current_epoch - 1
        remaining = timer.time_remaining("train") or 0.0
        left, limit = max(remaining, 0.0), elapsed + remaining  # the limit as set, also once it is passed
        started, self.epoch_started = self.epoch_started, None
        if started is not None and (left > 0 or not self.epoch_time):  # nor does one the limit cut short
            self.epoch_time = elapsed - started  # validation included
        # rank zero's clock decides for every rank, as Lightning's Timer does
        may_stop = trainer.current_epoch + 1 >= (trainer.fit_loop.min_epochs or 0)
        if trainer.strategy.broadcast(may_stop and epochs_left > 0 and 0 < left < self.epoch_time):
            trainer.should_stop = self.stopped_early = True
        forecast = elapsed + epochs_left * self.epoch_time
        if (
            not trainer.is_global_zero
            or self.epoch_time <= 0
            or epochs_left * self.epoch_time <= left
            or forecast <= 1.25 * self.forecast
        ):
            return
        self.forecast = forecast
        log.warning(
            "at %s per epoch (precision %s), %d epochs take about %s, but trainer.max_time is %s: training will "
            "stop after epoch %d, mid-schedule, short of what the recipe reaches; restart with trainer.max_time=%s "
            "or lower trainer.max_epochs (after the stop, a resume with that limit and ckpt_path=last finishes it)",
            _clock(self.epoch_time), trainer.precision, trainer.max_epochs, _clock(forecast), _clock(limit),
            trainer.current_epoch + 1 + int(left // self.epoch_time), self._limit_for(forecast),
        )  # fmt: skip

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timer = self._timer(trainer)
        if timer is None or not trainer.is_global_zero:
            return
        if not self.stopped_early and (timer.time_remaining("train") or 0.0) > 0:
            return  # no limit, or stopped by something else (the last epoch, early stopping, Ctrl-C)
        # Lightning counts an epoch the limit stopped as done: count the batches instead
        done = trainer.fit_loop.epoch_loop.batch_progress.total.completed / max(trainer.num_training_batches, 1)
        if done >= trainer.max_epochs:
            return
        elapsed = timer.time_elapsed("train")
        forecast = elapsed + (trainer.max_epochs - done) * self.epoch_time
        how, resume = "", ""
        if self.stopped_early:
            how = f", at the end of epoch {round(done)}: the next would not have finished in time"
        elif not done.is_integer():  # Lightning resumes at the next epoch, so the rest of a cut one is skipped
            how, resume = ", mid-epoch", f" (from epoch {math.ceil(done) + 1}: the rest of the cut one is skipped)"
        log.warning(
            "trainer.max_time stopped training after %.1f of %d epochs (%s)%s; the model did not finish its "
            "schedule and is not what the recipe measures; to finish it%s: python -m covidseg.train <same overrides> "
            "trainer.max_time=%s ckpt_path=last",
            done, trainer.max_epochs, _clock(elapsed), how, resume, self._limit_for(forecast),
        )  # fmt: skip


def _clock(seconds: float) -> str:
    """``H:MM:SS``, as Lightning's Timer reports elapsed time."""
    return str(timedelta(seconds=round(seconds)))
