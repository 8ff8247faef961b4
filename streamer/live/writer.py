"""The single writer: a thread that owns the output folder's Committer.

The Committer's sqlite connection lives in one thread, and a slow disk must delay commits, not the
session's heartbeats; so the session queues operations here and collects their outcomes on its next
pass. One ledger transaction per movie (see ``streamer.output.committer`` for the commit protocol).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from streamer.config import Config
from streamer.output.committer import CommitError, Committer
from streamer.output.ledger import FingerprintMismatch

log = logging.getLogger("lmc.session")


def open_output(out: Path, cfg: Config, new: bool) -> tuple[Committer, Path]:
    """The Committer for ``out``; with ``new``, OUT-2, OUT-3, ... when OUT holds other parameters."""
    try:
        return Committer(out, cfg), out
    except FingerprintMismatch as exc:
        if not new:
            raise
        first = exc
    for k in range(2, 1000):
        cand = out.with_name(f"{out.name}-{k}")
        try:
            committer = Committer(cand, cfg)
        except FingerprintMismatch:
            continue
        return committer, cand
    raise first


class Writer:
    """The single writer: a thread that owns the Committer (its sqlite connection lives in one thread).

    The session queues operations with :meth:`put` and collects their outcomes with :meth:`outcomes`:
    ``("committed", job, n, t_done)``, ``("rejected", job, reason)`` (a result that does not fit the
    output), ``("commit_error", job, message)`` (disk full / unwritable: the session stops),
    ``("error", target, message)`` (anything else failing in the writer: the session stops), ``("ok", ...)``.
    """

    def __init__(self, out: Path, cfg: Config, new: bool) -> None:
        self.out = out
        self.cfg = cfg
        self.new = new
        self.ops: queue.Queue[tuple[str, Any, Any] | None] = queue.Queue()
        self.results: queue.Queue[tuple] = queue.Queue()
        self.pending = 0  # operations queued and not yet reported (main thread only)
        self.commits_pending = 0
        self.totals: dict[str, int] = {}
        self.done_movies: set[str] = set()
        self.columns: Any = None  # the folder's ColumnSet (None until the session declares one)
        self.picks_used: dict[str, tuple] = {}  # done movie -> the pick file it was processed with
        self.skip_rest = False
        self.opened = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        """Open the output folder (in the writer thread); raises what opening raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def put(self, kind: str, target: Any, payload: Any = None) -> None:
        """Queue ``commit`` (target a Job, payload its MovieResult), ``failed`` / ``skipped`` (target a
        movie path, payload the reason), ``forget`` (a movie path: process it again) or ``declare`` (a
        ColumnSet: the folder's columns)."""
        self.pending += 1
        if kind == "commit":
            self.commits_pending += 1
        self.ops.put((kind, target, payload))

    def outcomes(self) -> list[tuple]:
        out = []
        while True:
            try:
                item = self.results.get_nowait()
            except queue.Empty:
                return out
            self.pending -= 1
            if item[0] in ("committed", "rejected", "commit_error"):
                self.commits_pending -= 1
            out.append(item)

    def close(self, abort: bool = False, timeout: float = 60.0) -> None:
        """Finish the queued operations (all of them, or only the current one when ``abort``), then
        bring the snapshots up to date and release the folder."""
        self.skip_rest = abort
        self.ops.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            committer, self.out = open_output(self.out, self.cfg, self.new)
            self.done_movies = committer.done_movies()
            self.totals = committer.totals()
            self.columns = committer.columns
            self.picks_used = committer.picks_used()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.opened = True
        self._ready.set()
        try:
            while True:
                op = self.ops.get()
                if op is None or self.skip_rest:
                    break
                kind, target, payload = op
                try:
                    if kind == "commit":
                        committer.commit(payload, picks=getattr(target, "meta", {}).get("picks_source"))
                        self.results.put(("committed", target, payload.n, time.monotonic()))
                    elif kind == "failed":
                        committer.mark_failed(target, payload)
                        self.results.put(("ok", target))
                    elif kind == "skipped":
                        committer.mark_skipped(target, payload)
                        self.results.put(("ok", target))
                    elif kind == "forget":
                        committer.forget(target)
                        self.results.put(("ok", target))
                    elif kind == "declare":  # the folder's columns, fixed by the session
                        committer.declare_columns(target)
                        self.results.put(("ok", target))
                except CommitError as exc:
                    self.results.put(("commit_error", target, str(exc)))
                except ValueError as exc:
                    self.results.put(("rejected" if kind == "commit" else "error", target, str(exc)))
                except (sqlite3.Error, OSError) as exc:  # the disk is full or the folder unwritable: one line
                    what = getattr(target, "movie", target)
                    self.results.put(("error", target, f"{self.out / 'ledger.sqlite'}: could not record that {what} "
                                      f"was {kind}: {exc}. Free disk space / fix permissions, then rerun "
                                      "(everything committed is intact)"))
                except Exception as exc:
                    log.exception("writer: %s failed", kind)
                    self.results.put(("error", target, f"{type(exc).__name__}: {exc}"))
                self.totals = committer.totals()
        finally:
            try:
                self.totals = committer.totals()
                committer.close()
            except Exception:
                log.exception("%s: closing the output failed", self.out)
