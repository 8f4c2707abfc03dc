"""Compose a config outside a Hydra app, as the entry points compose it: for the benchmark and the
tests (Hydra's own ``compose`` API, with ``${hydra:...}`` resolvable)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import covidseg.builders  # noqa: F401  (registers the ${len:} resolver)
from covidseg import CONF_DIR


def compose_config(config_name: str, overrides: list[str], **paths: str | Path) -> DictConfig:
    """The composed ``config_name`` with ``overrides``; ``paths`` set ``paths.<key>`` (e.g.
    ``output_dir``, ``log_dir``, ``cache_dir``) in place of Hydra's run folder."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} as in a real run
    with open_dict(cfg):
        for key, value in paths.items():
            cfg.paths[key] = str(value)
        del cfg["hydra"]
    return cfg
