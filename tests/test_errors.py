"""Errors are classified by type: the user's (one line, no retry) or ours (traceback in the log)."""

from __future__ import annotations

import errno
import pickle

import pytest

from streamer.errors import (
    ConfigError,
    GainError,
    InputError,
    MovieError,
    OutputError,
    PicksError,
    UserError,
    is_user_error,
    one_line,
)
from streamer.live.dispatcher import DispatcherError
from streamer.live.keys import KeysError
from streamer.output.committer import CommitError, FingerprintMismatch, OutputLocked
from streamer.output.status import StatusError


@pytest.mark.parametrize("exc", [
    ConfigError("config: box must be even"), MovieError("/data/m.tiff", "truncated after frame 3"),
    PicksError("/picks/m.star: no coordinates"), GainError("/gain.mrc: zero everywhere"),
    FingerprintMismatch("/out: other parameters"), OutputLocked("/out: locked"), CommitError("/out: disk full"),
    DispatcherError("bind without keys"), KeysError("/keys: missing"), StatusError("/out: no status"),
    FileNotFoundError(2, "No such file", "/data/x"), OSError(errno.ENOSPC, "No space left on device"),
])
def test_the_users_errors_are_one_line_without_the_type(exc: BaseException) -> None:
    assert is_user_error(exc)
    assert one_line(exc) == str(exc).splitlines()[0] and not one_line(exc).startswith(type(exc).__name__)


@pytest.mark.parametrize("exc", [ValueError("frames must be (F, h, w)"), KeyError("x"), RuntimeError("bug"),
                                 OSError(errno.EIO, "I/O error")])
def test_anything_else_is_ours_and_keeps_its_type(exc: BaseException) -> None:
    assert not is_user_error(exc)
    assert one_line(exc).startswith(type(exc).__name__ + ": ")


def test_hierarchy_keeps_the_builtin_bases_callers_catch() -> None:
    for cls in (ConfigError, MovieError, PicksError, GainError, KeysError, StatusError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
    for cls in (MovieError, PicksError, GainError):
        assert issubclass(cls, InputError)
    for cls in (FingerprintMismatch, OutputLocked, CommitError):
        assert issubclass(cls, OutputError) and issubclass(cls, RuntimeError)


def test_movie_error_survives_pickling_between_processes() -> None:
    exc = pickle.loads(pickle.dumps(MovieError("/data/m.eer", "frame 7 is truncated")))
    assert isinstance(exc, MovieError) and exc.path == "/data/m.eer" and str(exc) == "/data/m.eer: frame 7 is truncated"
