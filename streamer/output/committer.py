"""The single writer of an output folder: rolling stacks, ledger, STAR and .cs snapshots.

Commit protocol for one movie (each step fsync'ed before the next):

1. append its particles to the current stack file(s) (data, then the header's NZ);
2. ONE ledger transaction: movie row (stats, STAR rows, .cs records), ranges, stack counts.
   This is the commit point: a movie is done iff its ledger row is.
3. snapshot: rebuild ``particles.star`` / ``particles.cs`` into a temp file (copy of the previous
   snapshot + the new rows), fsync, ``os.replace``; record in ledger meta what the file holds.
   Throttled, and done by a background thread on its own ledger connection, so that the kernel copy
   (O(all particles) bytes) never stalls commits; the first particles and ``close()`` write at once.
   Readers always see a whole file; STAR and .cs are replaced one after the other, so for a moment
   one may hold a movie more than the other.

Recovery on open undoes whatever a crash left between the steps: each stack is cut back to the
ledger's committed count, stack files the ledger does not know are deleted, stale temp files are
removed, and a snapshot that does not match the ledger (size / rows / last movie id) is rebuilt.
A redo of the interrupted movie then appends it exactly once.

Crash testing: ``_crash_point(name)`` SIGKILLs the process when ``LMC_CRASH_AT`` is ``name`` or
``name:k`` (the k-th time the point is reached). Points, in order: ``start``, ``stack_data``
(per stack chunk, after the data fsync, before NZ), ``stack_header`` (per chunk), ``before_ledger``,
``after_ledger``, ``snapshot_star_tmp``, ``snapshot_star_replaced``, ``snapshot_cs_tmp``,
``snapshot_cs_replaced``.
"""

from __future__ import annotations

import ast
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from streamer.config import Config, processing_dict
from streamer.errors import OutputError
from streamer.formats import atomic, csfile, mrcstack, relion_motion, relion_star
from streamer.formats.columns import ColumnError, ColumnSet, check_finite, check_text
from streamer.output.ledger import FingerprintMismatch, Ledger, LedgerError
from streamer.types import MovieResult

__all__ = ["CommitError", "Committer", "FingerprintMismatch", "OutputLocked"]

log = logging.getLogger("lmc.committer")

LEDGER_NAME = "ledger.sqlite"
STAR_NAME = "particles.star"
CS_NAME = "particles.cs"
LOCK_NAME = ".lmc.lock"
STACK_RE = re.compile(r"^particles_(\d{5,})\.mrcs$")
CSG_NAME = "particles.csg"
SUBDIRS = ("stacks", "trajectories", "motion", "plots", "logs")

_hits: Counter[str] = Counter()


def _crash_point(name: str) -> None:
    """Kill this process with SIGKILL at the step named by ``LMC_CRASH_AT`` (tests only)."""
    spec = os.environ.get("LMC_CRASH_AT")
    if not spec:
        return
    target, _, k = spec.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] >= int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class CommitError(OutputError):
    """A movie could not be written; nothing of it was committed and earlier movies are intact."""


class OutputLocked(OutputError):
    """Another process is writing to the same output folder."""


def folder_format(ledger: Ledger) -> tuple[list[tuple[str, str]] | None, np.dtype | None]:
    """The folder's STAR columns and .cs record dtype (None until declared / the first movie with particles)."""
    cols = ledger.get_meta("star_columns")
    dt = ledger.get_meta("cs_dtype")
    return ([tuple(c) for c in json.loads(cols)] if cols else None,
            np.lib.format.descr_to_dtype(ast.literal_eval(dt)) if dt else None)


def folder_columns(ledger: Ledger) -> ColumnSet | None:
    """The folder's ColumnSet, or None before the session declared one."""
    cols = ledger.get_meta("star_columns")
    return ColumnSet.from_json(cols) if cols else None


def stack_name(number: int) -> str:
    return f"particles_{number:05d}.mrcs"


class Committer:
    """Single writer of ``out_dir`` (see module docstring). Use as a context manager or call ``close()``."""

    # the folder's state, read from its ledger by _open_state (after the lock and the ledger are held)
    _import_sig: int  # the .cs import signature of every particle: from the folder's first fingerprint
    _sign: float  # the particles' contrast sign (cfg.invert_contrast)
    _cs_dtype: np.dtype | None  # the folder's .cs record dtype (None before its first particles)
    _columns: ColumnSet | None  # the folder's STAR columns (None before the session declares them)
    _stacks: dict[str, int]  # stack name -> committed image count
    _snapshots: _Snapshots | None  # None only until _open_state has made it

    def __init__(self, out_dir: str | Path, cfg: Config, new: bool = False, snapshot_interval: float = 2.0) -> None:
        """Open (recovering) or create the output folder. ``new=True`` refuses a folder that already
        holds a ledger. Raises FingerprintMismatch when the folder was made with other processing
        parameters, OutputLocked when another process holds it."""
        self.out = Path(out_dir)
        self.cfg = cfg
        self.snapshot_interval = snapshot_interval
        ledger_path = self.out / LEDGER_NAME
        if new and ledger_path.exists():
            raise FileExistsError(f"{self.out}: already an lmc output folder ({LEDGER_NAME} exists); use a new --out")
        for sub in SUBDIRS:
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise OutputLocked(f"{self.out}: another lmc process is writing to this output folder") from None
        try:
            self.ledger = Ledger(ledger_path, cfg.fingerprint(), processing_dict(cfg))
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._closed = False
        self._snapshots = None
        for kind, what in (("added", "new parameters of this lmc version, not in the folder's record"),
                           ("dropped", "parameters in the folder's record that this lmc version no longer has")):
            if self.ledger.adopted.get(kind):
                log.warning("%s: %s: %s", self.out, what,
                            ", ".join(f"{k}={v!r}" for k, v in self.ledger.adopted[kind].items()))
        try:
            self._open_state()
        except BaseException:
            if self._snapshots is not None:
                self._snapshots.close(write=False)
            self.ledger.close()
            os.close(self._lock_fd)
            raise

    def _open_state(self) -> None:
        cfg = self.cfg
        # the folder's first fingerprint: one import signature for all its particles, across lmc versions
        self._import_sig = int(self.ledger.import_fingerprint() or cfg.fingerprint(), 16) & 0xFFFF_FFFF_FFFF_FFFF
        self._sign = 1.0 if cfg.invert_contrast else -1.0
        self._cs_dtype = folder_format(self.ledger)[1]
        self._columns = folder_columns(self.ledger)
        self._recover()
        # no in-memory set of done movies: the ledger's indexed lookup answers, so memory does not grow
        self._stacks = self.ledger.stacks()
        self._snapshots = _Snapshots(self.out, cfg, self.snapshot_interval)
        try:
            self._snapshots.write()
        except OSError as exc:
            log.warning("%s: could not bring the snapshots up to date: %s", self.out, exc)

    # -- recovery ---------------------------------------------------------------------
    def _recover(self) -> None:
        stacks_dir = self.out / "stacks"
        known = self.ledger.stacks()
        for name, n in known.items():
            path = stacks_dir / name
            if not path.exists():
                if n:
                    raise LedgerError(
                        f"{path}: missing, but the ledger holds {n} committed particles in it; "
                        "the output folder was modified by hand"
                    )
                continue
            hdr = mrcstack.read_header(path)
            on_disk = mrcstack.images_on_disk(path)
            if on_disk < n or int(hdr["nz"]) < n:
                raise LedgerError(
                    f"{path}: holds {min(on_disk, int(hdr['nz']))} images but the ledger has {n} committed; "
                    "the file was truncated or replaced outside lmc"
                )
            if int(hdr["nz"]) != n or path.stat().st_size != mrcstack.HEADER_BYTES + n * (
                mrcstack.MODES[int(hdr["mode"])].itemsize * int(hdr["nx"]) * int(hdr["ny"])
            ):
                log.info("%s: cutting back to the %d committed images (interrupted write)", path, n)
                mrcstack.truncate(path, n)
        for path in stacks_dir.iterdir():
            if path.name.endswith(".mrcs.new") or (STACK_RE.match(path.name) and path.name not in known):
                log.info("%s: removing a stack file no committed movie uses (interrupted write)", path)
                path.unlink()
        for tmp in (self.out / f".{STAR_NAME}.tmp", self.out / f".{CS_NAME}.tmp"):
            tmp.unlink(missing_ok=True)
        for sub in ("plots", "trajectories", "motion"):  # side files being replaced when the process died
            for tmp in (self.out / sub).glob(".*.tmp"):
                log.info("%s: removing a temp file left by an interrupted write", tmp)
                tmp.unlink(missing_ok=True)

    # -- queries ----------------------------------------------------------------------
    def done_movies(self) -> set[str]:
        """Movies done for good; failed and skipped ones are tried again by a later run."""
        return self.ledger.done_movies()

    def is_done(self, movie: str) -> bool:
        """Done (one indexed ledger lookup)."""
        return self.ledger.is_done(movie)

    def failed(self) -> list[tuple[str, str]]:
        """``[(movie, reason), ...]`` in the order they failed."""
        return self.ledger.failed()

    def totals(self) -> dict[str, int]:
        """``{"done", "failed", "skipped", "particles", "stacks"}``."""
        return self.ledger.totals()

    # -- writing ----------------------------------------------------------------------
    @property
    def columns(self) -> ColumnSet | None:
        """The folder's columns (fixed by the session: ``declare_columns``)."""
        return self._columns

    def declare_columns(self, columns: ColumnSet) -> ColumnSet:
        """Fix the folder's columns if they are not yet; returns the folder's (possibly older) set."""
        if self._columns is None:
            self.ledger.set_meta("star_columns", columns.to_json())
            self._columns = columns
            log.info("%s: particles.star columns fixed: %s", self.out,
                     ", ".join(label for label, _ in columns.star_columns()))
        elif columns != self._columns:
            log.info("%s: keeps its columns (%s); not %s", self.out, ", ".join(self._columns.labels) or "-",
                     ", ".join(columns.labels) or "-")
        return self._columns

    def _carried_kinds(self) -> dict[str, np.ndarray]:
        """The folder's carried columns as empty arrays of their kinds (the .cs dtype follows the
        session's column set, not whichever movie came first)."""
        types = {"f": np.float64, "i": np.int64, "s": object}
        cols = self._columns.carried if self._columns is not None else ()
        return {label: np.zeros(0, dtype=types[kind]) for label, kind in cols}

    def _check(self, r: MovieResult) -> None:
        b = self.cfg.out_box
        p = r.particles
        if p.ndim != 3 or p.shape[1:] != (b, b):
            raise ValueError(f"{r.movie}: particles have shape {p.shape}, expected (n, {b}, {b}) (out_box)")
        n = p.shape[0]
        for name, arr in [("x", r.x), ("y", r.y), *((f"columns[{k}]", v) for k, v in r.columns.items())]:
            if np.shape(arr) != (n,):
                raise ValueError(f"{r.movie}: {name} has shape {np.shape(arr)}, expected ({n},) like the particles")
        if len(r.micrograph_shape) != 2 or min(r.micrograph_shape) <= 0:
            raise ValueError(f"{r.movie}: micrograph_shape {r.micrograph_shape} is not (h, w) > 0")
        # what goes into particles.star / .cs: names and numbers a reader takes back unchanged
        check_text(r.movie, "movie name")
        check_finite({"particles": p, "x": r.x, "y": r.y}, r.movie)
        if self._columns is not None:
            self._columns.check(r.columns, None, n, r.movie)

    def _plan(self, n: int) -> list[tuple[str, int, int]]:
        """Split n particles into ``(stack name, offset in the movie, count)`` chunks at stack_size."""
        size = self.cfg.stack_size
        names = list(self._stacks)
        number = int(STACK_RE.match(names[-1]).group(1)) if names else 0
        room = size - self._stacks[names[-1]] if names else 0
        chunks: list[tuple[str, int, int]] = []
        done = 0
        while done < n:
            if room <= 0:
                number += 1
                room = size
            k = min(room, n - done)
            chunks.append((stack_name(number), done, k))
            done += k
            room -= k
        return chunks

    def _rollback(self, touched: list[str]) -> None:
        for name in touched:
            path = self.out / "stacks" / name
            try:
                if name in self._stacks:
                    mrcstack.truncate(path, self._stacks[name])
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:  # the next open repairs it from the ledger
                log.warning("%s: could not undo a failed write (%s); repaired at next open", path, exc)

    def _committed_anyway(self, movie: str) -> bool:
        """After a failed COMMIT, whether sqlite made it durable all the same (then the stacks must stay)."""
        try:
            return self.ledger.status(movie) == "done"
        except sqlite3.Error:
            return False

    def picks_used(self) -> dict[str, tuple[str, str, float, int, str | None]]:
        """The pick file (path, format, mtime, size, micrograph) each done movie was processed with."""
        return self.ledger.picks_used()

    def commit(self, result: MovieResult, picks: Any = None) -> None:
        """Write one movie's particles and record it (the ledger transaction is the commit point).
        ``picks``: the PickSource it was processed with (recorded with it). A movie already done is
        ignored. Raises CommitError (nothing committed) when writing fails."""
        movie = result.movie
        if self.ledger.is_done(movie):
            log.info("%s: already committed; result ignored", movie)
            return
        if self._columns is None and result.n:
            # direct use without a session (tools, tests): the first movie's columns, validated as usual
            self.declare_columns(ColumnSet.of({k: relion_star.column_kind(v) for k, v in result.columns.items()}))
        try:
            self._check(result)
        except ColumnError as exc:
            raise ValueError(str(exc)) from None
        n = result.n
        columns = self._columns.star_columns() if self._columns is not None else None
        cs_dtype = self._cs_dtype
        meta: dict[str, str] = {}
        if columns is not None:
            missing, _ = relion_star.column_mismatch(columns, result.columns)
            if missing and n:
                log.info("%s: its picks lack column(s) %s; written as neutral values (0 / None)", movie, ", ".join(missing))
        chunks = self._plan(n)
        touched: list[str] = []
        where = self.out / "stacks"  # what is being written, for the error message
        try:
            _crash_point("start")
            particles = np.asarray(result.particles, dtype=np.float16 if self.cfg.float16 else np.float32)
            ranges: list[tuple[str, int, int]] = []
            counts: dict[str, int] = {}
            for name, offset, k in chunks:
                path = self.out / "stacks" / name
                touched.append(name)
                where = path
                first, _ = mrcstack.append(path, particles[offset : offset + k], self.cfg.out_apix,
                                           on_step=_crash_point)
                if first != self._stacks.get(name, 0):
                    raise mrcstack.StackError(
                        f"{path}: held {first} images, the ledger says {self._stacks.get(name, 0)}"
                    )
                ranges.append((name, first, k))
                counts[name] = first + k
                _crash_point("stack_header")
            star_rows, cs_blob = "", None
            if n:
                rel = [(f"stacks/{s}", f, k) for s, f, k in ranges]
                # absolute in the STAR: RELION resolves relative image paths against its own project
                # directory, so only absolute ones import unchanged from anywhere
                absolute = [(str(self.out.resolve() / "stacks" / s), f, k) for s, f, k in ranges]
                star_rows = relion_star.render_rows(columns, relion_star.image_names(absolute), movie, result.x,
                                                    result.y, result.columns)
                want = csfile.fit_dtype(cs_dtype, max(len(s.encode()) for s, _, _ in rel), len(movie.encode()),
                                        ctf=any(c == "rlnDefocusU" for c, _ in columns), carried=self._carried_kinds())
                if want != cs_dtype:
                    cs_dtype = want
                    meta["cs_dtype"] = repr(np.lib.format.dtype_to_descr(cs_dtype))
                recs = csfile.records(
                    cs_dtype, movie, rel, result.x, result.y, tuple(result.micrograph_shape), result.columns,
                    box=self.cfg.out_box, psize=self.cfg.out_apix, micrograph_psize=self.cfg.pixel_size, sign=self._sign,
                    import_sig=self._import_sig, kv=self.cfg.kv, cs_mm=self.cfg.cs,
                    amp_contrast=self.cfg.amplitude_contrast,
                )
                cs_blob = csfile.to_blob(recs)
            _crash_point("before_ledger")
            where = self.out / LEDGER_NAME
            used = None if picks is None else (str(picks.path), str(picks.format), float(picks.mtime), int(picks.size),
                                               picks.micrograph)
            self.ledger.commit_movie(movie, n, result.stats, ranges, counts, star_rows, cs_blob, meta, picks=used)
        except BaseException as exc:
            if where.name == LEDGER_NAME and self._committed_anyway(movie):
                log.warning("%s: the ledger reported an error (%s) but holds the movie; kept", movie, exc)
            else:
                self._rollback(touched)
                if isinstance(exc, (OSError, sqlite3.Error, mrcstack.StackError, LedgerError)):
                    raise CommitError(
                        f"{where}: could not write the particles of {movie}: {exc}. Nothing of this movie was "
                        "committed; earlier movies are intact (free disk space / fix permissions, then rerun)"
                    ) from exc
                raise
        self._stacks.update(counts)
        self._cs_dtype = cs_dtype
        _crash_point("after_ledger")
        self._write_side_files(result)
        try:
            self.snapshot()
        except OSError as exc:
            log.warning("%s: snapshot not updated (%s); retried at the next commit", self.out, exc)

    def _write_side_files(self, result: MovieResult) -> None:
        """trajectories/<stem>.star and motion/<stem>.star from the result, and the worker's plot PNG, each replaced
        atomically; outside the commit (a failure here loses no particle: logged, redone on a redo)."""
        from streamer.formats.picks import movie_stem
        from streamer.formats.trajectories import write_trajectories

        stem = movie_stem(result.movie)
        try:
            traj = self.out / "trajectories"
            write_trajectories(traj / atomic.side_name(traj, stem, ".star"), result)
            relion_motion.write_motion_star(self.cfg, result, self.out)
            if result.plot_png is not None and self.cfg.plots:
                plots = self.out / "plots"
                atomic.write_bytes(plots / atomic.side_name(plots, stem, ".png"), result.plot_png)
        except OSError as exc:
            log.warning("%s: side files of %s not written (%s)", self.out, result.movie, exc)

    def mark_failed(self, movie: str, reason: str, stats: dict[str, Any] | None = None) -> None:
        """Record that a movie failed (retried by a later run); ignored for a movie already done."""
        if not self.ledger.mark_failed(movie, reason, stats):
            log.info("%s: already committed; failure (%s) ignored", movie, reason)

    def mark_skipped(self, movie: str, reason: str, stats: dict[str, Any] | None = None) -> None:
        """Record a movie finished without particles (e.g. no picks); it is not processed again."""
        if not self.ledger.mark_skipped(movie, reason, stats):
            log.info("%s: already committed; skip (%s) ignored", movie, reason)

    def forget(self, movie: str) -> None:
        """Drop a movie so it can be processed again (e.g. its picks changed). Its old stack images
        stay on disk unreferenced; the snapshots are rebuilt without it (O(all particles), once)."""
        if self.ledger.forget(movie):
            self._snapshots.invalidate()
            self._snapshots.write()

    def snapshot(self, force: bool = False) -> bool:
        """Bring ``particles.star`` / ``particles.cs`` up to the ledger. ``force``: now, in this thread
        (waiting for a background write in progress); otherwise a request to the background writer,
        which writes at most every ``snapshot_interval`` s (``0``: at once, in this thread). Returns
        True if files were written (always False for a background request)."""
        if force or self.snapshot_interval <= 0 or self._snapshots.missing():
            return self._snapshots.write()
        self._snapshots.request()
        return False

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background writer, force the snapshots up to date, close the ledger, release the folder."""
        if self._closed:
            return
        try:
            self._snapshots.close()
        finally:
            self._closed = True
            self.ledger.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Snapshots:
    """``particles.star`` / ``particles.cs`` kept up to the ledger, on its own ledger connection.

    ``write()`` runs in the caller's thread; ``request()`` wakes a background thread that writes at
    most every ``interval`` s, stretched to 10x the last write's cost, so the kernel copy of the
    previous file (O(all particles) bytes) never stalls commits and takes < ~10% of the disk time.
    All writes hold ``lock``; the state (what each file holds) changes only under it.
    """

    def __init__(self, out: Path, cfg: Config, interval: float) -> None:
        self.out, self.cfg, self.interval = out, cfg, interval
        self.ledger = Ledger(out / LEDGER_NAME, threaded=True)
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = 0.0
        self._cost = 0.0
        with self.lock:
            self.state = {k: self._verified(k) for k in ("star", "cs")}

    def path(self, kind: str) -> Path:
        return self.out / (STAR_NAME if kind == "star" else CS_NAME)

    def _verified(self, kind: str) -> dict[str, Any] | None:
        """The recorded state if the file on disk is exactly it, else None (= full rebuild)."""
        raw = self.ledger.get_meta(f"snap_{kind}")
        path = self.path(kind)
        if not raw or not path.exists():
            return None
        state = json.loads(raw)
        if path.stat().st_size != state["bytes"] or self.ledger.particles_up_to(state["last_id"]) != state["rows"]:
            return None
        if kind == "cs":
            try:
                dtype, rows, _ = csfile.read_header(path)
            except (ValueError, SyntaxError):
                return None
            if repr(dtype.descr) != state.get("dtype") or rows != state["rows"]:
                return None
        return state

    def missing(self) -> bool:
        """True while a snapshot file has never been written (the first particles show at once)."""
        return any(s is None for s in self.state.values())

    def invalidate(self) -> None:
        with self.lock:
            self.state = {"star": None, "cs": None}

    def request(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmc-snapshots", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            delay = self._last + max(self.interval, 10 * self._cost) - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            self._wake.clear()
            try:
                self.write()
            except Exception as exc:  # the previous snapshot stays valid; retried at the next request
                log.warning("%s: snapshot not updated (%s); retried later", self.out, exc)

    def write(self) -> bool:
        """Bring both files up to the ledger now. Returns True if a file was written."""
        with self.lock:
            t0 = time.monotonic()
            last = self.ledger.last_done_id()
            # read after `last`: the dtype is then at least as wide as any row up to `last` needs
            columns, dtype = folder_format(self.ledger)
            if columns is None or dtype is None:  # nothing to show before the first particles
                return False
            wrote = False
            for kind in ("star", "cs"):
                state = self.state[kind]
                if state is None or state["last_id"] < last:
                    self.state[kind] = self._write(kind, state, last, columns, dtype)
                    wrote = True
            if wrote or self._companions_missing():
                self._write_companions(last, dtype)
            self._last = time.monotonic()
            if wrote:
                self._cost = self._last - t0
            return wrote

    def _companions_missing(self) -> bool:
        """True when micrographs.star or particles.csg is absent, or the .csg counts other rows than
        particles.cs holds (a crash between the two replaces)."""
        csg = self.out / CSG_NAME
        if not csg.exists() or not (self.out / relion_motion.MICROGRAPHS_NAME).exists():
            return True
        cs_state = self.state.get("cs")
        found = re.search(r"num_items: (\d+)", csg.read_text(errors="replace"))
        return cs_state is not None and (found is None or int(found.group(1)) != cs_state["rows"])

    def _write_companions(self, last: int, dtype: np.dtype) -> None:
        """``particles.csg`` (cryoSPARC's result group for particles.cs, after it: its num_items is the
        file's row count) and ``micrographs.star`` (RELION: every done movie's motion STAR). Both are
        rebuilt whole from the ledger: O(movies), no state to recover after a crash."""
        cs_state = self.state.get("cs")
        if cs_state is not None:
            atomic.write_text(self.out / CSG_NAME, csfile.csg_text(CS_NAME, dtype, cs_state["rows"]))
        movies = ((r.movie, r.stats) for r in self.ledger.rows(up_to=last, with_payload=False))
        atomic.write_text(self.out / relion_motion.MICROGRAPHS_NAME,
                          relion_motion.micrographs_text(self.cfg, movies, self.out))

    def _write(self, kind: str, state: dict[str, Any] | None, last: int, columns: list[tuple[str, str]],
               dtype: np.dtype) -> dict[str, Any]:
        path = self.path(kind)
        tmp = self.out / f".{path.name}.tmp"
        if state is not None and (not path.exists() or path.stat().st_size != state["bytes"]):
            state = None  # replaced or removed behind our back
        if kind == "cs" and state is not None and state.get("dtype") != repr(dtype.descr):
            state = None  # string fields were widened: one full rewrite
        rows = self.ledger.rows(after_id=state["last_id"] if state else 0, up_to=last)  # streamed
        try:
            if state is not None:  # on failure the state is kept: the old file is intact, or its size tells
                shutil.copyfile(path, tmp)  # kernel copy; the Python work stays O(new rows)
            if kind == "star":
                total = state["rows"] if state else 0
                with open(tmp, "ab" if state else "wb") as f:
                    if state is None:
                        f.write(relion_star.render_header(self.cfg, columns).encode())
                    for r in rows:
                        f.write(r.star_rows.encode())
                        total += r.n_particles
                    f.flush()
                    os.fsync(f.fileno())
            else:
                parts = (csfile.from_blob(r.cs_rows, dtype) for r in rows if r.cs_rows)
                if state is None:
                    total = csfile.write_new(tmp, dtype, parts)
                else:
                    total = csfile.append_to(tmp, dtype, state["rows"], parts)
            _crash_point(f"snapshot_{kind}_tmp")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        atomic.fsync_dir(self.out)
        _crash_point(f"snapshot_{kind}_replaced")
        new_state: dict[str, Any] = {"last_id": last, "rows": total, "bytes": path.stat().st_size}
        if kind == "cs":
            new_state["dtype"] = repr(dtype.descr)
        self.ledger.set_meta(f"snap_{kind}", json.dumps(new_state))
        return new_state

    def close(self, write: bool = True) -> None:
        """Stop the background thread, then (``write``) a final write in this thread."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
        try:
            if write:
                self.write()
        finally:
            self.ledger.close()
