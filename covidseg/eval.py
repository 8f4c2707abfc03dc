"""Evaluate a checkpoint on any split: metrics.json and a per-image CSV in the run folder.

python -m covidseg.eval ckpt_path=outputs/train/runs/.../checkpoints/last.ckpt data.split=Val
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from covidseg.builders import build_run
from covidseg.checkpoints import CONFIG_KEY, eval_options, load_checkpoint, load_weights, resolve_ckpt_path
from covidseg.models import SegmentationModule
from covidseg.report import write_eval_report
from covidseg.reporting import print_summary, user_errors, write_metrics, write_per_image, write_run_info
from covidseg.severity import SeverityOnTest


def apply_checkpoint_config(cfg: DictConfig, checkpoint: dict) -> None:
    """Take the network, its targets and the image size from the checkpoint's own config, with
    the command's eval-time settings (``flip_tta``, ``threshold``, ...) on top."""
    saved = checkpoint.get(CONFIG_KEY)
    if not saved:
        return
    with open_dict(cfg):
        cfg.model = OmegaConf.create({**saved["model"], **eval_options(cfg), "compile": False})
        cfg.data.targets = saved["data"]["targets"]
        cfg.data.image_size = saved["data"]["image_size"]


def false_positive_summary(module: SegmentationModule, image_size: int, area_limit: float = 0.01) -> dict[str, float]:
    """On images whose truth is empty (healthy lungs): how many, and the share predicted almost
    empty (infected area below ``area_limit`` of the image)."""
    target = module.primary_target
    truth = np.array(module.test_per_image[f"truth_area_{target}"])
    predicted = np.array(module.test_per_image[f"predicted_area_{target}"])[truth == 0]
    if not len(predicted):
        return {}
    return {
        "test/empty_truth_images": float(len(predicted)),
        "test/empty_truth_below_1pct": float(np.mean(predicted < area_limit * image_size**2)),
    }


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint on ``data.split`` and write its metrics and per-image rows."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    checkpoint = load_checkpoint(ckpt_path)
    apply_checkpoint_config(cfg, checkpoint)
    output_dir = Path(cfg.paths.output_dir)
    write_run_info(output_dir)
    run = build_run(cfg)
    load_weights(run.module, checkpoint, ckpt_path)
    run.trainer.test(run.module, datamodule=run.datamodule)
    metrics = {name: float(value) for name, value in run.trainer.callback_metrics.items()}
    metrics |= false_positive_summary(run.module, cfg.data.image_size)
    metrics_path = write_metrics(output_dir, metrics)
    module = run.module
    columns = dict(module.test_per_image)
    severity_pairs = None
    for callback in run.trainer.callbacks:
        if isinstance(callback, SeverityOnTest) and callback.rows:
            for prefix, rows in (("predicted", callback.rows), ("true", callback.truth_rows)):
                columns |= {f"{prefix}_{key}": [row[key] for row in rows] for key in rows[0]}
            severity_pairs = (columns["predicted_lung_infected_percent"], columns["true_lung_infected_percent"])
    csv_path = write_per_image(output_dir, module.test_names, columns)
    title = f"eval on {run.datamodule.split}: {ckpt_path}"
    report_path = write_eval_report(
        output_dir,
        title,
        metrics,
        module.test_names,
        module.test_per_image[f"dice_{module.primary_target}"],
        module,
        run.datamodule.dataset(run.datamodule.split),
        channel=module.targets.index(module.primary_target),
        threshold=module.hparams.threshold,
        severity_pairs=severity_pairs,
    )
    print_summary(title, metrics, {"metrics": metrics_path, "per-image": csv_path, "report": report_path})
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
