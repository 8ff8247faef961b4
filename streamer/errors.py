"""The user's errors, as types: bad input files, bad configuration, an output folder that cannot
take the results, a network or key set-up that cannot work.

Every :class:`UserError` is reported as one line that starts with the user's file (or ``config:``)
and says what is wrong; the CLI prints it without a traceback, a worker reports it (``user_error``
set in the message) without one. Anything else is our bug: reported with its type, its traceback
kept in the log. The numerical engine (``gpu``) knows nothing of
these: it raises ``ValueError`` for arguments it cannot use, and the readers in ``streamer.formats``
check the user's files before the engine sees them.

This module imports nothing from ``streamer``, so every layer can raise these.

    UserError
    ├── ConfigError        a configuration value is missing, of the wrong type or out of range
    ├── InputError         an input file is unreadable or does not fit
    │   ├── MovieError     a movie (``MovieError(path, what)``)
    │   ├── PicksError     a pick file
    │   └── GainError      a gain reference or defect map
    ├── OutputError        the output folder cannot take the results
    │   └── (streamer.output: FingerprintMismatch, OutputLocked, CommitError)
    └── (streamer.live: DispatcherError, KeysError; streamer.output.status: StatusError)
"""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """Bad input, configuration or environment (not a bug): one line naming the user's file."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class InputError(UserError, ValueError):
    """An input file is unreadable, malformed or does not fit the session; the message starts with its path."""


class MovieError(InputError):
    """A movie file is unreadable, truncated or inconsistent. Message: ``"{path}: {what}"``."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = str(path)
        self.what = what
        super().__init__(f"{path}: {what}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.path, self.what)  # survives pickling between worker processes


class PicksError(InputError):
    """A pick file is unreadable or malformed; the message starts with the file's path."""


class GainError(InputError):
    """A gain reference or defect file is unreadable or does not fit the movie; the message starts with
    the file's path."""


class OutputError(UserError, RuntimeError):
    """The output folder cannot take the results (other parameters, another writer, a full disk)."""


_ENVIRONMENT = (errno.ENOSPC, errno.EDQUOT)  # disk full, quota exceeded


def is_user_error(exc: BaseException) -> bool:
    """True for bad input files, bad configuration, a full disk or an unwritable folder."""
    if isinstance(exc, UserError):
        return True
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno in _ENVIRONMENT
    )


def one_line(exc: BaseException) -> str:
    """The exception as one line (for ledgers, logs and summaries)."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if is_user_error(exc) and msg else f"{type(exc).__name__}: {msg}"
