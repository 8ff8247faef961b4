"""Atomic file replacement: readers of ``path`` see either the old file or the whole new one, never a part.

The new content goes to a temp file in the same folder (``os.replace`` is atomic only within one file
system), named ``.<name>.<random>.tmp`` so that folder watchers and pick-file scanners skip it (dotfile and
``.tmp``). It is flushed and fsync'ed before ``os.replace``, and the folder is fsync'ed afterwards so the
rename itself survives a power cut. On any error the temp file is removed and ``path`` is left as it was.

Temp names never exceed the folder's NAME_MAX (255 bytes on common file systems): for a long ``path``
name the copied part is shortened (``side_name`` does the same for the files themselves, so a movie
name of any legal length gives legal output names).

The temp file is created with mode ``0o666`` less the umask, like ``open(path, "w")`` (``tempfile.mkstemp``
would give 0600 and make outputs unreadable to the rest of a facility's group). The folder must exist.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_MODES = ("wb", "w")
# filesystems that cannot sync a directory say so with these; the rename has happened regardless
_DIR_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the folder ``path`` so that renames and creations in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name (bytes) ``folder``'s file system takes (255 when it does not say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _fit(name: str, room: int) -> str:
    """``name`` cut to at most ``room`` UTF-8 bytes (whole characters)."""
    raw = name.encode()
    return name if len(raw) <= room else raw[:room].decode(errors="ignore")


def side_name(folder: str | os.PathLike[str], stem: str, suffix: str) -> str:
    """``stem + suffix`` as a file name in ``folder``: unchanged when it fits NAME_MAX less room for
    a temp name's 14 extra bytes, else the stem shortened and made unique with 8 hex digits of its hash."""
    import hashlib

    limit = name_max(folder) - 14
    name = stem + suffix
    if len(name.encode()) <= limit:
        return name
    tag = "~" + hashlib.blake2b(stem.encode(), digest_size=4).hexdigest()
    return _fit(stem, limit - len(tag.encode()) - len(suffix.encode())) + tag + suffix


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new, empty temp file next to ``path``: (its path, an open write descriptor)."""
    room = name_max(path.parent) - len(".") - len(".01234567.tmp")
    while True:
        tmp = path.with_name(f".{_fit(path.name, room)}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another writer drew the same name: draw again
            continue


@contextmanager
def replacing(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file object whose content replaces ``path`` atomically when the block ends without error.

    ``mode``: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8). On error (or if the block raises) the temp file is
    removed, ``path`` is untouched and the exception propagates.
    """
    if mode not in _MODES:
        raise ValueError(f"{path}: atomic replacement mode must be one of {_MODES} (got {mode!r})")
    path = Path(path)
    tmp, fd = _create_temp(path)
    try:
        fh = os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with fh:
            yield fh
            if fh.closed:  # the caller (or a library it handed fh to) closed it: sync by reopening
                with open(tmp, "rb") as again:
                    os.fsync(again.fileno())
            else:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Replace ``path`` atomically with ``data``."""
    with replacing(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` atomically with ``text`` encoded as UTF-8."""
    with replacing(path, "w") as fh:
        fh.write(text)
