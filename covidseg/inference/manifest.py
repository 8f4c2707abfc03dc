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

While a run is under way each process (rank) appends its lines to a part of its own,
``.covidseg-predict.parts/part-<rank>.jsonl``, so processes never write to one file; the command's
own process folds the parts into the record at the end, or the next run does after a kill.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidseg.core.errors import DataError
from covidseg.core.files import printable, read_file_bytes
from covidseg.core.writing import write_atomic
from covidseg.inference.image_files import OUTPUT_MARKER

RECORD = ".covidseg-predict.jsonl"
PARTS = ".covidseg-predict.parts"  # the ranks' lines of the run under way: part-<rank>.jsonl
STATUSES = ("predicted", "refused")  # finished: kept in the record
# unreadable, or its files not written: reported by this run, tried again by the next
UNFINISHED = ("skipped", "failed")


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


MAX_RECORD_BYTES = 1 << 33  # 8 GiB: about 20 million images' lines


def _well_formed(entry: Any) -> bool:
    """A line covidseg could have written: its status, its input, and what that status carries."""
    if not isinstance(entry, dict) or not isinstance(entry.get("input"), str):
        return False
    status = entry.get("status")
    if status == "predicted":
        return isinstance(entry.get("row"), dict) and isinstance(entry["row"].get("file"), str)
    return status in ("refused", *UNFINISHED) and isinstance(entry.get("reason"), str)


def _entries(path: Path) -> list[dict[str, Any]]:
    """The well-formed lines of a record or part (missing: none); a line torn by a kill mid-write,
    or not of covidseg's making, is left out. A pipe, a folder or an oversized file in its place is
    refused in one line."""
    try:
        text = read_file_bytes(path, MAX_RECORD_BYTES, "predict's record of finished images", DataError)
    except FileNotFoundError:
        return []
    entries = []
    for line in text.decode("utf-8", "replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # torn by a kill mid-write: that image is done again
            continue
        if _well_formed(entry):
            entries.append(entry)
    return entries


@dataclass
class Manifest:
    """The finished images of an output folder by input (real path), appended to as images finish."""

    path: Path
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, output: Path, digest: str, resume: bool) -> Manifest:
        """The folder's record when it was made with ``digest`` and ``resume`` is true (with the parts
        of a run killed before it folded them), else a new one (the marker rewritten). A record of
        another model or settings is refused unless ``resume`` is false. Call it holding the folder's lock."""
        recorded = _recorded_digest(output)
        record = cls(output / RECORD)
        if recorded is not None and recorded != digest and resume:
            raise DataError(
                f"output {printable(output)!r} holds predictions of another model or other settings: choose another "
                "output, or set resume=false to predict every image again into it"
            )
        if recorded == digest and resume:
            record.finished = cls.read(output).finished
            record.fold_parts()
            return record
        write_atomic(output / OUTPUT_MARKER, json.dumps({"digest": digest}) + "\n")
        write_atomic(record.path, "")
        record._remove_parts(record._parts())
        return record

    @classmethod
    def read(cls, output: Path) -> Manifest:
        """The record as it is on disk, for reading only (what each rank does before it starts)."""
        record = cls(output / RECORD)
        record.finished = {entry["input"]: entry for entry in _entries(record.path) if entry["status"] in STATUSES}
        return record

    @classmethod
    def parts_folder(cls, output: Path) -> Path:
        """``<output>/.covidseg-predict.parts``, made if missing; a link or a file in its place is
        refused (parts written through a link would land outside the output and be lost)."""
        folder = output / PARTS
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        if folder.is_symlink() or not folder.is_dir():
            raise DataError(
                f"{printable(folder)!r} is not a folder covidseg made (a link or a file): remove it, or choose another "
                "output"
            )
        return folder

    @classmethod
    def part(cls, output: Path, rank: int) -> Manifest:
        """Rank ``rank``'s part of the run under way in ``output``, appended to by :meth:`record`."""
        return cls(cls.parts_folder(output) / f"part-{rank}.jsonl")

    def _parts(self) -> list[Path]:
        folder = self.path.parent / PARTS
        return sorted(folder.glob("part-*.jsonl")) if folder.is_dir() and not folder.is_symlink() else []

    def fold_parts(self) -> list[dict[str, Any]]:
        """Fold the ranks' parts into the record (rewritten whole, atomically) and remove them;
        returns their lines of images left unfinished (skipped or failed), for the run to report."""
        parts = self._parts()
        entries = [entry for part in parts for entry in _entries(part)]
        finished = {entry["input"]: entry for entry in entries if entry["status"] in STATUSES}
        if finished:
            self.finished |= finished
            write_atomic(self.path, "".join(json.dumps(entry) + "\n" for entry in self.finished.values()))
        self._remove_parts(parts)
        return [entry for entry in entries if entry["status"] in UNFINISHED]

    def _remove_parts(self, parts: list[Path]) -> None:
        for part in parts:
            part.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not there, or holds something covidseg did not put there
            (self.path.parent / PARTS).rmdir()

    @staticmethod
    def finished_entry(path: Path, status: str, **details: Any) -> dict[str, Any]:
        """A line for ``path``: its real path, size and modification time, ``status`` and ``details``."""
        stat = os.stat(path)
        return {"input": os.path.realpath(path), "stamp": [stat.st_size, stat.st_mtime_ns], "status": status} | details

    @staticmethod
    def unfinished_entry(path: Path, status: str, reason: str) -> dict[str, Any]:
        """A line for an image this run could not finish (``skipped`` or ``failed``), by the name it was given."""
        return {"input": str(path), "status": status, "reason": reason}

    def entry(self, path: Path) -> dict[str, Any] | None:
        """The record of ``path`` when it is finished and unchanged since."""
        entry = self.finished.get(os.path.realpath(path))
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return entry if entry is not None and entry.get("stamp") == [stat.st_size, stat.st_mtime_ns] else None

    def record(self, entries: list[dict[str, Any]]) -> None:
        """Append lines (``input``, ``status`` and the status's details) and flush them to disk."""
        if not entries:
            return
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            handle = os.open(self.path, flags, 0o666)
        except OSError as error:  # a link in its place (ELOOP), a full or read-only disk
            raise DataError(f"{printable(self.path)!r} could not be appended to: {error.strerror}") from None
        with os.fdopen(handle, "a", encoding="utf-8") as file:
            if not stat.S_ISREG(os.fstat(handle).st_mode):
                raise DataError(f"{printable(self.path)!r} is not a regular file: remove it, or choose another output")
            try:
                file.write("".join(json.dumps(entry) + "\n" for entry in entries))
                file.flush()
                os.fsync(file.fileno())
            except OSError as error:
                raise DataError(f"{printable(self.path)!r} could not be written: {error.strerror}") from None
        self.finished |= {entry["input"]: entry for entry in entries if entry["status"] in STATUSES}
