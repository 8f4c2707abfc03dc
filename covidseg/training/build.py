"""Build the datamodule, module, callbacks, loggers and trainer from a composed config, and the
model spec that every checkpoint of the run carries.

train and the benchmark go through :func:`build_run`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from covidseg.core.config import instantiate_each
from covidseg.core.errors import ModelFileError
from covidseg.data import CovidQuExDataModule
from covidseg.inference.model_spec import spec_from_run_config
from covidseg.models.registry import NETWORKS, network_name
from covidseg.training.callbacks import EmbedModelSpec, SaveOnInterrupt, TimeBudget
from covidseg.training.checkpoint_io import AtomicCheckpointIO
from covidseg.training.settings import check_network_sides

log = logging.getLogger(__name__)


@dataclass
class Run:
    datamodule: CovidQuExDataModule
    module: L.LightningModule
    trainer: L.Trainer


def training_spec(cfg: DictConfig, module: L.LightningModule) -> dict[str, Any] | None:
    """The model spec of a training run (plain data), or ``None`` when its network is not one of
    covidseg's registered networks or has options a model file cannot carry."""
    name = network_name(getattr(getattr(module, "network", None), "net", None))
    if name is None:
        log.warning("the network is not in covidseg's registry: checkpoints will not load in eval/predict/export")
        return None
    model, data = (OmegaConf.to_container(cfg[section], resolve=True) for section in ("model", "data"))
    try:
        return spec_from_run_config(name, model, data, "the training config").to_plain()
    except ModelFileError as error:
        log.warning("checkpoints will not load in eval/predict/export: %s", error)
        return None


def check_sides(cfg: DictConfig, module: L.LightningModule) -> None:
    """The sides a registered network will train and evaluate at fit its depth (before any work)."""
    net = getattr(getattr(module, "network", None), "net", None)
    name = network_name(net)
    if name is None:
        return
    sides = {cfg.model.get("input_size") or cfg.data.image_size}
    resizing = (cfg.get("callbacks") or {}).get("progressive_resizing")
    if resizing:
        sides |= {int(side) for _, side in resizing.schedule}
    check_network_sides(sorted(sides), NETWORKS[name].side_multiple(net.depth), name)


def build_run(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> Run:
    """Everything a Lightning run needs; the run's model spec is embedded in its checkpoints."""
    callbacks = [*instantiate_each(cfg.get("callbacks")), *(extra_callbacks or []), TimeBudget()]
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a progress bar callback then
        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    loggers = instantiate_each(cfg.get("logger"))
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    check_sides(cfg, module)
    spec = training_spec(cfg, module)
    if spec is not None:
        callbacks.append(EmbedModelSpec(spec))
    if cfg.get("callbacks") and "model_checkpoint" in cfg.callbacks:
        callbacks.append(SaveOnInterrupt(cfg.callbacks.model_checkpoint.dirpath))
    # checkpoints written beside themselves and renamed, unless the config brings its own plugins
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **plugins)
    return Run(datamodule=datamodule, module=module, trainer=trainer)
