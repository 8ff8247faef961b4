"""Which exceptions are the user's input or environment (one clear line) rather than our bug."""

from __future__ import annotations

_USER_ERRORS = {
    "ConfigError",
    "MovieError",
    "PicksError",
    "GainError",
    "FingerprintMismatch",
    "OutputError",
    "OutputLocked",
    "CommitError",
    "DispatcherError",
    "KeysError",
    "StatusError",
    "JobRefused",
    "ColumnError",
}


def is_user_error(exc: BaseException) -> bool:
    """True for bad input files, bad configuration, a full disk or an unwritable folder."""
    if any(cls.__name__ in _USER_ERRORS for cls in type(exc).__mro__):
        return True
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno in (28, 122)  # ENOSPC, EDQUOT
    )


def one_line(exc: BaseException) -> str:
    """The exception as one line (for ledgers, logs and summaries)."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if is_user_error(exc) and msg else f"{type(exc).__name__}: {msg}"
