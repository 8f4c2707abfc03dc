"""Progressive resizing: cheap small epochs first, the model's own side at the end."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from covidseg.core.errors import ConfigError


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
