"""Build the datamodule, module, callbacks, loggers and trainer from a composed config.

train, eval and predict all go through :func:`build_run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from covidseg.checkpoints import EmbedRunConfig, SaveOnInterrupt
from covidseg.data import CovidQuExDataModule

OmegaConf.register_new_resolver("len", len, replace=True)


@dataclass
class Run:
    datamodule: CovidQuExDataModule
    module: L.LightningModule
    trainer: L.Trainer


def instantiate_each(group: DictConfig | None) -> list:
    """Instantiate every entry of a ``name -> {_target_: ...}`` group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def build_run(cfg: DictConfig) -> Run:
    """Everything a Lightning run needs; the run's resolved config is embedded in checkpoints."""
    callbacks = instantiate_each(cfg.get("callbacks"))
    callbacks.append(EmbedRunConfig(OmegaConf.to_container(cfg, resolve=True)))
    if cfg.get("callbacks") and "model_checkpoint" in cfg.callbacks:
        callbacks.append(SaveOnInterrupt(cfg.callbacks.model_checkpoint.dirpath))
    loggers = instantiate_each(cfg.get("logger"))
    return Run(
        datamodule=instantiate(cfg.data),
        module=instantiate(cfg.model),
        trainer=instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False),
    )
