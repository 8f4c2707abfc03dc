"""covidseg's own callbacks, all in one place; the rest come from Lightning.

Training: the model spec in every checkpoint, save on interrupt, a time limit that warns and stops
at an epoch's end, progressive resizing, TensorBoard charts and images of validation. Testing and
evaluation (``trainer.test`` of a :class:`~covidseg.models.SegmentationModule` or of a
:class:`~covidseg.predictor.PredictorModule`, both of whose test steps return ``probability``,
``mask`` and ``presence``): per-image results, severity grading, and the threshold sweep of
``calibrate``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, Timer, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchmetrics.classification import BinaryPrecisionRecallCurve

from covidseg.errors import ConfigError
from covidseg.metrics import CLEAN_AREA_SHARE, SegmentationScores
from covidseg.model_spec import SPEC_KEY, InferenceSettings
from covidseg.predictor import Predictor
from covidseg.regions import drop_small_regions
from covidseg.run_files import write_run_info
from covidseg.severity import agreement, severity
from covidseg.visualize import comparison_row

log = logging.getLogger(__name__)


class EpochLines(ProgressBar):
    """Progress as one line per epoch (epoch, seconds, the epoch's metrics), for output that is not
    a terminal (a log file, CI), where a live progress bar breaks into fragments."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.started = time.perf_counter()

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()  # an epoch resumed midway starts no epoch: time its rest

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = " ".join(
            f"{name} {float(metrics[name]):.4f}"
            for name in sorted(metrics)
            if name.endswith(("loss_epoch", "/dice")) or name in ("val/loss",)
        )
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        print(
            f"epoch {trainer.current_epoch + 1}{epochs}  {time.perf_counter() - self.started:.1f} s  {shown}",
            flush=True,
        )


def progress_display() -> ProgressBar:
    """Rich's live progress bar in a terminal; one line per epoch otherwise (logs, CI)."""
    return RichProgressBar() if sys.stdout.isatty() else EpochLines()


class EmbedModelSpec(L.Callback):
    """Stores the model spec (plain data: network name and options, targets, sizes, threshold) in
    every checkpoint, so that a checkpoint alone rebuilds its network for eval, predict and export."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[SPEC_KEY] = self.spec


class EpochEndCheckpoint(L.Callback):
    """Writes a resumable ``last.ckpt`` at the end of every training epoch (after its validation) and
    when training ends, also mid-epoch (``max_steps``, ``max_time``).

    Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` at a validation end only
    when it has saved a checkpoint at that same step (its ``on_validation_end``), so whether the
    final step reaches ``last.ckpt`` depends on its other settings; this callback does not.
    ``trainer.save_checkpoint`` writes atomically, and only on rank zero.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved_step: int | None = None

    def _save(self, trainer: L.Trainer) -> None:
        if not trainer.sanity_checking and trainer.global_step != self.saved_step:
            # weights_only=False: resumable, with optimizer, scheduler and loop state
            trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)
            self.saved_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


class RecordRunStart(L.Callback):
    """Writes ``run_info.json`` (and, for a resume with changed settings, the config it now runs
    with) once training has really started, so a resume that fails leaves the run's files as they were."""

    def __init__(self, output_dir: str | Path, changed_config: dict[str, Any] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.changed_config = changed_config

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        write_run_info(self.output_dir)
        if self.changed_config is not None:
            recorded = self.output_dir / ".hydra" / "config.yaml"
            if recorded.is_file():  # the settings it started with stay beside the new ones
                os.replace(recorded, recorded.with_name(f"config.before_resume_at_step{trainer.global_step}.yaml"))
            recorded.parent.mkdir(parents=True, exist_ok=True)
            recorded.write_text(yaml.safe_dump(self.changed_config, sort_keys=False))


class SaveOnInterrupt(L.Callback):
    """Ctrl-C or SIGTERM (a closed laptop, a pre-empted job): finish the current batch, write a
    resumable ``last.ckpt`` and say how to resume. A second Ctrl-C stops at once.

    The first Ctrl-C is turned into SIGTERM, so that Lightning stops where its loop state is whole.
    A stop during an epoch's validation is saved as that epoch trained but not validated: as Lightning
    leaves the loop state, the resume would skip that validation, and a weight average would be
    saved in place of the trained weights it stands in for while validating.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self._previous_handler: Any = None
        self._validation_cut = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not earlier: after a stop, Lightning puts back the handlers it found when fitting began;
        # had this one been among them, a later Ctrl-C in the same process would find it in place
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._stop_after_batch)

    def _stop_after_batch(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)
        rank_zero_info("\nInterrupted: saving a checkpoint after this batch (Ctrl-C again to stop at once)")
        os.kill(os.getpid(), signal.SIGTERM)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt) or trainer.sanity_checking:
            return
        self._validation_cut = trainer.validating
        if self._validation_cut:  # put the trained weights back where the average was swapped in
            for callback in trainer.callbacks:
                if isinstance(callback, WeightAveraging):
                    callback.on_validation_epoch_end(trainer, pl_module)
        path = self.dirpath / "last.ckpt"
        try:
            trainer.save_checkpoint(path, weights_only=False)
        finally:
            self._validation_cut = False
        rank_zero_info(
            f"Saved {path} at epoch {trainer.current_epoch}, step {trainer.global_step}. Resume with:\n"
            f"  python -m covidseg.train <same overrides> ckpt_path={path}   (or ckpt_path=last)"
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._validation_cut:
            # validation's first batch in flight, none done: the resume validates the epoch over every batch
            in_flight = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
            checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"] = {
                "total": in_flight, "current": dict.fromkeys(in_flight, 0), "is_last_batch": False,
            }  # fmt: skip


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
        left = max(timer.time_remaining("train") or 0.0, 0.0)
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
            _clock(self.epoch_time), trainer.precision, trainer.max_epochs, _clock(forecast), _clock(elapsed + left),
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


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The SummaryWriters of the run's TensorBoard loggers (rank zero only, none in sanity checks)."""
    if trainer.sanity_checking or not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class ValidationImageLogger(L.Callback):
    """Each validation epoch, logs a grid of the same validation images to TensorBoard:
    one row per image, ``X-ray | truth | prediction``.

    Args:
        num_images: how many images, spread evenly over the validation set.
    """

    def __init__(self, num_images: int = 6) -> None:
        self.num_images = num_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        dataset = trainer.datamodule.dataset("Val")
        indices = np.linspace(0, len(dataset) - 1, min(self.num_images, len(dataset))).round().astype(int)
        samples = [dataset[int(index)] for index in indices]
        images = torch.stack([sample["image"] for sample in samples]).to(pl_module.device)
        settings = InferenceSettings(threshold=pl_module.hparams.threshold)
        predictor = Predictor([pl_module.network], pl_module.targets, settings)
        mask = predictor.predict(images).mask.cpu()
        channel = pl_module.targets.index(pl_module.primary_target)
        rows = [
            comparison_row(
                (sample["image"][0].numpy() * 255).astype(np.uint8),
                sample["mask"][channel].numpy(),
                mask[row, channel].numpy(),
            )
            for row, sample in enumerate(samples)
        ]
        for writer in writers:
            writer.add_image("val/examples", np.concatenate(rows, axis=0), trainer.global_step, dataformats="HWC")


class ValidationCharts(L.Callback):
    """Each validation epoch, logs the pixel precision-recall curve of the primary target and the
    histogram of per-image Dice to TensorBoard.

    Args:
        thresholds: number of evenly spaced probability thresholds of the curve (constant memory).
    """

    def __init__(self, thresholds: int = 51) -> None:
        self.curve = BinaryPrecisionRecallCurve(thresholds=thresholds)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, **_: Any
    ) -> None:
        if tensorboard_writers(trainer) and outputs is not None:
            channel = pl_module.targets.index(pl_module.primary_target)
            self.curve.to(pl_module.device).update(
                outputs["logits"][:, channel].sigmoid(), batch["mask"][:, channel].long()
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        # counts per threshold, as TensorBoard's raw PR curve wants them
        confmat = self.curve.confmat.cpu().double()  # (thresholds, 2, 2): [[tn, fp], [fn, tp]]
        tp, fp, tn, fn = confmat[:, 1, 1], confmat[:, 0, 1], confmat[:, 0, 0], confmat[:, 1, 0]
        precision = tp / (tp + fp).clamp(min=1)
        recall = tp / (tp + fn).clamp(min=1)
        dice = pl_module.scores["val_scores"][pl_module.primary_target].per_image()["dice"]
        for writer in writers:
            writer.add_pr_curve_raw(
                "val/pr_curve", tp, fp, tn, fn, precision, recall, trainer.global_step, num_thresholds=len(tp)
            )
            writer.add_histogram("val/per_image_dice", dice, trainer.global_step)
        self.curve.reset()


class ProgressiveResizing(L.Callback):
    """Trains at growing sides: ``schedule`` lists ``[first_epoch, side]`` pairs (``[[0, 96], [4, 128]]``:
    epochs 0-3 at 96, then 128). Small early epochs are cheap and learn the coarse shapes;
    validation, test and prediction always run at ``model.input_size``, which the last side should equal.
    """

    def __init__(self, schedule: Sequence[Sequence[int]]) -> None:
        if not schedule or any(len(pair) != 2 for pair in schedule):
            raise ConfigError(f"callbacks.progressive_resizing.schedule={schedule!r}: give [[first_epoch, side], ...]")
        self.schedule = dict(sorted((int(epoch), int(side)) for epoch, side in schedule))

    def side_at(self, epoch: int) -> int:
        """The training side of ``epoch``: that of the latest schedule entry at or before it."""
        started = [side for first, side in self.schedule.items() if first <= epoch]
        return started[-1] if started else next(iter(self.schedule.values()))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        side = self.side_at(trainer.current_epoch)
        pl_module.network.train_input_size = side
        pl_module.log("train/input_size", float(side), on_step=False, on_epoch=True)


class PerImageResults(L.Callback):
    """Collects each test image's name, Dice, IoU and areas per target (and presence probability)
    from the test steps' masks; :meth:`metrics` and :meth:`columns` summarise them.

    Args:
        targets: the mask channels' names, in order.
        image_size: side of the evaluated masks (for the "almost empty" area limit).
    """

    def __init__(self, targets: Sequence[str], image_size: int) -> None:
        self.targets = list(targets)
        self.primary_target = "infection" if "infection" in self.targets else self.targets[0]
        self.image_size = image_size
        self.scores = {target: SegmentationScores(from_logits=False) for target in self.targets}
        self.names: list[str] = []
        self.presence: list[float] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.names.extend(batch["name"])
        masks = outputs["mask"].float().cpu()
        for channel, target in enumerate(self.targets):
            self.scores[target].update(masks[:, channel], batch["mask"][:, channel].cpu())
        if outputs.get("presence") is not None:
            self.presence.extend(outputs["presence"].float().cpu().tolist())

    def metrics(self) -> dict[str, float]:
        """``test/dice`` etc. of the primary target, per target too when there are several, and on
        images with empty truth the share predicted almost empty (``test/empty_truth_clean``)."""
        metrics: dict[str, float] = {}
        for target, scores in self.scores.items():
            values = {key: float(value) for key, value in scores.compute().items()}
            if target == self.primary_target:
                metrics |= {f"test/{key}": value for key, value in values.items()}
            if len(self.targets) > 1:
                metrics |= {f"test/{key}_{target}": value for key, value in values.items()}
        rows = self.scores[self.primary_target].per_image()
        empty = rows["truth_area"] == 0
        if empty.any():
            clean = rows["predicted_area"][empty] < CLEAN_AREA_SHARE * self.image_size**2
            metrics |= {
                "test/empty_truth_images": float(empty.sum()),
                "test/empty_truth_clean": float(clean.double().mean()),
            }
        return metrics

    def columns(self) -> dict[str, list[float]]:
        """Per-image columns for the CSV: ``dice_<target>``, ``iou_<target>``, areas, presence."""
        columns = {
            f"{key}_{target}": values.tolist()
            for target, scores in self.scores.items()
            for key, values in scores.per_image().items()
        }
        return columns | ({"presence_probability": self.presence} if self.presence else {})


class SeverityOnTest(L.Callback):
    """For models with ``lung`` and ``infection`` targets, grades severity of each test image from
    the predicted masks and from the truth; rows in ``rows``, agreement logged as ``severity/*``."""

    def __init__(self, zone_threshold: float = 0.05) -> None:
        self.zone_threshold = zone_threshold
        self.rows: list[dict] = []
        self.truth_rows: list[dict] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self.truth_rows = [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        targets = pl_module.targets
        if not {"lung", "infection"} <= set(targets) or outputs is None:
            return
        lung, infection = targets.index("lung"), targets.index("infection")
        predicted = outputs["mask"].cpu().numpy()
        truth = batch["mask"].cpu().numpy() > 0.5
        for masks, rows in ((predicted, self.rows), (truth, self.truth_rows)):
            rows.extend(severity(m[lung], m[infection], self.zone_threshold) for m in masks)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rows:
            pl_module.log_dict(agreement(self.rows, self.truth_rows))

    def columns(self) -> dict[str, list[float]]:
        """``predicted_*`` and ``true_*`` per-image columns (empty for models without lungs)."""
        columns: dict[str, list[float]] = {}
        for prefix, rows in (("predicted", self.rows), ("true", self.truth_rows)):
            if rows:
                columns |= {f"{prefix}_{key}": [row[key] for row in rows] for key in rows[0]}
        return columns


class ThresholdSweep(L.Callback):
    """During ``trainer.test``, each image's predicted and overlapping areas at every threshold and
    small-region share, and its presence probability (``calibrate`` scores every choice from these)."""

    def __init__(self, thresholds: Sequence[float], channel: int, region_shares: Sequence[float] = (0.0,)) -> None:
        self.thresholds = torch.tensor(list(thresholds))
        self.region_shares = list(region_shares)
        self.channel = channel
        self.predicted: list[torch.Tensor] = []
        self.intersection: list[torch.Tensor] = []
        self.truth: list[torch.Tensor] = []
        self.presence: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        probability = outputs["probability"][:, self.channel].cpu()
        truth = batch["mask"][:, self.channel].cpu() > 0.5
        predicted = probability[:, None] > self.thresholds[None, :, None, None]  # (N, thresholds, H, W)
        # (N, shares, thresholds, H, W): each mask without its small regions, per share
        kept = torch.from_numpy(
            np.stack([[[drop_small_regions(mask, share) for mask in image] for share in self.region_shares]
                      for image in predicted.numpy()])
        )  # fmt: skip
        self.predicted.append(kept.flatten(3).sum(-1).double())
        self.intersection.append((kept & truth[:, None, None]).flatten(3).sum(-1).double())
        self.truth.append(truth.flatten(1).sum(-1).double())
        if outputs.get("presence") is not None:
            self.presence.append(outputs["presence"].double().cpu())

    def areas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted and intersection areas (images x region shares x thresholds) and truth areas (images)."""
        return tuple(torch.cat(parts).numpy() for parts in (self.predicted, self.intersection, self.truth))

    def presence_probability(self) -> np.ndarray | None:
        return torch.cat(self.presence).numpy() if self.presence else None
