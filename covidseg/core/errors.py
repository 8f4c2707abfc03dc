"""One line and exit code 2 for every mistake in the user's data, files, paths or settings."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from hydra.errors import HydraException, InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.text import Text

from covidseg.core.files import printable


class UserError(ValueError):
    """A mistake in what the user gave covidseg, said in one line that names the file or key, the
    value and what was expected. Every command turns one into that line and exit code 2."""


class DataError(UserError):
    """Bad input data: the message names the file or folder and says how to fix it."""


class ModelFileError(UserError):
    """A model file that covidseg will not load: the message names the file and the key."""


class ConfigError(UserError):
    """A setting that cannot work: the message names the key, the value and what is expected."""


# FloatingPointError: training diverged (a non-finite loss), which the user's settings caused
USER_ERRORS = (UserError, FloatingPointError)
# Hydra's and OmegaConf's refusals of the command line and the config: an override that does not
# parse or names no key, a config group option that does not exist, a value of the wrong type, an
# interpolation that does not resolve, a _target_ that cannot be built; and Lightning's refusal of a
# trainer setting it finds unworkable only once it runs (limit_train_batches=0.0001: no batch).
SETTING_ERRORS = (HydraException, OmegaConfBaseException, MisconfigurationException)
DISK_FULL_OR_LOCKED = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)
Params = ParamSpec("Params")
Result = TypeVar("Result")


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


def _setting_message(error: BaseException) -> str:
    """Hydra's message with the first line of the OmegaConf error behind it (which names the key),
    less Hydra's hint to set ``HYDRA_FULL_ERROR`` (already set: that is how the error got here)."""
    message = str(error).replace(", set env var HYDRA_FULL_ERROR=1 to see chained exception", "")
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in message:
        return f"{message} ({str(cause).splitlines()[0]})"
    return message


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn mistakes in the user's data, paths or settings into one clear line and exit code 2."""
    try:
        yield
    except (*USER_ERRORS, *SETTING_ERRORS) as error:
        cause = _user_error(error)  # None: a setting Hydra or OmegaConf refused
        say_error(str(cause) if cause is not None else _setting_message(error))
        sys.exit(2)
    except OSError as error:
        if error.errno in DISK_FULL_OR_LOCKED:
            say_error(
                f"{error}. Free space or choose a writable paths.log_dir, paths.cache_dir or output; "
                "checkpoints are written atomically, so the last complete one is intact."
            )
        elif error.filename is not None:  # a folder that cannot be made, a path below a file
            say_error(f"{error.filename!r}: {error.strerror}; choose another path in the settings")
        else:
            raise
        sys.exit(2)
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)  # stopped on request; the checkpoint is saved
    except KeyboardInterrupt:  # Ctrl-C outside training (training saves a checkpoint first), or a second one
        say_error("stopped by Ctrl-C; the files written so far are whole (each is written in one step)")
        sys.exit(128 + signal.SIGINT)


def hydra_errors_in_one_line(main: Callable[Params, Result]) -> Callable[Params, Result]:
    """Wraps a ``@hydra.main`` entry point so that what Hydra refuses before or around the task (an
    unknown key, a bad override, a missing config option, a run folder it cannot make) is one line
    and exit code 2 like every other setting: Hydra itself prints those over several lines, some as
    a traceback, with exit code 1. ``HYDRA_FULL_ERROR`` is Hydra's documented switch that makes it
    raise them instead; it is set only while the command runs."""

    @functools.wraps(main)
    def run(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        before = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            with user_errors():
                return main(*args, **kwargs)
        finally:
            if before is None:
                del os.environ["HYDRA_FULL_ERROR"]
            else:
                os.environ["HYDRA_FULL_ERROR"] = before

    return run
