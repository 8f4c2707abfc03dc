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
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from covidseg.core.errors import user_errors
from covidseg.core.hardware import cpu_precision
from covidseg.core.writing import new_run_folder

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


class OwnRunFolder(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): before Hydra writes anything, the run folder
    (``hydra.run.dir``, or a multirun's ``hydra.sweep.dir``) is claimed for this run alone. Runs of
    one task started in the same second get ``<time>_2``, ``<time>_3`` ...; a folder named on the
    command line must be new or empty, so no file of the user's is overwritten and no recorded
    config is rewritten before a resume compares it. A folder that is claimed holds ``.covidseg-run``."""

    @staticmethod
    def _claim(config: DictConfig, key: str) -> None:
        chosen = any(override.split("=")[0].lstrip("+~") == f"hydra.{key}" for override in config.hydra.overrides.hydra)
        with user_errors():  # Hydra turns a callback's exception into a warning; the exit code 2 stops it
            folder = new_run_folder(Path(config.hydra[key.split(".")[0]].dir), chosen)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra[key.split(".")[0]].dir = str(folder)

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        # Lightning starts the other DDP ranks as this command again, in the folder rank zero claimed
        if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            self._claim(config, "run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self._claim(config, "sweep.dir")
