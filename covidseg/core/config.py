"""Hydra's config folder, found where covidseg is installed, and what the configs need resolved.

``conf/`` sits at the top of the repository, where Hydra users look for it, and the wheel carries
a copy inside the package (``covidseg/conf``, see pyproject.toml): :data:`CONF_DIR` is that copy
in an installed covidseg and the repository's folder in a checkout or an editable install, so every
command works from any folder. Importing this module registers the resolvers the configs use
(``${len:}``, ``${cpu_precision:}``, ``${tag_dict:}``, ``${wandb_offline:}``); every command reads
``CONF_DIR`` from here, so they are in place before Hydra composes a config.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from covidseg.core.hardware import cpu_precision

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def find_conf_dir() -> Path:
    """The installed copy (``covidseg/conf``) when there is one, else the checkout's ``conf/``."""
    installed = PACKAGE_DIR / "conf"
    return installed if (installed / "train.yaml").is_file() else PACKAGE_DIR.parent / "conf"


CONF_DIR = find_conf_dir()


def wandb_logged_in() -> bool:
    """An API key in the environment or a ``wandb login`` entry in ``~/.netrc``."""
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


OmegaConf.register_new_resolver("len", len, replace=True)
OmegaConf.register_new_resolver("cpu_precision", cpu_precision, replace=True)
OmegaConf.register_new_resolver("tag_dict", lambda tags: {str(tag): "true" for tag in tags or []}, replace=True)
OmegaConf.register_new_resolver("wandb_offline", lambda: not wandb_logged_in(), replace=True)


def compose_config(config_name: str, overrides: list[str], **paths: str | Path) -> DictConfig:
    """The composed ``config_name`` with ``overrides``, as a command composes it, outside a Hydra
    app (the benchmarks, the tests); ``paths`` set ``paths.<key>`` (e.g. ``output_dir``,
    ``log_dir``, ``cache_dir``) in place of Hydra's run folder, and ``${hydra:...}`` resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} as in a real run
    with open_dict(cfg):
        for key, value in paths.items():
            cfg.paths[key] = str(value)
        del cfg["hydra"]
    return cfg


def instantiate_each(group: DictConfig | None) -> list:
    """Instantiate every entry of a ``name -> {_target_: ...}`` group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]
