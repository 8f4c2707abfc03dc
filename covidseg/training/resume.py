"""Resuming a run: its recorded settings against the ones it resumes with.

A resume continues the run's folder, checkpoints and TensorBoard run; what alters the model, the
data or their order must match the run's ``.hydra/config.yaml`` unless the user says otherwise
(``resume_with_changes=true``), and then the new config is recorded beside the old one. The recorded
config is read like any file from outside: plain YAML, limited in size, no aliases.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from covidseg.core.errors import ConfigError
from covidseg.core.files import read_plain_yaml
from covidseg.core.writing import RUN_MARKER

log = logging.getLogger(__name__)
MAX_RECORDED_CONFIG_BYTES = 1_000_000  # a run's .hydra/config.yaml is a few kB
# What a resume compares with the run's recorded config: what alters the model, the data or their
# order. Where the data lives and how it is loaded may change.
RESUME_FREE_DATA_KEYS = frozenset({"root", "cache_dir", "num_workers", "pin_memory", "eval_batch_size"})


def _settings(config: DictConfig) -> dict[str, Any]:
    """``model.*``, ``data.*`` (less :data:`RESUME_FREE_DATA_KEYS`) and ``seed`` as dotted keys."""
    flat: dict[str, Any] = {"seed": config.get("seed")}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for key in node:
                if prefix == "data." and key in RESUME_FREE_DATA_KEYS:
                    continue
                walk(node[key], f"{prefix}{key}.")
        elif isinstance(node, ListConfig):
            flat[prefix[:-1]] = OmegaConf.to_container(node, resolve=True)
        else:
            flat[prefix[:-1]] = node

    for section in ("model", "data"):
        walk(config.get(section), f"{section}.")
    return flat


SCHEDULE_LENGTH_KEYS = ("max_epochs", "limit_train_batches", "accumulate_grad_batches")


def check_schedule_length(recorded: DictConfig, cfg: DictConfig, ckpt_path: Path) -> None:
    """A learning-rate schedule fixed in steps when the run began (OneCycleLR's ``total_steps``)
    cannot run past its end: a resume that lengthens the run is refused before anything is written."""
    target = OmegaConf.select(cfg, "model.scheduler._target_", default=None)
    try:
        fixed = target is not None and "total_steps" in inspect.signature(get_class(target)).parameters
    except (ImportError, ValueError, TypeError):  # not a class: Hydra says so when it builds it
        return
    lengths = {
        key: (OmegaConf.select(recorded, f"trainer.{key}", default=None), OmegaConf.select(cfg, f"trainer.{key}"))
        for key in SCHEDULE_LENGTH_KEYS
    }
    changed = [f"trainer.{key} ({old!r} -> {new!r})" for key, (old, new) in lengths.items() if old != new]
    if fixed and changed:
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r}: its learning-rate schedule ({target.rsplit('.', 1)[-1]}) was fixed in "
            f"steps when the run began, so {', '.join(changed)} cannot change on resume: resume with the run's "
            "settings, or start a new run"
        )


def check_resume_settings(cfg: DictConfig, ckpt_path: Path) -> dict[str, Any] | None:
    """Refuse a resume whose model, data or seed settings differ from the run's recorded config
    (unless ``resume_with_changes=true``); returns the new config to record when they differ."""
    recorded_path = ckpt_path.parent.parent / ".hydra" / "config.yaml"
    if not recorded_path.exists() and not recorded_path.is_symlink():  # a FIFO or a link is read, and refused
        if cfg.get("resume_with_changes"):
            log.warning("resuming without a recorded config to compare with (resume_with_changes=true)")
            return OmegaConf.to_container(cfg, resolve=False)
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r}: the run's recorded config {str(recorded_path)!r} is missing, so the "
            "settings of this resume cannot be checked against the run's; put it back, or set "
            "resume_with_changes=true to resume with the settings given now"
        )
    plain = read_plain_yaml(recorded_path, MAX_RECORDED_CONFIG_BYTES, "a run's recorded config", ConfigError)
    if not isinstance(plain, dict):
        raise ConfigError(f"{str(recorded_path)!r} holds a {type(plain).__name__}, expected a run's recorded config")
    recorded = OmegaConf.create(plain)
    check_schedule_length(recorded, cfg, ckpt_path)
    before, now = _settings(recorded), _settings(cfg)
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    if not changed:
        return None
    shown = ", ".join(f"{key} ({before.get(key)!r} -> {now.get(key)!r})" for key in changed[:6])
    shown += " ..." if len(changed) > 6 else ""
    if not cfg.get("resume_with_changes"):
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r}: resuming with settings that differ from the run's "
            f"{str(recorded_path)!r}: {shown}; resume with the same settings or set resume_with_changes=true"
        )
    log.warning("resuming with changed settings (resume_with_changes=true): %s", shown)
    return OmegaConf.to_container(cfg, resolve=False)


def file_resume_folder(invocation_folder: Path, run_folder: Path) -> Path | None:
    """Moves the folder Hydra made for this resuming command (its config and log) into the run it
    continues, as ``resumes/<name>``, so that the task's newest folder is not an almost empty decoy.
    Only a folder this covidseg run claimed is moved (``.covidseg-run``); returns where it went."""
    if invocation_folder.resolve() == run_folder.resolve() or not (invocation_folder / RUN_MARKER).is_file():
        return None
    target = run_folder / "resumes" / invocation_folder.name
    try:
        target.parent.mkdir(exist_ok=True)
        invocation_folder.rename(target)  # the open log moves with it (same file system)
    except OSError as error:  # another file system, or a name taken: leave it where it is
        log.info("this resume's log stays in %s (%s)", invocation_folder, error.strerror or error)
        return None
    return target
