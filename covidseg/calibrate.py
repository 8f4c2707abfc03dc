"""Choose the pixel threshold and the presence threshold of a trained model on Val.

python -m covidseg.calibrate ckpt_path=PATH [min_healthy_rate=0.95]

One pass over Val (all three classes) records, per image and per candidate pixel threshold, the
predicted and overlapping infected areas, plus the presence probability. Every pair (pixel
threshold, presence threshold) is then scored: per-image Dice on images with infection, and the
share of images without infection predicted below ``area_limit`` of the image. The pair kept
is the best Dice among those that keep at least ``min_healthy_rate`` of healthy images clean
(the highest clean share when none does). Only Val is used: the Test split stays held back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from covidseg.builders import build_run
from covidseg.checkpoints import load_checkpoint, load_weights, resolve_ckpt_path
from covidseg.eval import apply_checkpoint_config
from covidseg.reporting import user_errors, write_run_info


class ThresholdSweep(L.Callback):
    """During ``trainer.test``, each image's predicted and overlapping areas at every threshold."""

    def __init__(self, thresholds: list[float], channel: int) -> None:
        self.thresholds = torch.tensor(thresholds)
        self.channel = channel
        self.predicted: list[torch.Tensor] = []
        self.intersection: list[torch.Tensor] = []
        self.truth: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0) -> None:
        probability = outputs["logits"][:, self.channel].sigmoid().flatten(1).cpu()
        truth = batch["mask"][:, self.channel].flatten(1).cpu() > 0.5
        predicted = probability[:, None, :] > self.thresholds[None, :, None]  # (N, thresholds, pixels)
        self.predicted.append(predicted.sum(-1).double())
        self.intersection.append((predicted & truth[:, None, :]).sum(-1).double())
        self.truth.append(truth.sum(-1).double())

    def areas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted and intersection areas (images x thresholds) and truth areas (images)."""
        return tuple(torch.cat(parts).numpy() for parts in (self.predicted, self.intersection, self.truth))


@dataclass
class Choice:
    threshold: float
    presence_threshold: float | None
    dice: float
    healthy_clean_rate: float


def score_choices(
    predicted: np.ndarray,
    intersection: np.ndarray,
    truth: np.ndarray,
    presence: np.ndarray | None,
    thresholds: list[float],
    presence_thresholds: list[float],
    max_area: float,
) -> list[Choice]:
    """Per-image Dice on infected images and clean share of healthy images, for every pair."""
    infected = truth > 0
    if not infected.any() or infected.all():
        raise ValueError("calibration needs images with and without infection: set data.eval_classes to all classes")
    gates: list[float | None] = [None] + (list(presence_thresholds) if presence is not None else [])
    choices = []
    for gate in gates:
        kept = np.ones(len(truth), bool) if gate is None else presence >= gate
        for column, threshold in enumerate(thresholds):
            area = np.where(kept, predicted[:, column], 0)
            overlap = np.where(kept, intersection[:, column], 0)
            total = area + truth
            dice = np.where(total == 0, 1.0, 2 * overlap / np.maximum(total, 1))
            choices.append(
                Choice(threshold, gate, float(dice[infected].mean()), float((area[~infected] < max_area).mean()))
            )
    return choices


def choose(choices: list[Choice], min_healthy_rate: float) -> Choice:
    """Best Dice among choices clean enough on healthy images; else the cleanest."""
    clean = [choice for choice in choices if choice.healthy_clean_rate >= min_healthy_rate]
    if clean:
        return max(clean, key=lambda choice: choice.dice)
    return max(choices, key=lambda choice: (choice.healthy_clean_rate, choice.dice))


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    checkpoint = load_checkpoint(ckpt_path)
    apply_checkpoint_config(cfg, checkpoint)
    with open_dict(cfg):
        cfg.model.presence_threshold = None  # sweep ungated logits; score_choices applies each gate
    output_dir = Path(cfg.paths.output_dir)
    write_run_info(output_dir)
    run = build_run(cfg)
    load_weights(run.module, checkpoint, ckpt_path)
    module = run.module
    thresholds = sorted({*cfg.thresholds, module.hparams.threshold})
    sweep = ThresholdSweep(thresholds, module.targets.index(module.primary_target))
    run.trainer.callbacks.append(sweep)
    run.trainer.test(module, datamodule=run.datamodule)
    predicted, intersection, truth = sweep.areas()
    presence = module.test_per_image.get("presence_probability")
    choices = score_choices(
        predicted,
        intersection,
        truth,
        None if presence is None else np.array(presence),
        thresholds,
        list(cfg.presence_thresholds),
        cfg.area_limit * cfg.data.image_size**2,
    )
    chosen = choose(choices, cfg.min_healthy_rate)
    untouched = next(c for c in choices if c.presence_threshold is None and c.threshold == module.hparams.threshold)
    result = {
        "ckpt_path": str(ckpt_path),
        "split": run.datamodule.split,
        "infected_images": int((truth > 0).sum()),
        "healthy_images": int((truth == 0).sum()),
        "min_healthy_rate": cfg.min_healthy_rate,
        "chosen": asdict(chosen),
        "as_trained": asdict(untouched),
        "all": [asdict(choice) for choice in choices],
    }
    path = output_dir / "calibration.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_choice(result, path)
    return result


def print_choice(result: dict[str, Any], path: Path) -> None:
    table = Table(title=f"calibration on {result['split']}: {result['ckpt_path']}")
    for column in ("", "threshold", "presence_threshold", "Dice (infected)", "healthy clean"):
        table.add_column(column, justify="right")
    for label in ("as_trained", "chosen"):
        row = result[label]
        table.add_row(label, f"{row['threshold']:.2f}", str(row["presence_threshold"]), f"{row['dice']:.4f}",
                      f"{row['healthy_clean_rate']:.3f}")  # fmt: skip
    console = Console()
    console.print(table)
    chosen = result["chosen"]
    settings = f"threshold={chosen['threshold']}"
    if chosen["presence_threshold"] is not None:
        settings += f" presence_threshold={chosen['presence_threshold']}"
    console.print(f"use with eval, predict or export: {settings}\nall pairs: {path}", highlight=False, soft_wrap=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        calibrate(cfg)


if __name__ == "__main__":
    main()
