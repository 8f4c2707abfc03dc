"""Find, load and describe checkpoints without ever unpickling arbitrary objects."""

from __future__ import annotations

import os
import pickle
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from safetensors.torch import load_file

CONFIG_KEY = "covidseg_config"
PRETRAINED = Path(__file__).parent / "pretrained" / "best_cpu.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unsafe or does not fit the model: the message says which."""


class EmbedRunConfig(L.Callback):
    """Stores the run's resolved config in every checkpoint, so that a checkpoint alone
    rebuilds its network (eval, predict, export) with no pickled objects."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


class SaveOnInterrupt(L.Callback):
    """Ctrl-C or SIGTERM (a closed laptop, a pre-empted job): finish the current batch, write a
    resumable ``last.ckpt`` and say how to resume. A second Ctrl-C stops at once.

    The first Ctrl-C is turned into SIGTERM, so that Lightning stops where its loop state is whole.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self._previous_handler: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._stop_after_batch)

    def _stop_after_batch(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)
        rank_zero_info("\nInterrupted: saving a checkpoint after this batch (Ctrl-C again to stop at once)")
        os.kill(os.getpid(), signal.SIGTERM)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt) or trainer.sanity_checking:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"Saved {path} at epoch {trainer.current_epoch}, step {trainer.global_step}. Resume with:\n"
            f"  python -m covidseg.train <same overrides> ckpt_path={path}   (or ckpt_path=last)"
        )


def resolve_ckpt_path(value: str | None, log_dir: str | Path, task_name: str) -> Path | None:
    """``None`` stays ``None``; ``last`` is the newest ``last.ckpt`` of ``task_name``'s runs;
    ``pretrained`` is the model shipped in the package."""
    if value is None:
        return None
    if value == "pretrained":
        if not PRETRAINED.is_file():
            raise CheckpointError(f"ckpt_path=pretrained: {str(PRETRAINED)!r} is not installed")
        return PRETRAINED
    if value == "last":
        candidates = sorted(Path(log_dir, task_name).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise CheckpointError(f"ckpt_path=last: no checkpoints/last.ckpt under {str(Path(log_dir, task_name))!r}")
        return candidates[-1]
    path = Path(value).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path {value!r} does not exist or is not a file")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only.

    A ``.safetensors`` file (shipped weights) has its config in a ``.yaml`` file beside it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state_dict = {name: tensor.float() for name, tensor in load_file(path).items()}
        config = yaml.safe_load(path.with_suffix(".yaml").read_text())
        return {"state_dict": state_dict, CONFIG_KEY: config}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"ckpt_path {str(path)!r} holds objects other than tensors and plain containers; "
            f"refusing to unpickle it ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"ckpt_path {str(path)!r} is not a readable checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"ckpt_path {str(path)!r} has no 'state_dict': it is not a covidseg checkpoint")
    return checkpoint


def load_weights(module: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Copy the checkpoint's weights into ``module``, naming what does not fit."""
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first_lines = "; ".join(str(error).splitlines()[:3])
        raise CheckpointError(
            f"ckpt_path {str(path)!r} belongs to another model than the one configured: {first_lines}"
        ) from error


EVAL_OPTIONS = ("flip_tta", "restrict_to_lungs", "threshold", "presence_threshold")


def eval_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The eval-time model settings a command sets (keys of ``EVAL_OPTIONS``; null keeps the checkpoint's)."""
    return {key: cfg[key] for key in EVAL_OPTIONS if cfg.get(key) is not None}


def module_from_checkpoint(path: str | Path, **eval_options: Any) -> tuple[L.LightningModule, dict[str, Any]]:
    """Rebuild the module a checkpoint was trained as, in eval mode, and return its run config
    (with ``eval_options`` applied to its model section, so exports record them).

    ``eval_options`` set the module's eval-time settings (``flip_tta``, ``threshold``, ...).
    """
    checkpoint = load_checkpoint(path)
    config = checkpoint.get(CONFIG_KEY)
    if not config:
        raise CheckpointError(f"ckpt_path {str(path)!r} has no covidseg config: it was not written by covidseg.train")
    config = {**config, "model": {**config["model"], "compile": False, **eval_options}}
    module = instantiate(config["model"])
    load_weights(module, checkpoint, path)
    return module.eval(), config
