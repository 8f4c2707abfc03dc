"""A file the user names, opened as untrusted: a regular file only, and only up to a size; and
any file name as printable text.

``Path.read_bytes`` on a FIFO named like an image blocks forever, and on a link to ``/dev/zero``
fills memory until the kernel kills the process. The file is opened without blocking and checked
through the open descriptor, so nothing can change between the check and the read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def printable(path: str | Path) -> str:
    """A file name as text that can always be printed or written to a CSV: bytes that are not
    UTF-8 (kept by Python as surrogates) appear escaped, e.g. ``\\udcff``."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


@contextmanager
def open_regular_file(path: Path, max_bytes: int, expected: str, error: type[Exception]) -> Iterator[BinaryIO]:
    """``path`` open for reading if it is a regular file of at most ``max_bytes``; else ``error``
    naming the file and what was ``expected`` (e.g. "an image file", "a model's spec")."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{str(path)!r} is not a regular file (a pipe, socket or device); expected {expected}")
        if info.st_size > max_bytes:
            raise error(f"{str(path)!r} is {info.st_size:,} bytes; {expected} is under {max_bytes:,}")
        yield file


def read_file_bytes(path: Path, max_bytes: int, expected: str, error: type[Exception]) -> bytes:
    """``path``'s bytes, checked as :func:`open_regular_file` does."""
    with open_regular_file(path, max_bytes, expected, error) as file:
        return file.read()
