"""A model over a labelled split in Lightning's test loop: what eval, calibrate and distill share.

The model comes from the loader with the command's inference settings; the datamodule is built
from ``data.*`` at the model's own image side and targets, so a model is always scored at the
size it was trained for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from covidseg.core.errors import ConfigError
from covidseg.data import CovidQuExDataModule
from covidseg.data.settings import check_data_settings
from covidseg.inference.loader import (
    LoadedModel,
    allow_missing_folds,
    inference_bf16,
    inference_overrides,
    load_predictor,
)
from covidseg.inference.predictor import PredictorModule
from covidseg.inference.segment import ChosenBackend, first_working_backend, int8_calibration_for

log = logging.getLogger(__name__)


def load_for_data(cfg: DictConfig) -> tuple[LoadedModel, CovidQuExDataModule]:
    """The model that ``ckpt_path`` names (with the command's inference settings), and the
    datamodule of ``data.*`` at the model's image size and targets."""
    loaded = load_predictor(
        cfg.ckpt_path, cfg.paths.log_dir, inference_bf16(cfg), allow_missing_folds(cfg), **inference_overrides(cfg)
    )
    with open_dict(cfg):
        cfg.data.targets = list(loaded.spec.targets)
        cfg.data.image_size = loaded.spec.image_size
    check_data_settings(cfg)
    return loaded, instantiate(cfg.data)


def check_loop_precision(cfg: DictConfig) -> None:
    """eval and calibrate choose the networks' precision with ``bf16`` (the Predictor's autocast);
    a ``trainer.precision`` of another kind would be silently overridden or stacked on it."""
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if precision not in ("32-true", "32"):
        raise ConfigError(
            f"trainer.precision={precision}: {cfg.task_name} keeps its loop in fp32 and runs the networks in bf16 "
            "with bf16=true"
        )


def run_test_loop(
    cfg: DictConfig, loaded: LoadedModel, datamodule: CovidQuExDataModule, callbacks: list
) -> tuple[dict[str, float], ChosenBackend]:
    """Run the model over ``data.split`` in Lightning's test loop: what callbacks logged, and the
    backend that ran (with the model as it ran). With ``backend=onnx|openvino|openvino_int8`` the
    networks run as the model's ONNX graph (exported once, cached; int8: quantized once on
    ``int8_calibration``, or with the model file's int8 ranges), so each runtime's accuracy is
    measured by the same command; ``auto`` falls back as predict and serve do
    (:func:`first_working_backend`)."""
    if OmegaConf.select(cfg, "trainer.limit_test_batches", default=None) == 0:
        raise ConfigError("trainer.limit_test_batches=0 scores no image: give a count >= 1 or a share in (0, 1]")
    backend = cfg.get("backend", "torch")
    calibration = int8_calibration_for(backend, cfg.get("int8_calibration"))
    chosen = first_working_backend(
        loaded, backend, inference_overrides(cfg), inference_bf16(cfg), Path(cfg.paths.cache_dir), calibration
    )
    if chosen.name == "openvino_int8" and calibration is None:
        log.info("openvino_int8 with the model file's ranges, at presence threshold %s",
                 chosen.model.spec.inference.presence_threshold)  # fmt: skip
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    try:
        trainer.test(PredictorModule(chosen.model.predictor, chosen.forward), datamodule=datamodule, verbose=False)
    except SystemExit:  # Lightning answers Ctrl-C with exit code 1 after its own message
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    return {name: float(value) for name, value in trainer.callback_metrics.items()}, chosen
