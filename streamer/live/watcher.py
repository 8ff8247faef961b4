"""Find movies as they arrive, decide when each is ready, and join it with its picks.

Discovery: watchdog events (recursive, filtered by the movie pattern) mark paths to look at, and
a full rescan runs every ``poll`` seconds regardless, because inotify does not see files written
over NFS/SMB by another host. ``poll_only`` turns the events off. Temporary names (dotfiles,
``*.tmp``, ``*.part``, ``*downloading``, ``*.crdownload``, ``*~``) are ignored until renamed.

Each movie moves through these states::

    seen -> settling -> (incomplete) -> waiting_picks -> queued -> running -> done | failed
                                                                   \\-> skipped (no picks in time)

``settling``: size and mtime must stay unchanged for ``settle_seconds``; then the content must be
whole (``movies.movie_is_whole``: header frame count vs file size, TIFF/EER page count), otherwise
``incomplete`` (reported once after ``incomplete_timeout`` s, never processed while incomplete;
a later change sends it back to settling). ``waiting_picks``: whole, but no pick file yet; skipped
after ``picks_timeout`` s (0 = wait forever). ``queued``: ready, in ``ready()`` order, oldest mtime
first (or newest first). The session moves entries to running/done/failed with :meth:`mark`.

With ``once`` (``lmc run``), a file whose mtime is already ``settle_seconds`` old counts as settled,
and an incomplete movie or a movie without picks is reported at once instead of waited for.

Memory: an :class:`Entry` lives only while its movie is unfinished. A finished movie (done /
failed / skipped) keeps just its path in ``_done`` (with the pick source it was processed with,
to notice a rewritten pick file), ``_skipped`` or ``_failed``: the dedup record a watcher needs so
that a rescan never queues it again, ~100 bytes per movie beyond the path string. The ledger stays
the durable record: a restart seeds ``_done`` from it (``done=``).

The class is driven by :meth:`tick` from one thread; only the watchdog callback runs elsewhere,
and it only adds paths to a locked set.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lmc.watcher")

STATES = ("seen", "settling", "incomplete", "waiting_picks", "queued", "running", "done", "failed", "skipped")
PRE_DISPATCH = frozenset({"seen", "settling", "incomplete", "waiting_picks"})
TERMINAL = frozenset({"done", "failed", "skipped"})

_IGNORED_SUFFIXES = (".tmp", ".part", "downloading", ".crdownload", "~")
_MAGIC = set("*?[")


class _Unseen:
    """Value in ``Watcher._done`` for a movie done in an earlier session that no scan has found yet
    (it is counted as done only once found, as when every movie had an Entry)."""


_UNSEEN = _Unseen()


def ignored_name(name: str) -> bool:
    """True for names of files still being transferred (renamed when complete)."""
    low = name.lower()
    return name.startswith(".") or low.endswith(_IGNORED_SUFFIXES)


def split_pattern(spec: str) -> tuple[Path, list[str] | None]:
    """``raw/**/*.tiff`` -> (``raw``, [``**``, ``*.tiff``]); a folder -> (folder, None)."""
    p = Path(spec).expanduser()
    if not any(c in _MAGIC for c in spec):
        return p, None
    parts = p.parts
    root_parts: list[str] = []
    for i, part in enumerate(parts):
        if any(c in _MAGIC for c in part):
            return Path(*root_parts) if root_parts else Path("."), list(parts[i:])
        root_parts.append(part)
    return p, None


def match_parts(rel: tuple[str, ...], pattern: list[str]) -> bool:
    """Glob matching of path components; ``**`` matches zero or more folders."""
    if not pattern:
        return not rel
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(match_parts(rel[i:], rest) for i in range(len(rel) + 1))
    return bool(rel) and fnmatch.fnmatchcase(rel[0], head) and match_parts(rel[1:], rest)


@dataclass
class Entry:
    """One movie file. Times are monotonic seconds (``clock``)."""

    path: str
    state: str = "seen"
    first_seen: float = 0.0
    state_since: float = 0.0
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) last seen
    mtime: float = 0.0  # wall-clock seconds, for ordering
    stable_since: float = 0.0
    next_check: float = 0.0
    whole_stamp: tuple[int, int] | None = None  # stamp whose content was found whole
    checked_stamp: tuple[int, int] | None = None  # stamp whose content was last checked
    reason: str = ""
    reported: bool = False
    picks: Any = None  # PickSource
    ready_at: float | None = None  # when it became queued
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Notice:
    """Something the session should log or record: ``kind`` incomplete | skipped | picks_changed |
    picks_arrived | picks_unusable | missing_folder."""

    kind: str
    path: str
    message: str


class Watcher:
    """Movie discovery + readiness + picks join; see the module docstring."""

    def __init__(
        self,
        movies: str,
        picks: str | None = None,
        *,
        picks_format: str = "auto",
        settle_seconds: float = 5.0,
        incomplete_timeout: float = 600.0,
        picks_timeout: float = 0.0,
        newest_first: bool = False,
        poll: float = 5.0,
        poll_only: bool = False,
        reprocess_changed_picks: bool = False,
        once: bool = False,
        done: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root, self.pattern = split_pattern(movies)
        self.root = Path(os.path.abspath(self.root))
        self.picks_dir = picks
        self.picks_format = picks_format
        self.settle = float(settle_seconds)
        self.incomplete_timeout = float(incomplete_timeout)
        self.picks_timeout = float(picks_timeout)
        self.newest_first = newest_first
        self.poll = float(poll)
        self.poll_only = poll_only
        self.reprocess = reprocess_changed_picks
        self.once = once
        self.clock = clock
        self.entries: dict[str, Entry] = {}  # unfinished movies only (see the module docstring)
        self._active: set[str] = set()  # paths in a PRE_DISPATCH state: the only ones a tick looks at
        self.index: Any = None
        # finished movies: path -> PickSource it was processed with (None: unknown; _UNSEEN: from the ledger)
        self._done: dict[str, Any] = dict.fromkeys((os.path.abspath(m) for m in done), _UNSEEN)
        self._skipped: set[str] = set()
        self._failed: set[str] = set()
        self._finished_counts = dict.fromkeys(TERMINAL, 0)
        self._dirty: set[str] = set()
        self._picks_dirty = True
        self._lock = threading.Lock()
        self._observer: Any = None
        self._watched: set[str] = set()
        self._next_scan = 0.0
        self._next_picks = 0.0
        self._unusable_reported: set[str] = set()
        self._missing_reported = False
        self.scans = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start filesystem events (unless ``poll_only`` or ``once``); the first tick scans."""
        if not self.poll_only and not self.once:
            from watchdog.observers import Observer

            self._observer = Observer()
            self._observer.daemon = True
            self._observer.start()
            self._watch_folders()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _watch_folders(self) -> None:
        if self._observer is None:
            return
        from watchdog.events import FileSystemEventHandler

        watcher = self

        class _Handler(FileSystemEventHandler):
            def __init__(self, kind: str) -> None:
                self.kind = kind

            def on_any_event(self, event: Any) -> None:
                if event.is_directory:
                    return
                paths = [getattr(event, "dest_path", "") or "", event.src_path]
                watcher._on_event(self.kind, [os.fsdecode(p) for p in paths if p])

        folders = [("movies", str(self.root))]
        if self.picks_dir:
            p = Path(self.picks_dir)
            folders.append(("picks", str(p if p.is_dir() else p.parent)))
        for kind, folder in folders:
            key = f"{kind}:{folder}"
            if key in self._watched or not os.path.isdir(folder):
                continue
            try:
                self._observer.schedule(_Handler(kind), folder, recursive=True)
                self._watched.add(key)
            except OSError as exc:  # e.g. inotify watch limit: the rescan still finds everything
                log.warning("%s: cannot watch for events (%s); relying on the %.0f s rescan", folder, exc, self.poll)
                self._watched.add(key)

    def _on_event(self, kind: str, paths: list[str]) -> None:
        with self._lock:
            if kind == "picks":
                self._picks_dirty = True
            else:
                self._dirty.update(paths)

    # -- discovery ------------------------------------------------------------------------------
    def _wanted(self, path: str) -> bool:
        name = os.path.basename(path)
        if ignored_name(name):
            return False
        root = str(self.root)
        if path == root:
            parts: tuple[str, ...] = ()
        else:
            prefix = root if root.endswith(os.sep) else root + os.sep
            if not path.startswith(prefix):
                return False
            parts = tuple(p for p in path[len(prefix):].split(os.sep) if p)
        if any(part.startswith(".") for part in parts[:-1]):
            return False
        if self.pattern is not None:
            return match_parts(parts, self.pattern)
        from streamer.formats.movies import is_movie

        return is_movie(path)

    def _scan(self) -> set[str]:
        found: set[str] = set()
        self.scans += 1
        if self.root.is_file():
            return {str(self.root)} if not ignored_name(self.root.name) else found
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                path = os.path.join(folder, name)
                # a path already known was wanted when first found: skip the name checks every rescan
                if self._known(path) or self._wanted(path):
                    found.add(path)
        return found

    def _known(self, path: str) -> bool:
        return path in self.entries or path in self._done or path in self._skipped or path in self._failed

    def _add(self, path: str, now: float) -> Entry | None:
        """The Entry of ``path``, made when new; None for a finished movie (it is not looked at again)."""
        e = self.entries.get(path)
        if e is not None:
            return e
        if path in self._done:
            if self._done[path] is _UNSEEN:  # done in an earlier session, found now: counts as done
                self._done[path] = None
                self._finished_counts["done"] += 1
            return None
        if path in self._skipped or path in self._failed:
            return None
        e = Entry(path=path, first_seen=now, state_since=now, stable_since=now)
        self.entries[path] = e
        self._active.add(path)
        return e

    def _drop(self, path: str) -> None:
        self.entries.pop(path, None)
        self._active.discard(path)

    def _finished_state(self, path: str) -> str | None:
        if path in self._done:
            return "done"
        if path in self._skipped:
            return "skipped"
        return "failed" if path in self._failed else None

    def _unfinish(self, path: str) -> None:
        """Remove ``path``'s finished record (and its count)."""
        if path in self._done:
            if self._done.pop(path) is not _UNSEEN:
                self._finished_counts["done"] -= 1
        elif path in self._skipped:
            self._skipped.discard(path)
            self._finished_counts["skipped"] -= 1
        elif path in self._failed:
            self._failed.discard(path)
            self._finished_counts["failed"] -= 1

    def _finish(self, path: str, state: str, picks: Any = None) -> None:
        """Record ``path`` as finished in ``state`` (done / failed / skipped) and drop its Entry."""
        self._drop(path)
        self._unfinish(path)
        if state == "done":
            self._done[path] = picks
        elif state == "skipped":
            self._skipped.add(path)
        else:
            self._failed.add(path)
        self._finished_counts[state] += 1

    def revive(self, path: str) -> None:
        """Process a finished movie again (its picks changed while no session ran)."""
        self._revive(os.path.abspath(path), self.clock())

    def _revive(self, path: str, now: float) -> None:
        """A finished movie to process again (its picks changed): a fresh Entry, already settled
        (the file was whole when processed; a change since is still caught by the stat). A movie
        file gone since is just forgotten."""
        self._unfinish(path)
        try:
            st = os.stat(path)
        except OSError:
            return
        self.entries[path] = Entry(path=path, first_seen=now, state_since=now, stable_since=now,
                                   stamp=(st.st_size, st.st_mtime_ns), mtime=st.st_mtime)
        self._active.add(path)

    # -- the tick -------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> list[Notice]:
        """Discover, re-stat what is settling, move entries along; returns what to report."""
        now = self.clock() if now is None else now
        notices: list[Notice] = []
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            picks_dirty, self._picks_dirty = self._picks_dirty, False
        rescan = now >= self._next_scan
        if rescan:
            self._next_scan = now + self.poll
            if not self.root.exists():
                if not self._missing_reported:
                    notices.append(Notice("missing_folder", str(self.root), f"{self.root}: folder does not exist (yet)"))
                    self._missing_reported = True
            else:
                self._watch_folders()
                found = self._scan()
                for path in found:
                    self._add(path, now)
                for path in list(self._active):
                    if path not in found:
                        self._drop(path)  # renamed or deleted before it was ready
        for path in dirty:
            path = os.path.abspath(path)
            if path in self.entries:
                self.entries[path].next_check = 0.0
            elif self._wanted(path) and os.path.isfile(path):
                self._add(path, now)
        picks_changed: list[str] = []
        if self.picks_dir and (rescan or (picks_dirty and now >= self._next_picks) or self.index is None):
            picks_changed = self._refresh_picks(notices)
            self._next_picks = now + 0.5
        if picks_changed:
            self._picks_changed(picks_changed, now, notices)
        for path in list(self._active):
            e = self.entries.get(path)
            if e is not None and e.state in PRE_DISPATCH:
                self._advance(e, now, notices, picks_checked=rescan or bool(picks_changed))
        return notices

    def _refresh_picks(self, notices: list[Notice]) -> list[str]:
        from streamer.formats.picks import PickIndex, PicksError

        assert self.picks_dir is not None
        if self.index is None:
            if not os.path.exists(self.picks_dir):
                if not self._missing_reported:
                    notices.append(Notice("missing_folder", self.picks_dir, f"{self.picks_dir}: picks folder does not exist (yet)"))
                    self._missing_reported = True
                return []
            try:
                self.index = PickIndex(self.picks_dir, format=self.picks_format)
            except (PicksError, OSError) as exc:
                notices.append(Notice("picks_unusable", self.picks_dir, str(exc)))
                return []
            changed = sorted(self.index.stems())
        else:
            changed = self.index.refresh()
        for path, reason in self.index.unusable.items():
            if path not in self._unusable_reported:
                self._unusable_reported.add(path)
                # the readers' reasons already start with the file's path: say it once
                text = reason if reason.startswith(path) else f"{path}: {reason}"
                notices.append(Notice("picks_unusable", path, text))
        return changed

    def _picks_changed(self, stems: list[str], now: float, notices: list[Notice]) -> None:
        from streamer.formats.picks import match_key

        if self.index is None:
            return
        wanted = set(stems)
        # done movies whose pick source is unknown (None: done in an earlier session or without
        # picks; _UNSEEN: not in the folder) cannot tell whether the file changed since: left alone
        done = [p for p, src in self._done.items() if src is not None and src is not _UNSEEN]
        for state, paths in (("done", done), ("skipped", list(self._skipped))):
            for path in paths:
                if match_key(path) not in wanted:
                    continue
                src = self.index.lookup(path)
                if src is None or (state == "done" and self._done[path].stamp == src.stamp):
                    continue
                kind = "picks_changed" if state == "done" else "picks_arrived"
                what = "changed after the movie was processed" if state == "done" else "arrived after the movie was skipped"
                if self.reprocess:
                    notices.append(Notice(kind, path, f"{path}: pick file {src.path} {what}; reprocessing"))
                    self._revive(path, now)
                    continue
                notices.append(Notice(kind, path, f"{path}: pick file {src.path} {what} (not reprocessed; "
                                                  "set reprocess_changed_picks to redo it)"))
                if state == "done":
                    self._done[path] = src  # reported once per change

    def _set(self, e: Entry, state: str, now: float, reason: str = "") -> None:
        if state in TERMINAL:
            self._finish(e.path, state, e.picks)
            return
        if e.state != state:
            e.state = state
            e.state_since = now
        e.reason = reason
        if state in PRE_DISPATCH:
            self._active.add(e.path)
        else:
            self._active.discard(e.path)

    def _advance(self, e: Entry, now: float, notices: list[Notice], picks_checked: bool) -> None:
        if e.state == "waiting_picks":
            self._join_picks(e, now, notices, picks_checked)
            return
        if now < e.next_check:
            return
        e.next_check = now + min(max(self.settle / 4, 0.05), 1.0)
        try:
            st = os.stat(e.path)
        except OSError:
            self._drop(e.path)
            return
        stamp = (st.st_size, st.st_mtime_ns)
        if stamp != e.stamp:
            first = e.stamp is None
            e.stamp = stamp
            e.mtime = st.st_mtime
            e.stable_since = now
            # a file untouched for settle_seconds before we looked is settled already (lmc run)
            if not (first and self.once and time.time() - st.st_mtime >= self.settle):
                self._set(e, "settling", now)
                return
        if e.state == "seen":
            self._set(e, "settling", now)
        elif now - e.stable_since < self.settle:
            return
        if e.whole_stamp != stamp:
            if e.state == "incomplete" and e.checked_stamp == stamp:  # known incomplete and unchanged: only the timeout moves
                self._incomplete(e, now, e.reason, notices)
                return
            whole, reason = self._whole(e.path)
            e.checked_stamp = stamp
            if not whole:
                self._incomplete(e, now, reason, notices)
                return
            e.whole_stamp = stamp
        self._join_picks(e, now, notices, picks_checked=True)

    @staticmethod
    def _whole(path: str) -> tuple[bool, str]:
        from streamer.formats.movies import movie_is_whole

        try:
            return movie_is_whole(path)
        except Exception as exc:  # a reader bug must not stop the watcher; the movie is reported
            return False, f"{path}: cannot check ({type(exc).__name__}: {exc})"

    def _incomplete(self, e: Entry, now: float, reason: str, notices: list[Notice]) -> None:
        """A settled file that is not a whole movie: a short one (a transfer that may resume) is
        reported after ``incomplete_timeout``; an invalid header or structure at once, with its reason.
        Either way it stays watched: if it changes, it is checked again (and processed when whole)."""
        from streamer.formats.movies import is_truncation

        bare = reason[len(e.path) + 2:] if reason.startswith(f"{e.path}: ") else reason
        short = is_truncation(bare)
        if not reason.startswith(e.path):
            reason = f"{e.path}: {reason}"
        self._set(e, "incomplete", now, reason)
        if not e.reported and (self.once or not short or now - e.first_seen >= self.incomplete_timeout):
            e.reported = True
            if short:
                waited = "" if self.once else f" after {now - e.first_seen:.0f} s"
                message = f"{reason} (still incomplete{waited}; not processed)"
            else:
                message = (f"{reason} (size settled for {self.settle:g} s: not a valid movie, incomplete or corrupt; "
                           "not processed unless the file changes)")
            notices.append(Notice("incomplete", e.path, message))

    def _join_picks(self, e: Entry, now: float, notices: list[Notice], picks_checked: bool) -> None:
        if not self.picks_dir:
            self._queue(e, now, None)
            return
        if picks_checked or e.state != "waiting_picks":
            src = self.index.lookup(e.path) if self.index is not None else None
            if src is not None:
                self._queue(e, now, src)
                return
        if e.state != "waiting_picks":
            self._set(e, "waiting_picks", now, "no pick file yet")
        if self.once or (self.picks_timeout > 0 and now - e.state_since >= self.picks_timeout):
            waited = "" if self.once else f" within {self.picks_timeout:.0f} s"
            self._set(e, "skipped", now, f"no picks{waited}")
            notices.append(Notice("skipped", e.path, f"{e.path}: no pick file found{waited}; skipped"))

    def _queue(self, e: Entry, now: float, src: Any) -> None:
        e.picks = src
        e.ready_at = now
        self._set(e, "queued", now)

    # -- the session's side -----------------------------------------------------------------------
    def ready(self, n: int | None = None, exclude: set[str] | None = None) -> list[Entry]:
        """Queued entries in processing order (oldest mtime first, or newest first)."""
        items = [e for e in self.entries.values() if e.state == "queued" and not (exclude and e.path in exclude)]
        items.sort(key=lambda e: (-e.mtime if self.newest_first else e.mtime, e.path))
        return items if n is None else items[:n]

    def mark(self, path: str, state: str, reason: str = "", now: float | None = None) -> None:
        """Move a movie to ``state`` (running / done / failed / skipped, or back to queued). A finished
        state drops its Entry (see the module docstring)."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        e = self.entries.get(path)
        if state in TERMINAL:
            if e is None and self._finished_state(path) == state and self._done.get(path) is not _UNSEEN:
                return  # already recorded
            self._finish(path, state, e.picks if e is not None else None)
            return
        now = self.clock() if now is None else now
        if e is None:
            self._unfinish(path)  # a finished movie sent back (e.g. requeued): unfinished again
            e = self._add(path, now)
            assert e is not None
        self._set(e, state, now, reason)

    def state_of(self, path: str) -> str | None:
        """The state of ``path`` (finished ones included), None when unknown."""
        e = self.entries.get(path)
        if e is not None:
            return e.state
        if self._done.get(path, None) is _UNSEEN:
            return None
        return self._finished_state(path)

    def retained(self) -> dict[str, int]:
        """How much per-movie state is held: ``entries`` (unfinished movies, full Entry objects) and
        ``finished`` (paths only: done + skipped + failed)."""
        return {"entries": len(self.entries), "finished": len(self._done) + len(self._skipped) + len(self._failed)}

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for e in self.entries.values():
            out[e.state] += 1
        for state, n in self._finished_counts.items():
            out[state] += n
        return out

    def pending(self) -> int:
        """Entries not finished (for ``once``: the session exits when this reaches 0)."""
        return sum(1 for e in self.entries.values() if not (e.state == "incomplete" and e.reported and self.once))

    def waiting(self, limit: int = 20, now: float | None = None) -> list[dict[str, Any]]:
        """Entries held back (incomplete, waiting for picks, settling), longest-waiting first."""
        now = self.clock() if now is None else now
        held = [e for e in self.entries.values() if e.state in ("incomplete", "waiting_picks", "settling")]
        held.sort(key=lambda e: e.state_since)
        return [
            {"movie": e.path, "state": e.state, "seconds": round(now - e.state_since, 1), "reason": e.reason}
            for e in held[:limit]
        ]
