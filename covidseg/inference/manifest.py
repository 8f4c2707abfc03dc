"""predict's record of what it finished, so that a rerun into the same output continues where it stopped.

The folder's marker (:data:`~covidseg.inference.image_files.OUTPUT_MARKER`) holds a digest of the
model files, the model spec with the command's inference settings, the backend, the precision and the outputs asked for;
``.covidseg-predict.jsonl`` gets one line per finished image (predicted with its CSV row, or refused
with the reason; with the input's size and modification time), appended and flushed to disk once the
image's files are written. A rerun with the same model and settings reads the lines back and does
only the images they lack, or whose input changed since: after a crash or a kill, nothing finished
is done again and nothing is lost (an image killed between its files and its line is done again,
its files replaced by the same). A torn last line is ignored. Unreadable images and images whose
files could not be written are not recorded, so a rerun tries them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidseg.core.errors import DataError
from covidseg.core.files import printable
from covidseg.core.writing import write_atomic
from covidseg.inference.image_files import OUTPUT_MARKER

RECORD = ".covidseg-predict.jsonl"
STATUSES = ("predicted", "refused")


def run_digest(model_files: Iterable[Path], settings: dict[str, Any]) -> str:
    """What makes two runs' outputs the same: the model files' bytes and the settings."""
    digest = hashlib.sha256()
    for path in model_files:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _recorded_digest(output: Path) -> str | None:
    """The marker's digest; ``None`` for a marker without one (covidseg before records)."""
    try:
        return json.loads((output / OUTPUT_MARKER).read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class Manifest:
    """The finished images of an output folder by input (real path), appended to as images finish."""

    path: Path
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, output: Path, digest: str, resume: bool) -> Manifest:
        """The folder's record when it was made with ``digest`` and ``resume`` is true, else a new one
        (the marker rewritten). A record of another model or settings is refused unless ``resume`` is
        false. Call it holding the folder's lock."""
        recorded = _recorded_digest(output)
        record = cls(output / RECORD)
        if recorded is not None and recorded != digest and resume:
            raise DataError(
                f"output {printable(output)!r} holds predictions of another model or other settings: choose another "
                "output, or set resume=false to predict every image again into it"
            )
        if recorded == digest and resume:
            record.finished = record._read()
            return record
        write_atomic(output / OUTPUT_MARKER, json.dumps({"digest": digest}) + "\n")
        write_atomic(record.path, "")
        return record

    def _read(self) -> dict[str, dict[str, Any]]:
        finished: dict[str, dict[str, Any]] = {}
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return finished
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:  # torn by a kill mid-write: that image is done again
                continue
            if isinstance(entry, dict) and entry.get("status") in STATUSES and isinstance(entry.get("input"), str):
                finished[entry["input"]] = entry
        return finished

    @staticmethod
    def finished_entry(path: Path, status: str, **details: Any) -> dict[str, Any]:
        """A line for ``path``: its real path, size and modification time, ``status`` and ``details``."""
        stat = os.stat(path)
        return {"input": os.path.realpath(path), "stamp": [stat.st_size, stat.st_mtime_ns], "status": status} | details

    def entry(self, path: Path) -> dict[str, Any] | None:
        """The record of ``path`` when it is finished and unchanged since."""
        entry = self.finished.get(os.path.realpath(path))
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return entry if entry is not None and entry.get("stamp") == [stat.st_size, stat.st_mtime_ns] else None

    def record(self, entries: list[dict[str, Any]]) -> None:
        """Append finished images (``input``, ``stamp``, ``status``, ``row`` or ``reason``) and flush them."""
        if not entries:
            return
        with open(self.path, "a", encoding="utf-8") as file:
            file.write("".join(json.dumps(entry) + "\n" for entry in entries))
            file.flush()
            os.fsync(file.fileno())
        self.finished |= {entry["input"]: entry for entry in entries}
