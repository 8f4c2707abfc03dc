"""One line and exit code 2 for every mistake in the user's data, files, paths or settings."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.text import Text

from covidseg.data import DataError
from covidseg.data.index import printable
from covidseg.model_spec import ModelFileError


class ConfigError(ValueError):
    """A setting that cannot work: the message names the key, the value and what is expected."""


USER_ERRORS = (DataError, ModelFileError, ConfigError, FloatingPointError)


def say_error(message: str) -> None:
    """``error: <message>`` on stderr, as plain text (no markup, any file name printable)."""
    text = Text.assemble(("error:", "bold red"), " ", printable(" ".join(message.split())))
    Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def whole_number(minimum: int) -> Callable[[str], int]:
    """An ``argparse`` type for the scripts' counts: a whole number >= ``minimum``, else argparse's
    own one-line usage error and exit code 2."""

    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return int(text)

    return parse


def _user_error(error: BaseException) -> BaseException | None:
    """The user error behind ``error``: itself, or the cause Hydra wrapped while building an object."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, USER_ERRORS) else None


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn mistakes in the user's data, paths or settings into one clear line and exit code 2."""
    try:
        yield
    except (*USER_ERRORS, InstantiationException) as error:
        cause = _user_error(error)
        if cause is None:
            raise
        say_error(str(cause))
        sys.exit(2)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        say_error(
            f"{error}. Free space or choose a writable paths.log_dir or output; "
            "checkpoints are written atomically, so the last complete one is intact."
        )
        sys.exit(2)
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)  # stopped on request; the checkpoint is saved
