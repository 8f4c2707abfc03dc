"""A file the user names, opened as untrusted: a regular file only, and only up to a size; YAML
from such a file as plain data; and any file name as printable text.

``Path.read_bytes`` on a FIFO named like an image blocks forever, and on a link to ``/dev/zero``
fills memory until the kernel kills the process. The file is opened without blocking and checked
through the open descriptor, so nothing can change between the check and the read. Model specs
and the configs a run folder recorded are YAML that anyone may have edited: they are read with
``yaml.SafeLoader`` (no tags that build objects) without anchors and aliases, which let a few
hundred bytes stand for a billion nodes ("billion laughs").
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import yaml


def printable(path: str | Path) -> str:
    """A file name as text that can always be printed or written to a CSV: bytes that are not
    UTF-8 (kept by Python as surrogates) appear escaped, e.g. ``\\udcff``."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


@contextmanager
def open_regular_file(path: Path, max_bytes: int, expected: str, error: type[Exception]) -> Iterator[BinaryIO]:
    """``path`` open for reading if it is a regular file of at most ``max_bytes``; else ``error``
    naming the file and what was ``expected`` (e.g. "an image file", "a model's spec")."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode):
        os.close(handle)
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
        raise error(f"{str(path)!r} is {kind}; expected {expected}")
    with os.fdopen(handle, "rb") as file:
        if info.st_size > max_bytes:
            raise error(f"{str(path)!r} is {info.st_size:,} bytes; {expected} is under {max_bytes:,}")
        yield file


def read_file_bytes(path: Path, max_bytes: int, expected: str, error: type[Exception]) -> bytes:
    """``path``'s bytes, checked as :func:`open_regular_file` does."""
    with open_regular_file(path, max_bytes, expected, error) as file:
        try:
            return file.read()
        except OSError as problem:  # a failing disk (EIO), a file gone stale on a network share
            reason = problem.strerror or problem
            raise error(f"{str(path)!r} could not be read: {reason}; expected {expected}") from None


class _PlainDataLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases: plain data only."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed here", mark)
        return super().compose_node(parent, index)


def read_plain_yaml(path: Path, max_bytes: int, expected: str, error: type[Exception]) -> Any:
    """``path``'s YAML as plain data (checked as :func:`open_regular_file` does); anything that is not
    plain YAML (a Python tag, an alias, nesting too deep to parse) is ``error`` naming the file."""
    text = read_file_bytes(path, max_bytes, expected, error)
    try:
        return yaml.load(text, Loader=_PlainDataLoader)  # noqa: S506 (a SafeLoader, aliases refused)
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError, ValueError) as problem:
        first_line = (str(problem).splitlines() or [type(problem).__name__])[0][:200]
        raise error(f"{str(path)!r} is not valid YAML for {expected}: {first_line}") from None
