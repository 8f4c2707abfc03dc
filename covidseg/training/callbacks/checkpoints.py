"""What a checkpoint carries and when one is written: the model spec in every checkpoint, a
resumable ``last.ckpt`` at each epoch's end and on Ctrl-C or SIGTERM, and the run's files once
training has really started."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from covidseg.core.run_files import write_run_info
from covidseg.core.writing import write_atomic
from covidseg.inference.model_spec import SPEC_KEY


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
            write_atomic(recorded, yaml.safe_dump(self.changed_config, sort_keys=False))


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
