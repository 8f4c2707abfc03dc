"""Evaluate a model (or an ensemble) on any split: metrics.json, a per-image CSV and an HTML report.

python -m covidseg.eval ckpt_path=<ckpt|pretrained|[a.ckpt,b.ckpt]|k-fold multirun folder> data.split=Val
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from covidseg.core.config import CONF_DIR, check_output_folder, instantiate_each
from covidseg.core.errors import hydra_errors_in_one_line, user_errors
from covidseg.core.framework_noise import quiet_framework_noise
from covidseg.core.metrics import CLEAN_AREA_SHARE
from covidseg.core.run_files import add_to_run_info, print_summary, write_metrics, write_per_image, write_run_info
from covidseg.core.writing import write_atomic
from covidseg.evaluation.collectors import PerImageResults, SeverityOnTest
from covidseg.evaluation.intervals import check_resamples, eval_intervals
from covidseg.evaluation.test_loop import check_loop_precision, load_for_data, run_test_loop
from covidseg.inference.loader import inference_bf16
from covidseg.reports.eval_report import write_eval_report


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the model on ``data.split`` and write its metrics, per-image rows and report."""
    check_loop_precision(cfg)
    resamples = check_resamples(OmegaConf.select(cfg, "stats.resamples", default=2000))
    L.seed_everything(cfg.seed, workers=True)
    loaded, datamodule = load_for_data(cfg)
    spec = loaded.spec
    output_dir = Path(cfg.paths.output_dir)
    started = write_run_info(output_dir)
    xray_threshold = spec.xray_check.threshold if spec.xray_check is not None else None
    results = PerImageResults(spec.targets, spec.image_size, xray_threshold)
    callbacks = instantiate_each(cfg.get("callbacks"))
    logged, ran = run_test_loop(cfg, loaded, datamodule, [results, *callbacks])
    backend = ran.name
    ran_with = {"backend": backend, "bf16": inference_bf16(cfg) and backend != "onnx",  # ONNX Runtime: fp32
                "presence_threshold": ran.model.spec.inference.presence_threshold}  # fmt: skip
    add_to_run_info(output_dir, started, ran_with)
    metrics = logged | results.metrics()
    metrics_path = write_metrics(output_dir, metrics)
    columns = results.columns()
    severity_pairs = None
    for callback in callbacks:
        if isinstance(callback, SeverityOnTest) and callback.rows:
            columns |= callback.columns()
            severity_pairs = (columns["predicted_lung_infected_percent"], columns["true_lung_infected_percent"])
    csv_path = write_per_image(output_dir, results.names, columns)
    clean_area = CLEAN_AREA_SHARE * spec.image_size**2
    intervals = eval_intervals(columns, spec.primary_target, clean_area, resamples, cfg.seed)
    intervals_path = write_atomic(output_dir / "intervals.json", json.dumps(
        {"method": f"BCa bootstrap over images, {resamples} resamples, seed {cfg.seed}", "target": spec.primary_target,
         "image_size": spec.image_size, "intervals": intervals},
        indent=2) + "\n")  # fmt: skip
    title = f"eval on {datamodule.split}: {loaded.description}" + ("" if backend == "torch" else f" ({backend})")
    report_path = write_eval_report(
        output_dir,
        title,
        metrics,
        results.names,
        columns[f"dice_{spec.primary_target}"],
        ran.model.predictor,  # the int8 model carries its own gate
        datamodule.dataset(datamodule.split),
        severity_pairs=severity_pairs,
        intervals=intervals,
        forward=ran.forward,
    )
    locations = {
        "metrics": metrics_path,
        "95 % intervals": intervals_path,
        "per-image": csv_path,
        "report": report_path,
    }
    print_summary(title, metrics, locations, intervals)
    return metrics


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    quiet_framework_noise()
    with user_errors():
        check_output_folder(cfg)  # this run's own folder, before anything is written
        evaluate(cfg)


if __name__ == "__main__":
    main()
