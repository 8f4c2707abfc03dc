"""Every file covidseg writes, written whole or not at all, and never over a file it did not write.

A file is written to a temporary file beside it (the same file system, so the rename below is one
step, never a copy), flushed to the disk (or, for many small files such as predict's PNGs, with
one sync for the lot: :func:`flush_to_disk`), given the permissions a new file of the user's gets (the
umask's, where ``mkstemp`` alone would leave 0600) and renamed over its name. On a full or
read-only disk, an interrupt or any error, the temporary file is removed and the previous file
stays as it was. Run folders are claimed with an exclusive marker, so two runs started at once
never share one, and shared things (synthetic phantoms, a predict output) are written under a lock.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from covidseg.core.errors import DataError
from covidseg.core.files import printable


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back, once, when covidseg is imported
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_umask()


def _sync_folder(folder: Path) -> None:
    """The rename itself reaches the disk (a crash right after it keeps the new name)."""
    try:
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some file systems cannot sync a folder; the file itself is synced
        pass
    finally:
        os.close(handle)


@contextmanager
def atomic_output(path: Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a path (``torch.save``, ONNX,
    ``np.save``); when the block ends without error it replaces ``path`` in one step. ``durable=False``
    leaves the flush to the disk to the caller (:func:`flush_to_disk`)."""
    path = Path(path)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as error:  # a read-only or full folder: named as the file the user knows
        raise type(error)(error.errno, error.strerror, str(path)) from None
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        if durable:
            handle = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        os.chmod(temporary, NEW_FILE_MODE)
        os.replace(temporary, path)
    except OSError as error:  # named as the file the user knows, not the temporary one
        temporary.unlink(missing_ok=True)
        if error.errno is None:
            raise
        raise type(error)(error.errno, error.strerror, str(path)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        _sync_folder(path.parent)


def write_atomic(path: Path, content: bytes | str, durable: bool = True) -> Path:
    """``content`` as the whole of ``path`` (text as UTF-8), or ``path`` left as it was. Writers that
    serialise (``torch.save``, ONNX, safetensors) write to memory first and hand the bytes here: a
    full disk is then an ``OSError`` naming the file, never an error deep inside a C++ writer.
    ``durable=False``: whole to every reader at once, on the disk after :func:`flush_to_disk`."""
    with atomic_output(path, durable) as temporary:
        temporary.write_bytes(content.encode() if isinstance(content, str) else content)
    return Path(path)


def flush_to_disk() -> None:
    """Everything written so far reaches the disk: one ``sync`` for a batch of files written with
    ``durable=False``. A sync per file and per folder cost predict 7.6 ms of an int8 image's 32
    (three PNGs each); one per batch, before the batch is recorded as finished, keeps the promise
    that a finished image's files survive a crash."""
    os.sync()


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """A CSV table, written as :func:`write_atomic` writes."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(header)
    writer.writerows(rows)
    return write_atomic(path, table.getvalue())


@contextmanager
def exclusive_lock(folder: Path, wait: bool = False) -> Iterator[bool]:
    """Holds an exclusive lock on ``folder`` itself (nothing is left in it) while the block runs,
    waiting for it with ``wait``; else yields False at once, without the lock, when another process
    holds it."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            yield False
            return
        yield True
    finally:
        os.close(handle)  # closing releases the lock


RUN_MARKER = ".covidseg-run"  # in every run folder covidseg made: the run that claimed it owns it
MAX_SUFFIX = 1000  # runs of one task started in the same second get <time>_2, <time>_3 ...


def claim_new_folder(folder: Path) -> bool:
    """Make ``folder`` this run's own: True when it was missing or empty and no other run claimed it
    first (an exclusive marker decides between runs started at once); False, with nothing left
    behind, when it holds anything."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / RUN_MARKER
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE))
    except FileExistsError:
        return False
    if any(entry.name != RUN_MARKER for entry in os.scandir(folder)):
        marker.unlink()
        return False
    return True


def new_run_folder(folder: Path, chosen_by_user: bool, key: str = "hydra.run.dir") -> Path:
    """``folder``, claimed for this run; the default (time-stamped) name of a folder another run took
    gets a suffix, a folder the user named that holds anything is refused with one line."""
    folder = Path(os.path.realpath(Path(folder).expanduser()))
    candidates = [folder] if chosen_by_user else [folder, *(Path(f"{folder}_{n}") for n in range(2, MAX_SUFFIX))]
    try:
        for candidate in candidates:
            if claim_new_folder(candidate):
                return candidate
    except OSError as error:
        where, why = str(error.filename or folder), error.strerror or error
        other = f"another {key}" + (" or paths.log_dir" if key.startswith("hydra.") else "")
        raise DataError(f"{where!r}: {why}; choose {other}") from None
    if chosen_by_user:
        held = sorted(entry.name for entry in os.scandir(folder))
        shown = ", ".join(held[:5]) + (" ..." if len(held) > 5 else "")
        raise DataError(
            f"{key} {str(folder)!r} already holds files ({shown}): every run writes into a folder of "
            "its own; name a new or empty one (to continue a training run, give ckpt_path=<its last.ckpt>)"
        )
    raise DataError(f"{MAX_SUFFIX} runs already started in {str(folder)!r}'s second: try again")


def refuse_unless_ours(path: Path, purpose: str, written_by_covidseg: Callable[[bytes], bool]) -> None:
    """Before a command replaces ``path`` with a newer version of its own output: a file of the user's
    under that name (judged by its first 4 KB), a link or anything but a regular file is refused in
    one line and left as it is."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_file():
        raise DataError(f"{printable(path)!r} is not a regular file: move it away to {purpose}")
    with path.open("rb") as handle:
        if not written_by_covidseg(handle.read(4096)):
            raise DataError(
                f"{printable(path)!r} was not written by covidseg (or by a version that did not mark its files): "
                f"it is left as it is; move it away to {purpose}"
            )


def new_figures_folder(out: Path) -> Path:
    """``out/<date_time>``, claimed for one benchmark's figures: a rerun adds a folder beside the
    earlier ones and never replaces their figures."""
    return new_run_folder(Path(out) / time.strftime("%Y-%m-%d_%H-%M-%S"), chosen_by_user=False, key="--out")
