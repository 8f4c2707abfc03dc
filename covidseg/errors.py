"""One line and exit code 2 for every mistake in the user's data, files, paths or settings."""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from covidseg.data import DataError
from covidseg.model_spec import ModelFileError


class ConfigError(ValueError):
    """A setting that cannot work: the message names the key, the value and what is expected."""


USER_ERRORS = (DataError, ModelFileError, ConfigError, FloatingPointError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn mistakes in the user's data, paths or settings into one clear line and exit code 2."""
    try:
        yield
    except USER_ERRORS as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        Console(stderr=True).print(
            f"[bold red]error:[/] {error}. Free space or choose a writable paths.log_dir; "
            "checkpoints are written atomically, so the last complete one is intact.",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)  # stopped on request; the checkpoint is saved
