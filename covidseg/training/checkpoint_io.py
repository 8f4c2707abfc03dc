"""Checkpoints written whole or not at all, on the checkpoint's own file system.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction, whose temporary file lives
in the system's temporary folder: on another file system the final move is a copy, and a disk that
fills during it leaves a truncated, unloadable ``last.ckpt``. This ``CheckpointIO`` writes the
temporary file beside the checkpoint and renames it (:func:`covidseg.core.writing.write_atomic`),
so the previous checkpoint stays intact until the new one is complete.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from covidseg.core.writing import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:  # as Lightning's own: no storage options for local files
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # as Lightning's own saver does; a full disk then fails in Python, naming the file
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getvalue())
