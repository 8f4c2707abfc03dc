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

The chosen row's Dice and clean rate are measured on the images that chose it, so they flatter the
choice. The cross-fitted estimate beside it is honest: the choice is made on one half of the images
and scored on the other, both ways, with 95 % bootstrap intervals (``stats.resamples``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf
from pydantic import Field
from rich.console import Console
from rich.table import Table

from covidseg.core.config import CONF_DIR, check_output_folder
from covidseg.core.errors import ConfigError, hydra_errors_in_one_line, user_errors
from covidseg.core.framework_noise import quiet_framework_noise
from covidseg.core.metrics import CLEAN_AREA_SHARE
from covidseg.core.run_files import write_run_info
from covidseg.core.validation import CheckedSettings, check_command_keys
from covidseg.core.writing import write_atomic
from covidseg.evaluation.intervals import bootstrap_interval, check_resamples, mean_of
from covidseg.evaluation.test_loop import check_loop_precision, load_for_data, run_test_loop
from covidseg.evaluation.thresholds import Choice, SweepPass, ThresholdSweep, choose, cross_fitted, score_choices


class CalibrationSettings(CheckedSettings):
    """``calibrate``'s candidates (its data section is checked as every command's)."""

    thresholds: list[Annotated[float, Field(gt=0, lt=1)]] = Field(min_length=1)
    presence_thresholds: list[Annotated[float, Field(ge=0, le=1)]]
    min_region_shares: list[Annotated[float, Field(ge=0, lt=1)]]
    min_healthy_rate: float = Field(ge=0, le=1)


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    check_command_keys(cfg, CalibrationSettings)
    if str(cfg.data.get("split", "Val")).lower() == "test":  # the held-back split judges, it never chooses
        raise ConfigError(
            "data.split=Test: thresholds are chosen on Val (or Train); Test stays held back to judge the choice"
        )
    classes = set(cfg.data.get("eval_classes") or cfg.data.classes)
    if "COVID-19" not in classes or classes == {"COVID-19"}:  # checked before a pass over Val
        raise ConfigError(
            f"data.eval_classes={sorted(classes)}: calibration needs X-rays with and without infection, "
            "COVID-19 and Non-COVID or Normal"
        )
    if cfg.get("backend", "torch") != "torch":  # an exported graph holds flip_tta and the gate the sweep varies
        raise ConfigError(
            f"backend={cfg.get('backend')!r}: calibrate sweeps the torch Predictor's own settings; leave backend out "
            "(measure a backend's accuracy with eval backend=...)"
        )
    check_loop_precision(cfg)
    resamples = check_resamples(OmegaConf.select(cfg, "stats.resamples", default=2000))
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
    passes: list[SweepPass] = []
    for flip in flips:
        # ungated probabilities: score_choices applies each candidate gate itself
        predictor.settings = predictor.settings.model_copy(update={"presence_threshold": None, "flip_tta": flip})
        sweep = ThresholdSweep(thresholds, predictor.targets.index(predictor.primary_target), shares)
        run_test_loop(cfg, loaded, datamodule, [sweep])
        predicted, intersection, truth = sweep.areas()
        presence = sweep.presence_probability()
        passes.append(SweepPass(flip, predicted, intersection, truth, presence))
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
    max_area = CLEAN_AREA_SHARE * loaded.spec.image_size**2
    halves, dice, clean = cross_fitted(passes, shares, thresholds, list(cfg.presence_thresholds), max_area,
                                       cfg.min_healthy_rate, cfg.seed)  # fmt: skip
    crossed = {
        "method": f"chosen on one half of the images (drawn by seed {cfg.seed}), scored on the other, both ways; "
        f"95 % BCa bootstrap over images, {resamples} resamples",
        "dice": float(dice.mean()),
        "dice_interval": list(bootstrap_interval(mean_of, (dice,), resamples, cfg.seed)),
        "healthy_clean_rate": float(clean.mean()),
        "healthy_clean_interval": list(bootstrap_interval(mean_of, (clean.astype(float),), resamples, cfg.seed)),
        "choices": [asdict(choice) for choice in halves],
    }
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
        "cross_fitted": crossed,
        "all": [asdict(choice) for choice in choices],
    }
    path = output_dir / "calibration.json"
    write_atomic(path, json.dumps(result, indent=2) + "\n")
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
    crossed = result["cross_fitted"]
    dice_low, dice_high = crossed["dice_interval"]
    clean_low, clean_high = crossed["healthy_clean_interval"]
    console.print(
        f"cross-fitted (chosen on one half of {result['split']}, scored on the other): Dice {crossed['dice']:.4f} "
        f"[{dice_low:.4f}, {dice_high:.4f}], healthy clean {crossed['healthy_clean_rate']:.3f} "
        f"[{clean_low:.3f}, {clean_high:.3f}]; the chosen row's figures were measured on the images that chose it",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
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
        check_output_folder(cfg)  # this run's own folder, before anything is written
        calibrate(cfg)


if __name__ == "__main__":
    main()
