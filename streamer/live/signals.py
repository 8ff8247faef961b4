"""Stopping a session: drain first, abort on insistence.

The first SIGINT/SIGTERM (or the console's ``q``) drains: no new movies are dispatched, running ones
finish and are committed, exit 0. A second signal aborts at once: uncommitted work is redone by the
next run on the same ``--out`` (the ledger makes that safe). The writer (disk full) and the worker
supervisor (a worker that keeps dying) abort too, with their reason.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("lmc.session")


class StopFlags:
    """``drain`` (finish what runs, take nothing new), ``abort`` (stop now) and why."""

    def __init__(self) -> None:
        self.drain = False
        self.abort = False
        self.reason = ""
        self.signals = 0

    def request_drain(self, why: str) -> None:
        if not self.drain:
            self.drain = True
            log.warning("%s: draining (finishing running movies)", why)

    def request_abort(self, reason: str) -> None:
        self.abort = True
        self.reason = reason

    def on_signal(self, signum: int, frame: Any = None) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            self.drain = True
            log.warning("%s: draining (finishing running movies); send it again to abort", name)
        else:
            self.request_abort(f"aborted by a second {name}")
            log.warning("%s again: aborting; unfinished movies will be redone by the next run", name)


class SignalHandlers:
    """Routes SIGINT and SIGTERM to ``stop.on_signal`` while installed (main thread only: Python
    delivers signals there; elsewhere this does nothing) and puts the previous handlers back."""

    def __init__(self, stop: StopFlags) -> None:
        self.stop = stop
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self.stop.on_signal)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()
