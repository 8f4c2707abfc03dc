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
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from covidseg.core.errors import ConfigError, DataError, user_errors
from covidseg.core.hardware import cpu_precision
from covidseg.core.writing import RUN_MARKER, new_run_folder

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
    config is rewritten before a resume compares it. A folder that is claimed holds ``.covidseg-run``.
    The subfolders Hydra writes below it (``hydra.output_subdir``, ``hydra.sweep.subdir``) must stay
    below it."""

    @staticmethod
    def _claim(config: DictConfig, mode: str) -> None:
        key = f"hydra.{mode}.dir"
        chosen = [o for o in config.hydra.overrides.hydra if o.split("=")[0].lstrip("+~") in (key, f"hydra.{mode}")]
        with user_errors():  # Hydra turns a callback's exception into a warning; the exit code 2 stops it
            check_run_names(config)
            for subdir_key in ("hydra.output_subdir", *(("hydra.sweep.subdir",) if mode == "sweep" else ())):
                check_below(OmegaConf.select(config, subdir_key, throw_on_resolution_failure=False), subdir_key)
            folder = new_run_folder(Path(config.hydra[mode].dir), bool(chosen), key)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra[mode].dir = str(folder)
            if mode == "sweep":  # each job's config is composed again from these overrides
                config.hydra.overrides.hydra = [
                    *(o for o in config.hydra.overrides.hydra if o not in chosen),
                    f"hydra.sweep.dir={folder}",
                ]

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        # Lightning starts the other DDP ranks as this command again, in the folder rank zero claimed
        if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            self._claim(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self._claim(config, "sweep")


def check_run_names(config: DictConfig) -> None:
    """``task_name`` names a folder under ``paths.log_dir`` (no '/' or '..' to leave it), and
    ``paths.log_dir`` and ``paths.cache_dir`` are given (empty, run folders or phantoms and decoded
    images would go to the file system's root)."""
    task = OmegaConf.select(config, "task_name", throw_on_resolution_failure=False)
    if task is not None and (not re.fullmatch(r"[A-Za-z0-9_.-]+", str(task)) or str(task) in (".", "..")):
        raise ConfigError(f"task_name={str(task)!r}: expected letters, digits, '_', '-' or '.' (a folder name)")
    for key in ("paths.log_dir", "paths.cache_dir"):
        folder = OmegaConf.select(config, key, throw_on_resolution_failure=False)
        if folder is not None and not str(folder).strip():
            raise ConfigError(f"{key}='': expected a folder (an empty one would put its files at the root)")


def check_below(subdir: object, key: str) -> None:
    """A folder Hydra makes inside the run folder (``.hydra``, a job's number) stays inside it."""
    if subdir is None:
        return
    parts = Path(str(subdir)).parts
    if not parts or Path(str(subdir)).is_absolute() or ".." in parts:
        raise ConfigError(
            f"{key}={str(subdir)!r}: expected a name inside the run folder (no '/' at the start, no '..')"
        )


def check_output_folder(cfg: DictConfig) -> Path:
    """``paths.output_dir``, where a command writes, checked to be this run's own: the folder Hydra
    made for it (which holds nothing but Hydra's files yet), or a new or empty one named by
    ``paths.output_dir``. Outside a Hydra app (the tests, a notebook) the caller chose it."""
    output = Path(os.path.realpath(Path(str(cfg.paths.output_dir)).expanduser()))
    if not HydraConfig.initialized():
        return output
    runtime = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
    if runtime is None:
        return output
    if output != Path(os.path.realpath(runtime)):
        return new_run_folder(output, True, "paths.output_dir")
    hydras = (".hydra", RUN_MARKER, "multirun.yaml")
    theirs = [
        entry.name for entry in os.scandir(output) if entry.name not in hydras and not entry.name.endswith(".log")
    ]
    if theirs and not (output / RUN_MARKER).is_file():  # a job's folder that holds someone's files
        shown = ", ".join(sorted(theirs)[:5])
        raise DataError(f"run folder {str(output)!r} already holds files ({shown}): name a new or empty one")
    return output
