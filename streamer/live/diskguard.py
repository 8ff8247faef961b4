"""Pause dispatch before the output disk is full, resume when space returns.

Every ``every`` s the free space of the output folder's file system is read (``shutil.disk_usage``).
Below ``min_free`` bytes dispatch pauses: no new movie is handed out, movies already running finish
and are committed (their results need little room next to the threshold), nothing committed is
touched. It resumes once free space is back above the threshold plus 10% (so a folder hovering at
the threshold does not flap). Each change is one log line and a warning on the console and in
``status.json`` (``disk`` = {free_gb, min_free_gb, paused}).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("lmc.session")


class DiskGuard:
    def __init__(self, out: Path, min_free_gb: float, every: float = 1.0) -> None:
        self.out = out
        self.min_free = int(min_free_gb * 1e9)
        self.every = every
        self.paused = False
        self.free: int | None = None
        self._next = 0.0

    def check(self, now: float | None = None) -> str | None:
        """Re-read the free space when due; returns a message when the state changed (else None)."""
        now = time.monotonic() if now is None else now
        if now < self._next or self.min_free <= 0:
            return None
        self._next = now + self.every
        try:
            self.free = shutil.disk_usage(self.out).free
        except OSError:
            return None
        if not self.paused and self.free < self.min_free:
            self.paused = True
            msg = (f"{self.out}: only {self.free / 1e9:.2f} GB free (min_free_gb = {self.min_free / 1e9:g}): "
                   "dispatch paused until space returns; running movies finish, nothing committed is touched")
            log.warning("%s", msg)
            return msg
        if self.paused and self.free >= 1.1 * self.min_free:
            self.paused = False
            msg = f"{self.out}: {self.free / 1e9:.2f} GB free again: dispatch resumed"
            log.warning("%s", msg)
            return msg
        return None

    def as_dict(self) -> dict[str, object]:
        return {"free_gb": None if self.free is None else round(self.free / 1e9, 3),
                "min_free_gb": self.min_free / 1e9, "paused": self.paused}
