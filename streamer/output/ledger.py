"""The output folder's ledger: which movies are done, where their particles live, in one sqlite file.

Tables:
  ``meta(key, value)``: fingerprint, processing (JSON), created, schema, and the snapshot/column state
  kept by the committer (``star_columns``, ``cs_dtype``, ``snap_star``, ``snap_cs``); after an lmc
  version with other parameter names opened the folder, ``fingerprint_created`` and ``versions``.
  ``movies``: one row per movie (status done|failed|skipped), with the STAR rows (text) and .cs
  records (an ``.npy`` blob) of its particles, so snapshots can be rebuilt from the ledger alone.
  ``ranges(movie_id, stack, first, count)``: where a movie's particles are (0-based, per stack file).
  ``stacks(name, committed_count)``: images of each stack file that belong to committed movies.

A folder is reopened only with the processing parameters it was made with: every parameter the
folder's record and this lmc both know must be equal (else FingerprintMismatch, naming each). A
parameter only one side knows (an lmc version added or dropped it) cannot be given either way; the
folder continues under this version's record, and the change is kept in ``versions`` and reported.

WAL mode with ``synchronous=FULL``: a commit that returned survives power loss. ``movies.id`` is
AUTOINCREMENT so ids never repeat and follow commit order (snapshots append rows by id).

``movies_status`` (status, n_particles) is a covering index, so ``totals()`` (run after every
write) and ``last_done_id()`` read a few bytes per movie instead of every movie row with its
STAR/.cs payload: without it each write scanned the whole table, which cost time growing with the
session and filled sqlite's page cache (up to its 2 MB default) with movie rows.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamer.errors import OutputError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS movies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    movie TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed', 'skipped')),
    reason TEXT,
    n_particles INTEGER NOT NULL DEFAULT 0,
    stats TEXT,
    committed_at REAL,
    star_rows TEXT,
    cs_rows BLOB
);
CREATE TABLE IF NOT EXISTS ranges (movie_id INTEGER NOT NULL, stack TEXT NOT NULL, first INTEGER NOT NULL,
                                   count INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ranges_movie ON ranges(movie_id);
CREATE INDEX IF NOT EXISTS movies_status ON movies(status, n_particles);
CREATE TABLE IF NOT EXISTS stacks (name TEXT PRIMARY KEY, committed_count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS picks_used (movie TEXT PRIMARY KEY, path TEXT NOT NULL, format TEXT NOT NULL,
                                       mtime REAL NOT NULL, size INTEGER NOT NULL, micrograph TEXT);
"""


class FingerprintMismatch(OutputError):
    """The output folder was written with different processing parameters."""


class LedgerError(RuntimeError):
    """The ledger is unreadable or inconsistent."""


@dataclass
class MovieRow:
    id: int
    movie: str
    status: str
    reason: str | None
    n_particles: int
    stats: dict[str, Any]
    committed_at: float
    star_rows: str
    cs_rows: bytes | None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def dumps(obj: Any) -> str:
    """JSON with NumPy scalars/arrays converted (stats dicts come straight from the engine)."""
    return json.dumps(obj, default=_json_default, sort_keys=True)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["box: 256 (folder) vs 200 (now)", ...]`` for every processing key both know that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a[k]!r} (folder) vs {b[k]!r} (now)" for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def version_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The processing keys only one side knows: ``{"added": {key: value now}, "dropped": {key: value in
    the folder}}`` (flattened ``section.key``). An lmc version that gained a parameter records it in new
    folders only; a folder made before has no value for it, and no flag could set one."""
    a, b = _flatten(old), _flatten(new)
    return {"added": {k: b[k] for k in sorted(set(b) - set(a))}, "dropped": {k: a[k] for k in sorted(set(a) - set(b))}}


class Ledger:
    """One sqlite connection to ``path``; the committer is its only writer."""

    def __init__(self, path: str | Path, fingerprint: str | None = None, processing: dict[str, Any] | None = None,
                 readonly: bool = False, threaded: bool = False) -> None:
        """Open or create the ledger. With ``fingerprint`` given, a new ledger records it and an
        existing one must hold the same (else FingerprintMismatch). ``readonly`` opens an existing
        ledger for status tools (no creation, no check unless a fingerprint is given). ``threaded``:
        the connection may be used from several threads (the caller serialises the use)."""
        self.path = Path(path)
        self.adopted: dict[str, dict[str, Any]] = {}  # parameters a version change added/dropped (see _adopt_version)
        try:
            if readonly:
                if not self.path.exists():
                    raise LedgerError(f"{self.path}: no ledger here (not an lmc output folder?)")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                          check_same_thread=not threaded)
            else:
                self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=not threaded)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(_SCHEMA)
            self.db.execute("PRAGMA foreign_keys=ON")
            existing = self.get_meta("fingerprint")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: cannot open the ledger: {exc}") from None
        if fingerprint is None:
            return
        if existing is None:
            if readonly:
                raise LedgerError(f"{self.path}: ledger has no fingerprint")
            with self.transaction():
                self._put_meta("fingerprint", fingerprint)
                self._put_meta("processing", dumps(processing or {}))
                self._put_meta("created", repr(time.time()))
                self._put_meta("schema", str(SCHEMA_VERSION))
        elif existing != fingerprint:
            old = json.loads(self.get_meta("processing") or "{}")
            diffs = describe_differences(old, processing or {})
            changes = version_changes(old, processing or {})
            if diffs or readonly or not (changes["added"] or changes["dropped"]):
                self.db.close()
                raise FingerprintMismatch(
                    f"{self.path.parent}: this output folder was made with different processing parameters: "
                    + "; ".join(diffs or [f"fingerprint {existing} (folder) vs {fingerprint} (now)"])
                    + ". Use a new --out folder (or the original parameters)."
                )
            self._adopt_version(existing, fingerprint, processing or {}, changes)

    def _adopt_version(self, existing: str, fingerprint: str, processing: dict[str, Any],
                       changes: dict[str, dict[str, Any]]) -> None:
        """A folder made by an lmc version with other parameter *names* (every parameter both versions
        know has the same value): it continues under this version's record, in one transaction. The
        first fingerprint stays as ``fingerprint_created`` (the folder's .cs import signature), and
        ``versions`` lists every such change (time, added, dropped); ``adopted`` holds this one for the
        caller to report."""
        with self.transaction():
            if self.get_meta("fingerprint_created") is None:
                self._put_meta("fingerprint_created", existing)
            history = json.loads(self.get_meta("versions") or "[]")
            history.append({"time": time.time(), **changes})
            self._put_meta("versions", dumps(history))
            self._put_meta("fingerprint", fingerprint)
            self._put_meta("processing", dumps(processing))
        self.adopted = changes

    def import_fingerprint(self) -> str:
        """The fingerprint the folder was created with (its particles' .cs ``blob/import_sig``)."""
        return self.get_meta("fingerprint_created") or self.get_meta("fingerprint") or ""

    # -- plumbing ---------------------------------------------------------------------
    def transaction(self) -> _Transaction:
        """``with ledger.transaction(): ...`` — BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _put_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._put_meta(key, value)

    # -- queries ----------------------------------------------------------------------
    def status(self, movie: str) -> str | None:
        row = self.db.execute("SELECT status FROM movies WHERE movie = ?", (movie,)).fetchone()
        return None if row is None else row[0]

    def is_done(self, movie: str) -> bool:
        """True for movies done for good; failed and skipped ones are tried again by a later run
        (the cause of a skip — a missing or unreadable pick file — may have gone away)."""
        return self.status(movie) == "done"

    def done_movies(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT movie FROM movies WHERE status = 'done'")}

    def failed(self) -> list[tuple[str, str]]:
        return [tuple(r) for r in self.db.execute("SELECT movie, reason FROM movies WHERE status = 'failed' ORDER BY id")]

    def stacks(self) -> dict[str, int]:
        """``{stack name: committed image count}`` in name order (names sort in creation order)."""
        return dict(self.db.execute("SELECT name, committed_count FROM stacks ORDER BY length(name), name"))

    def ranges(self, movie: str) -> list[tuple[str, int, int]]:
        """``[(stack, first 0-based, count), ...]`` of a done movie, in write order."""
        return [
            tuple(r)
            for r in self.db.execute(
                "SELECT r.stack, r.first, r.count FROM ranges r JOIN movies m ON m.id = r.movie_id "
                "WHERE m.movie = ? ORDER BY r.rowid",
                (movie,),
            )
        ]

    def totals(self) -> dict[str, int]:
        """``{"done", "failed", "skipped", "particles", "stacks"}`` counts."""
        out = {"done": 0, "failed": 0, "skipped": 0}
        for status, n in self.db.execute("SELECT status, COUNT(*) FROM movies GROUP BY status"):
            out[status] = n
        out["particles"] = self.db.execute(
            "SELECT COALESCE(SUM(n_particles), 0) FROM movies WHERE status = 'done'"
        ).fetchone()[0]
        out["stacks"] = self.db.execute("SELECT COUNT(*) FROM stacks").fetchone()[0]
        return out

    def last_done_id(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM movies WHERE status = 'done'").fetchone()[0]

    def particles_up_to(self, last_id: int) -> int:
        """Particles of done movies with id <= last_id (what a snapshot ending at last_id holds)."""
        return self.db.execute(
            "SELECT COALESCE(SUM(n_particles), 0) FROM movies WHERE status = 'done' AND id <= ?", (last_id,)
        ).fetchone()[0]

    def rows(self, after_id: int = 0, up_to: int | None = None, status: str | None = "done",
             with_payload: bool = True) -> Iterator[MovieRow]:
        """Movie rows with after_id < id <= up_to in commit order (fetched lazily); ``status=None``: every status."""
        cols = "id, movie, status, reason, n_particles, stats, committed_at, " + (
            "star_rows, cs_rows" if with_payload else "NULL, NULL"
        )
        up = (1 << 62) if up_to is None else up_to
        sql = f"SELECT {cols} FROM movies WHERE id > ? AND id <= ?" + (" AND status = ?" if status else "")
        args: tuple[Any, ...] = (after_id, up, status) if status else (after_id, up)
        for r in self.db.execute(sql + " ORDER BY id", args):
            yield MovieRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"), r[6], r[7] or "", r[8])

    # -- writes -----------------------------------------------------------------------
    def commit_movie(
        self,
        movie: str,
        n_particles: int,
        stats: dict[str, Any],
        ranges: list[tuple[str, int, int]],
        stack_counts: dict[str, int],
        star_rows: str,
        cs_rows: bytes | None,
        meta: dict[str, str] | None = None,
        picks: tuple[str, str, float, int, str | None] | None = None,
    ) -> int:
        """Record a done movie in ONE transaction: the movie row (replacing a failed/skipped one),
        its ranges, the new committed counts of the stacks it touched, optional meta keys and the
        pick file it was processed with (``picks`` = (path, format, mtime, size, micrograph): a later
        session tells whether it changed while lmc was not running).
        Returns the movie's id. Raises LedgerError if the movie is already done."""
        with self.transaction():
            prev = self.db.execute("SELECT id, status FROM movies WHERE movie = ?", (movie,)).fetchone()
            if prev is not None:
                if prev[1] == "done":
                    raise LedgerError(f"{movie}: already committed")
                self.db.execute("DELETE FROM movies WHERE id = ?", (prev[0],))
            cur = self.db.execute(
                "INSERT INTO movies (movie, status, reason, n_particles, stats, committed_at, star_rows, cs_rows) "
                "VALUES (?, 'done', NULL, ?, ?, ?, ?, ?)",
                (movie, n_particles, dumps(stats), time.time(), star_rows, cs_rows),
            )
            movie_id = int(cur.lastrowid)
            self.db.executemany(
                "INSERT INTO ranges (movie_id, stack, first, count) VALUES (?, ?, ?, ?)",
                [(movie_id, s, first, n) for s, first, n in ranges],
            )
            self.db.executemany(
                "INSERT INTO stacks (name, committed_count) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET committed_count = excluded.committed_count",
                list(stack_counts.items()),
            )
            for k, v in (meta or {}).items():
                self._put_meta(k, v)
            if picks is not None:
                self.db.execute("INSERT OR REPLACE INTO picks_used (movie, path, format, mtime, size, micrograph) "
                                "VALUES (?, ?, ?, ?, ?, ?)", (movie, *picks))
        return movie_id

    def picks_used(self) -> dict[str, tuple[str, str, float, int, str | None]]:
        """``{movie: (pick path, format, mtime, size, micrograph)}`` of done movies, as processed."""
        rows = self.db.execute("SELECT p.movie, p.path, p.format, p.mtime, p.size, p.micrograph FROM picks_used p "
                               "JOIN movies m ON m.movie = p.movie WHERE m.status = 'done'")
        return {r[0]: tuple(r[1:]) for r in rows}

    def _mark(self, movie: str, status: str, reason: str, stats: dict[str, Any] | None) -> bool:
        with self.transaction():
            prev = self.db.execute("SELECT id, status FROM movies WHERE movie = ?", (movie,)).fetchone()
            if prev is not None and prev[1] == "done":
                return False
            if prev is not None:
                self.db.execute("DELETE FROM movies WHERE id = ?", (prev[0],))
            self.db.execute(
                "INSERT INTO movies (movie, status, reason, n_particles, stats, committed_at) VALUES (?, ?, ?, 0, ?, ?)",
                (movie, status, reason, dumps(stats or {}), time.time()),
            )
        return True

    def mark_failed(self, movie: str, reason: str, stats: dict[str, Any] | None = None) -> bool:
        """Record a failure (replaces an earlier failed/skipped row); a done movie is left alone (returns False)."""
        return self._mark(movie, "failed", reason, stats)

    def mark_skipped(self, movie: str, reason: str, stats: dict[str, Any] | None = None) -> bool:
        """Record a movie finished without particles; a done movie is left alone (returns False)."""
        return self._mark(movie, "skipped", reason, stats)

    def forget(self, movie: str) -> bool:
        """Drop a movie's row and ranges (its stack images stay, unreferenced). True if it existed."""
        with self.transaction():
            prev = self.db.execute("SELECT id FROM movies WHERE movie = ?", (movie,)).fetchone()
            if prev is None:
                return False
            self.db.execute("DELETE FROM ranges WHERE movie_id = ?", (prev[0],))
            self.db.execute("DELETE FROM movies WHERE id = ?", (prev[0],))
            self.db.execute("DELETE FROM picks_used WHERE movie = ?", (movie,))
        return True


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:  # sqlite may already have rolled back (e.g. disk full)
            self.db.execute("ROLLBACK")
