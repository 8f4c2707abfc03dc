"""Choose a trained model's pixel threshold, presence threshold and small-region share on Val.

python -m covidseg.calibrate ckpt_path=PATH [min_healthy_rate=0.95] [flip_tta=true|false]

One pass over Val (all three classes) per flip setting (without and with horizontal flip TTA,
unless ``flip_tta`` names one) records, per image, candidate pixel threshold and candidate
small-region share (``min_region_shares``), the predicted and overlapping infected areas, plus the
presence probability. Every (flip TTA, region share, pixel threshold, presence threshold) is then
scored: per-image Dice on images with infection, and the share of images without infection
predicted below 1 % of the image (``CLEAN_AREA_SHARE``). The choice kept is the best Dice among
those that keep at least ``min_healthy_rate`` of healthy images clean (the highest clean share
when none does). Only Val is used: the Test split stays held back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from covidseg import CONF_DIR
from covidseg.callbacks import ThresholdSweep
from covidseg.config_checks import CalibrationSettings, check_command_keys
from covidseg.errors import hydra_errors_in_one_line, user_errors
from covidseg.eval import load_for_data, run_test_loop
from covidseg.framework_noise import quiet_framework_noise
from covidseg.metrics import CLEAN_AREA_SHARE
from covidseg.run_files import write_run_info


@dataclass
class Choice:
    threshold: float
    presence_threshold: float | None
    dice: float
    healthy_clean_rate: float
    flip_tta: bool = False
    min_region_share: float = 0.0


def score_choices(
    predicted: np.ndarray,
    intersection: np.ndarray,
    truth: np.ndarray,
    presence: np.ndarray | None,
    thresholds: list[float],
    presence_thresholds: list[float],
    max_area: float,
    flip_tta: bool = False,
    min_region_share: float = 0.0,
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
            clean = float((area[~infected] < max_area).mean())
            choices.append(Choice(threshold, gate, float(dice[infected].mean()), clean, flip_tta, min_region_share))
    return choices


def choose(choices: list[Choice], min_healthy_rate: float) -> Choice:
    """Best Dice among choices clean enough on healthy images; else the cleanest."""
    clean = [choice for choice in choices if choice.healthy_clean_rate >= min_healthy_rate]
    if clean:
        return max(clean, key=lambda choice: choice.dice)
    return max(choices, key=lambda choice: (choice.healthy_clean_rate, choice.dice))


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    check_command_keys(cfg, CalibrationSettings)
    L.seed_everything(cfg.seed, workers=True)
    loaded, datamodule = load_for_data(cfg)
    predictor = loaded.predictor
    output_dir = Path(cfg.paths.output_dir)
    write_run_info(output_dir)
    thresholds = sorted({*cfg.thresholds, predictor.threshold})
    own_share = predictor.settings.min_region_share
    shares = sorted({*cfg.min_region_shares, own_share})
    own_flip = predictor.settings.flip_tta
    flips = [own_flip] if cfg.flip_tta is not None else [False, True]
    choices: list[Choice] = []
    for flip in flips:
        # ungated probabilities: score_choices applies each candidate gate itself
        predictor.settings = predictor.settings.model_copy(update={"presence_threshold": None, "flip_tta": flip})
        sweep = ThresholdSweep(thresholds, predictor.targets.index(predictor.primary_target), shares)
        run_test_loop(cfg, loaded, datamodule, [sweep])
        predicted, intersection, truth = sweep.areas()
        presence = sweep.presence_probability()
        for column, share in enumerate(shares):
            choices += score_choices(
                predicted[:, column],
                intersection[:, column],
                truth,
                presence,
                thresholds,
                list(cfg.presence_thresholds),
                CLEAN_AREA_SHARE * loaded.spec.image_size**2,
                flip,
                share,
            )
    chosen = choose(choices, cfg.min_healthy_rate)
    untouched = next(
        c
        for c in choices
        if c.presence_threshold is None
        and c.threshold == predictor.threshold
        and c.flip_tta == own_flip
        and c.min_region_share == own_share
    )
    result = {
        "ckpt_path": loaded.description,
        "split": datamodule.split,
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
    for column in ("", "flip_tta", "threshold", "presence_threshold", "min_region_share", "Dice", "healthy clean"):
        table.add_column(column, justify="right")
    for label in ("as_trained", "chosen"):
        row = result[label]
        table.add_row(label, str(row["flip_tta"]).lower(), f"{row['threshold']:.2f}", str(row["presence_threshold"]),
                      str(row["min_region_share"]), f"{row['dice']:.4f}",
                      f"{row['healthy_clean_rate']:.3f}")  # fmt: skip
    console = Console()
    console.print(table)
    chosen = result["chosen"]
    settings = f"threshold={chosen['threshold']}"
    if chosen["presence_threshold"] is not None:
        settings += f" presence_threshold={chosen['presence_threshold']}"
    settings += f" flip_tta={str(chosen['flip_tta']).lower()} min_region_share={chosen['min_region_share']}"
    console.print(
        f"use with eval, predict or export: {settings}\nall pairs: {path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="calibrate")
def main(cfg: DictConfig) -> None:
    quiet_framework_noise()
    with user_errors():
        calibrate(cfg)


if __name__ == "__main__":
    main()
