"""Train a segmentation model, then test its best checkpoint.

python -m covidseg.train [experiment=seed_paper] [data=synthetic] [trainer.max_epochs=3] [-m ...]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from covidseg.core.config import CONF_DIR, check_output_folder
from covidseg.core.errors import ConfigError, DataError, ModelFileError, hydra_errors_in_one_line, user_errors
from covidseg.core.framework_noise import quiet_framework_noise
from covidseg.core.run_files import print_summary, write_metrics, write_run_info
from covidseg.core.writing import exclusive_lock
from covidseg.inference.loader import best_checkpoint, check_checkpoint, resolve_ckpt_path
from covidseg.training.build import build_run
from covidseg.training.callbacks import RecordRunStart
from covidseg.training.resume import check_resume_settings, file_resume_folder
from covidseg.training.settings import check_settings

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def train(cfg: DictConfig) -> tuple[dict[str, float], float | None]:
    """Fit (unless ``train=false``) and test; returns all final metrics and the sweep objective."""
    check_settings(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("ckpt_path") is not None and in_multirun():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} in a multirun would make every job resume the same checkpoint: "
            "resume one run at a time (each job's folder has its own checkpoints/last.ckpt)"
        )
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if ckpt_path is not None:
        if ckpt_path.suffix != ".ckpt":
            raise ModelFileError(
                f"ckpt_path {str(ckpt_path)!r}: training resumes from a .ckpt written by covidseg.train"
            )
        check_checkpoint(ckpt_path)  # plain data and a valid model spec, before anything is built from it
    changed_config, resumed_by = None, None
    if cfg.train and ckpt_path is not None and (ckpt_path.parent.parent / ".hydra").is_dir():
        if not os.access(ckpt_path.parent.parent, os.W_OK):
            raise DataError(
                f"ckpt_path={str(ckpt_path)!r}: its run folder cannot be written (read-only?), and a resume continues "
                "it: copy the run somewhere writable and resume the copy"
            )
        changed_config = check_resume_settings(cfg, ckpt_path)
        resumed_by = Path(cfg.paths.output_dir)  # the folder Hydra made for this command
        with open_dict(cfg):  # continue the interrupted run's folder, checkpoints and TensorBoard run
            cfg.paths.output_dir = str(ckpt_path.parent.parent)
        log.info("resuming %s", cfg.paths.output_dir)
    if resumed_by is None or int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:  # DDP's other ranks: rank 0 holds it
        return _fit_and_test(cfg, ckpt_path, changed_config, resumed_by)
    with exclusive_lock(Path(cfg.paths.output_dir)) as locked:  # one resume of a run at a time
        if not locked:
            raise DataError(
                f"ckpt_path={str(ckpt_path)!r}: its run {cfg.paths.output_dir!r} is being resumed by another "
                "training right now; wait for it to finish"
            )
        return _fit_and_test(cfg, ckpt_path, changed_config, resumed_by)


def _fit_and_test(
    cfg: DictConfig, ckpt_path: Path | None, changed_config: dict[str, Any] | None, resumed_by: Path | None
) -> tuple[dict[str, float], float | None]:
    output_dir = Path(cfg.paths.output_dir)
    run = build_run(cfg, [RecordRunStart(output_dir, changed_config)] if cfg.train else [])
    trainer = run.trainer
    if trainer.is_global_zero and not cfg.train:  # one set of run files, also under DDP
        write_run_info(output_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if cfg.train:
        try:
            trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt_path, weights_only=True)
        except ValueError as error:  # OneCycleLR restored from a checkpoint of a shorter run
            if not str(error).startswith("Tried to step"):
                raise
            raise ConfigError(
                f"ckpt_path={str(ckpt_path)!r}: the learning-rate schedule restored from it ended ({error}): train "
                "as many epochs as its run did, or start a new run"
            ) from None
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    if best_path and not Path(os.path.realpath(best_path)).is_relative_to(os.path.realpath(output_dir)):
        # a resumed checkpoint records where its run's best one was; a copied or moved run tests its own
        try:
            best_path = str(best_checkpoint(output_dir))
        except ModelFileError:  # none of its own yet
            best_path = ""
    if cfg.test and run.datamodule.has_split(run.datamodule.split):
        trainer.test(run.module, datamodule=run.datamodule, ckpt_path=best_path or None, weights_only=True)
        metrics |= {name: float(value) for name, value in trainer.callback_metrics.items()}
    elif cfg.test:
        log.warning("test skipped: split %r is not under %s", run.datamodule.split, run.datamodule.root)

    objective = None
    if (
        checkpoint is not None
        and checkpoint.monitor == cfg.optimized_metric
        and checkpoint.best_model_score is not None
    ):
        objective = float(checkpoint.best_model_score)
    elif cfg.optimized_metric in metrics:
        objective = metrics[cfg.optimized_metric]
    if objective is None and cfg.optimized_metric:  # a sweep would get no value to optimise
        logged = ", ".join(sorted(name for name in metrics if name.startswith(("val/", "test/"))))
        log.warning("optimized_metric=%s was not logged by this run (it logged %s)", cfg.optimized_metric, logged)
    if objective is not None:  # TensorBoard's HParams tab pairs this with the hyper-parameters
        for logger in trainer.loggers:
            logger.log_metrics({"hp_metric": objective}, step=trainer.global_step)
    metrics["global_step"] = trainer.global_step
    if not trainer.is_global_zero:
        return metrics, objective
    write_metrics(output_dir, metrics)
    if resumed_by is not None and HydraConfig.initialized():
        file_resume_folder(resumed_by, output_dir)
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):  # the run's config and best checkpoint beside its metrics
            config = OmegaConf.to_container(cfg, resolve=True)
            logger.experiment.log_dict(logger.run_id, config, "config/config.yaml")
            if best_path:
                logger.experiment.log_artifact(logger.run_id, best_path, "checkpoints")
    print_summary(
        f"{cfg.task_name}: final metrics",
        metrics,
        {
            "best checkpoint": best_path,
            "config": output_dir / ".hydra" / "config.yaml",
            "TensorBoard": f"tensorboard --logdir {output_dir}" if trainer.loggers else None,
        },
    )
    return metrics, objective


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_framework_noise()
    with user_errors():
        check_output_folder(cfg)  # this run's own folder, before anything is written
        _, objective = train(cfg)
    return objective


if __name__ == "__main__":
    main()
