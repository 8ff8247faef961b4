"""``lmc watch`` / ``lmc run``: watcher + dispatcher + the single writer, in one process.

The main thread runs the loop: tick the watcher, hand ready movies to the dispatcher as worker
slots free up (so the processing order is decided as late as possible), poll the dispatcher, pass
each result to the writer, supervise the local worker processes, and publish a snapshot
(``on_state`` about once a second, ``OUT/status.json`` every few seconds). The single writer is a
second thread that owns the Committer (one ledger transaction per movie), so a slow disk delays
commits, not heartbeats; dispatch pauses while it is behind.

Signals: the first SIGINT/SIGTERM drains (no new movies; running ones finish and are committed;
exit 0), a second aborts at once (uncommitted work is redone by the next run on the same --out).
The console's ``controls`` (``paused``, ``quit_requested``) pause dispatch and drain.

Exactly once: the committer skips movies already in the ledger, the watcher starts from the
ledger's done set, the dispatcher accepts one result per job, so a crash anywhere costs at most the
movies in flight, which are redone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamer.config import Config, ConfigError
from streamer.live.dispatcher import Dispatcher, Event, Job
from streamer.live.watcher import Notice, Watcher, split_pattern
from streamer.output.status import clean, write_status
from streamer.ui.console import enrich_snapshot

log = logging.getLogger("lmc.session")

STATE_EVERY_S = 1.0
STATUS_EVERY_S = 2.0
RECENT_WINDOW_S = 600.0
KEEP = 50  # recent movies / warnings / errors kept in the snapshot
RESPAWN_DELAY_S = 1.0
MAX_QUICK_DEATHS = 5  # local workers dying this often within a minute: give up
MAX_WRITE_BACKLOG = 4  # results waiting for the writer before dispatch pauses


def _abs_config(cfg: Config, out: Path) -> Config:
    """The configuration sent to workers: every path absolute (workers may run elsewhere)."""
    gain = cfg.gain
    if gain.file:
        gain = dataclasses.replace(gain, file=os.path.abspath(gain.file))
    if gain.defects:
        gain = dataclasses.replace(gain, defects=os.path.abspath(gain.defects))
    picks = cfg.picks
    if picks.dir:
        picks = dataclasses.replace(picks, dir=os.path.abspath(picks.dir))
    return dataclasses.replace(cfg, out=str(out), movies=os.path.abspath(cfg.movies or "."), gain=gain, picks=picks)


def plan_workers(cfg: Config) -> list[int | None]:
    """One entry per local worker: a GPU id, or None for a CPU worker."""
    gpus: list[int] = []
    if cfg.device != "cpu":
        if cfg.gpus.strip() != "auto":
            gpus = [int(g) for g in cfg.gpus.split(",") if g.strip()]
            from gpu.backend import gpu_available

            if gpus and not gpu_available():
                raise ConfigError(f"config: gpus = {cfg.gpus} but CuPy sees no GPU on this machine")
        else:
            from gpu.backend import gpu_available

            if gpu_available():
                import cupy

                gpus = list(range(cupy.cuda.runtime.getDeviceCount()))
    if cfg.device == "gpu" and not gpus:
        raise ConfigError("config: device = gpu but no GPU is available (CuPy sees none)")
    if gpus:
        n = cfg.workers or len(gpus)
        return [gpus[i % len(gpus)] for i in range(n)]
    return [None] * (cfg.workers or 1)


def open_output(out: Path, cfg: Config, new: bool) -> tuple[Any, Path]:
    """The Committer for ``out``; with ``new``, OUT-2, OUT-3, ... when OUT holds other parameters."""
    from streamer.output.committer import Committer
    from streamer.output.ledger import FingerprintMismatch

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
        self.columns: Any = None  # the folder's ColumnSet (None until declared)
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
        from streamer.output.committer import CommitError

        try:
            committer, self.out = open_output(self.out, self.cfg, self.new)
            self.done_movies = committer.done_movies()
            self.totals = committer.totals()
            self.columns = committer.columns
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
                        committer.commit(payload)
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
                    elif kind == "declare":
                        committer.declare_columns(target)
                        self.results.put(("ok", target))
                except CommitError as exc:
                    self.results.put(("commit_error", target, str(exc)))
                except ValueError as exc:
                    self.results.put(("rejected" if kind == "commit" else "error", target, str(exc)))
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


class _LocalWorker:
    """A worker process started by the session."""

    def __init__(self, name: str, gpu: int | None) -> None:
        self.name = name
        self.gpu = gpu
        self.proc: subprocess.Popen | None = None
        self.deaths: deque[float] = deque(maxlen=MAX_QUICK_DEATHS)
        self.respawn_at = 0.0


class Session:
    """The state of one ``lmc watch``; :func:`run_session` drives it."""

    def __init__(
        self,
        cfg: Config,
        once: bool = False,
        headless: bool = True,
        new: bool = False,
        on_state: Callable[[dict[str, Any]], None] | None = None,
        controls: Any = None,
        worker_handler: str | None = None,
    ) -> None:
        if not cfg.movies or not cfg.out:
            raise ConfigError("config: movies and out are required")
        if not cfg.picks.dir:
            raise ConfigError("config: picks.dir is required (--picks DIR: the pick files, matched to movies by name)")
        # files every movie needs: stop cleanly before anything is written, not fail movie after movie
        for key, path in (("gain.file", cfg.gain.file), ("gain.defects", cfg.gain.defects)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{path}: {key} not found (or not a file)")
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{path}: {key} is not readable")
        self.cfg = cfg
        self.once = once
        self.headless = headless
        self.new = new
        self.on_state = on_state
        self.controls = controls
        self.worker_handler = worker_handler
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.phase = "starting"
        self.drain = False
        self.abort = False
        self.abort_reason = ""
        self.signals = 0
        self.writer: Writer | None = None
        self.dispatcher: Dispatcher | None = None
        self.watcher: Watcher | None = None
        self.out = Path(os.path.abspath(cfg.out))
        self.locals: list[_LocalWorker] = []
        self.inflight: dict[str, Job] = {}
        self.submitted = 0
        self.latencies: deque[float] = deque(maxlen=500)
        # commits of the last RECENT_WINDOW_S in one-second buckets [second, movies, particles]: at most
        # RECENT_WINDOW_S + 1 buckets however fast movies come (one entry per movie would grow with the rate)
        self.commits: deque[list[int]] = deque()
        self.session_counts = {"done": 0, "failed": 0, "skipped": 0, "particles": 0}
        self.recent: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.warnings: deque[str] = deque(maxlen=KEEP)
        self.errors: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.totals: dict[str, int] = {}
        self._log_handlers: list[logging.Handler] = []
        self._next_state = 0.0
        self._next_status = 0.0
        self._old_signals: dict[int, Any] = {}

    # -- set-up -----------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        logger = logging.getLogger("lmc")
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(self.out / "logs" / "lmc.log")
        fh.setFormatter(fmt)
        self._log_handlers.append(fh)
        if self.headless:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(fmt)
            self._log_handlers.append(sh)
        for h in self._log_handlers:
            logger.addHandler(h)

    def _teardown_logging(self) -> None:
        logger = logging.getLogger("lmc")
        for h in self._log_handlers:
            logger.removeHandler(h)
            h.close()
        self._log_handlers.clear()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_signals[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_signals.items():
            signal.signal(sig, handler)
        self._old_signals.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            self.drain = True
            log.warning("%s: draining (finishing running movies); send it again to abort", name)
        else:
            self.abort = True
            self.abort_reason = f"aborted by a second {name}"
            log.warning("%s again: aborting; unfinished movies will be redone by the next run", name)

    def _start(self) -> None:
        if self.once and not split_pattern(self.cfg.movies or ".")[0].exists():
            raise ConfigError(f"{self.cfg.movies}: no such file or folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = Writer(self.out, self.cfg, self.new)
        self.writer.start()
        out = self.writer.out
        asked, self.out = self.out, out
        self._setup_logging()
        if out != asked:
            msg = f"{asked} holds other processing parameters; writing to {out} instead (--new)"
            log.warning("%s", msg)
            self.warnings.append(msg)
        cfg = _abs_config(self.cfg, self.out)
        self.job_cfg = cfg
        self.totals = dict(self.writer.totals)
        log.info("session starting: movies %s, picks %s, out %s (%d movies already done)", cfg.movies,
                 cfg.picks.dir, self.out, self.totals.get("done", 0))
        from streamer.live.jobspec import MAX_FRAME_BYTES
        from streamer.live.keys import session_keys

        # no peer joins without a key, loopback included: the folder's own keys unless --keys is given
        self.keys_dir = Path(os.path.abspath(cfg.keys)) if cfg.keys else session_keys(self.out)
        self.columns = self.writer.columns
        self.dispatcher = Dispatcher(
            cfg.bind, config=cfg.to_dict(), keys=self.keys_dir, max_frame_bytes=MAX_FRAME_BYTES,
            heartbeat=cfg.heartbeat, liveness=cfg.liveness, max_attempts=cfg.max_attempts, float16=cfg.float16,
        )
        endpoint = self.dispatcher.start()
        host, port = endpoint.rsplit(":", 1)
        self.connect = f"tcp://127.0.0.1:{port}" if host in ("tcp://0.0.0.0", "tcp://*") else endpoint
        self.endpoint = endpoint
        if self.connect != endpoint or not endpoint.startswith("tcp://127."):
            log.info("remote workers can join with: lmc worker --connect tcp://%s:%s --keys %s", socket.getfqdn(), port,
                     self.keys_dir)
        plan = plan_workers(cfg)
        self.threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(len(plan), 1))
        cpu_i = 0
        for gpu in plan:
            name = f"gpu{gpu}" if gpu is not None else f"cpu{cpu_i}"
            if gpu is None:
                cpu_i += 1
            if any(w.name == name for w in self.locals):
                name = f"{name}-{len(self.locals)}"
            self.locals.append(_LocalWorker(name, gpu))
        for w in self.locals:
            self._spawn(w)
        self.watcher = Watcher(
            cfg.movies, cfg.picks.dir, picks_format=cfg.picks.format, settle_seconds=cfg.settle_seconds,
            incomplete_timeout=cfg.incomplete_timeout, picks_timeout=cfg.picks_timeout, newest_first=cfg.newest_first,
            poll=cfg.poll, poll_only=cfg.poll_only, reprocess_changed_picks=cfg.reprocess_changed_picks, once=self.once,
            done=self.writer.done_movies,
        )
        self.writer.done_movies = set()  # the watcher holds its own record; one copy per movie is enough
        self.watcher.start()
        self.phase = "running"

    def _spawn(self, w: _LocalWorker) -> None:
        cfg = self.job_cfg
        cmd = [sys.executable, "-m", "streamer.live.worker", "--connect", self.connect, "--exit-with-parent",
               "--name", w.name, "--heartbeat", str(cfg.heartbeat), "--liveness", str(cfg.liveness)]
        if w.gpu is not None:
            cmd += ["--gpu", str(w.gpu), "--device", "gpu"]
        else:
            cmd += ["--device", "cpu"]
        cmd += ["--threads", str(self.threads)]  # decoding (and CPU FFTs) share the cores between workers
        cmd += ["--keys", str(self.keys_dir)]
        if self.worker_handler:
            cmd += ["--handler", self.worker_handler]
        env = dict(os.environ)
        if w.gpu is None:  # keep BLAS from starting a thread per core in every CPU worker
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(self.threads)
        with open(self.out / "logs" / f"worker-{w.name}.log", "ab") as logf:
            w.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env)
        log.info("started local worker %s (pid %d)", w.name, w.proc.pid)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._install_signals()
        try:
            self._start()
            while not self._step():
                pass
        except BaseException as exc:
            if not self.abort:
                self.abort = True
                self.abort_reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._shutdown()
            self._restore_signals()
        return self.summary()

    def _step(self) -> bool:
        """One pass of the loop; True when the session is over."""
        assert self.dispatcher is not None and self.watcher is not None
        if self.controls is not None and getattr(self.controls, "quit_requested", False) and not self.drain:
            self.drain = True
            log.warning("quit requested: draining (finishing running movies)")
        if self.abort:
            return True
        paused = bool(getattr(self.controls, "paused", False)) if self.controls is not None else False
        if not self.drain:
            for notice in self.watcher.tick():
                self._notice(notice)
        if self.drain:
            self.phase = "draining"
            for job in self.dispatcher.cancel_unstarted():
                self._unsubmit(job)
        elif not paused:
            self._dispatch()
        for event in self.dispatcher.poll(0.05):
            self._event(event)
            if self.abort:
                return True
        self._written()
        if self.abort:
            return True
        self._supervise()
        now = time.monotonic()
        if now >= self._next_state:
            self._next_state = now + STATE_EVERY_S
            self._publish(now)
        return self._finished()

    def _finished(self) -> bool:
        assert self.dispatcher is not None and self.watcher is not None
        assert self.writer is not None
        if self.dispatcher.pending() or self.writer.pending:
            return False
        if self.drain:
            return True
        if self.cfg.max_movies and self.submitted >= self.cfg.max_movies:
            log.info("max_movies = %d reached", self.cfg.max_movies)
            return True
        return self.once and self.watcher.pending() == 0 and self.watcher.scans > 0

    def _dispatch(self) -> None:
        assert self.dispatcher is not None and self.watcher is not None
        assert self.writer is not None
        if self.writer.commits_pending >= MAX_WRITE_BACKLOG:
            return  # the disk is the bottleneck: keep results from piling up in memory
        free = self.dispatcher.capacity()
        if self.cfg.max_movies:
            free = min(free, self.cfg.max_movies - self.submitted)
        if free <= 0:
            return
        for e in self.watcher.ready(free, exclude=set(self.inflight)):
            picks = e.picks.path if e.picks is not None else None
            spec = self._spec(e)
            if spec is None:
                continue
            job = self.dispatcher.submit(e.path, picks, meta={"ready_at": e.ready_at or time.monotonic()}, spec=spec)
            self.inflight[e.path] = job
            self.submitted += 1

    def _spec(self, e: Any) -> Any:
        """What this movie's result must be (``jobspec``), read by the session itself; the first movie
        fixes the folder's columns from its pick file. A movie that cannot run fails here, at once."""
        from streamer.formats.columns import ColumnSet
        from streamer.live.jobspec import job_spec, picks_columns

        assert self.writer is not None and self.watcher is not None
        try:
            if self.columns is None:
                self.columns = ColumnSet.of(picks_columns(e.picks)[1])
                self.writer.put("declare", self.columns)
            return job_spec(self.cfg, e.path, e.picks, self.columns)
        except Exception as exc:  # PicksError, MovieError, JobRefused, ColumnError, OSError: one line
            from streamer.errors import one_line

            reason = one_line(exc)
            self.writer.put("failed", e.path, reason)
            self.watcher.mark(e.path, "failed", reason)
            self.session_counts["failed"] += 1
            self.errors.append({"movie": e.path, "reason": reason, "time": time.time()})
            log.error("failed: %s", reason if e.path in reason else f"{e.path}: {reason}")
            return None

    def _unsubmit(self, job: Job) -> None:
        self.inflight.pop(job.movie, None)
        self.submitted -= 1
        assert self.watcher is not None
        self.watcher.mark(job.movie, "queued")

    def _event(self, ev: Event) -> None:
        assert self.watcher is not None
        job = ev.job
        if ev.kind == "started" and job is not None:
            self.watcher.mark(job.movie, "running")
        elif ev.kind == "requeued" and job is not None:
            self.watcher.mark(job.movie, "queued")
        elif ev.kind == "cancelled" and job is not None:
            self._unsubmit(job)
        elif ev.kind == "result" and job is not None and ev.result is not None:
            self._commit(job, ev)
        elif ev.kind in ("failed", "poison") and job is not None:
            assert self.writer is not None
            self.inflight.pop(job.movie, None)
            self.writer.put("failed", job.movie, ev.reason)
            self.watcher.mark(job.movie, "failed", ev.reason)
            self.session_counts["failed"] += 1
            self.errors.append({"movie": job.movie, "reason": ev.reason, "time": time.time()})
            log.error("failed: %s", ev.reason if job.movie in ev.reason else f"{job.movie}: {ev.reason}")
        elif ev.kind == "lost":
            self.warnings.append(f"worker {ev.worker} lost: {ev.reason}")

    def _commit(self, job: Job, ev: Event) -> None:
        assert self.writer is not None and ev.result is not None
        ev.result.movie = job.movie
        job.meta["result"] = ev.result
        job.meta["worker"] = ev.worker
        self.writer.put("commit", job, ev.result)

    def _written(self) -> None:
        """Outcomes from the writer thread."""
        assert self.writer is not None
        for outcome in self.writer.outcomes():
            kind, target = outcome[0], outcome[1]
            if kind == "committed":
                self._committed(target, outcome[3])
            elif kind == "rejected":  # a result that does not fit this output (e.g. another box size)
                target.meta.pop("result", None)
                self._event(Event("failed", job=target, reason=f"{target.movie}: not committed: {outcome[2]}"))
            elif kind in ("commit_error", "error"):
                # the disk is full or unwritable: stop; the next run redoes what was not committed
                movie = target.movie if isinstance(target, Job) else str(target)
                self.abort = True
                self.abort_reason = outcome[2]
                log.error("%s", outcome[2])
                self.errors.append({"movie": movie, "reason": outcome[2], "time": time.time()})

    def _committed(self, job: Job, now: float) -> None:
        assert self.watcher is not None
        result = job.meta.pop("result")
        worker = job.meta.pop("worker", "")
        self.inflight.pop(job.movie, None)
        self.watcher.mark(job.movie, "done")
        latency = now - float(job.meta.get("ready_at", now))
        self.latencies.append(latency)
        second = int(now)
        if self.commits and self.commits[-1][0] == second:
            self.commits[-1][1] += 1
            self.commits[-1][2] += result.n
        else:
            self.commits.append([second, 1, result.n])
        self.session_counts["done"] += 1
        self.session_counts["particles"] += result.n
        stats = result.stats or {}
        seconds = sum(v for k, v in stats.items() if k.startswith("seconds_") and isinstance(v, (int, float)))
        self.recent.append({
            "movie": job.movie,
            "particles": result.n,
            "motion_total_A": stats.get("motion_total_A"),
            "motion_early_A": stats.get("motion_early_A"),
            "local_mean_A": stats.get("local_mean_A"),
            "quality_gain": stats.get("quality_gain"),
            "seconds": round(seconds, 2) if seconds else (round(now - job.started, 2) if job.started else None),
            "latency_s": round(latency, 3),
            "worker": worker,
            "time": time.time(),
        })
        for w in stats.get("warnings") or []:
            self.warnings.append(f"{Path(job.movie).name}: {w}")
        log.info("done: %s (%d particles, %.2f s after ready)", job.movie, result.n, latency)

    def _notice(self, n: Notice) -> None:
        assert self.writer is not None
        if n.kind == "incomplete":
            self.writer.put("failed", n.path, n.message)
            self.session_counts["failed"] += 1
            self.errors.append({"movie": n.path, "reason": n.message, "time": time.time()})
            log.error("%s", n.message)
            return
        if n.kind == "skipped":
            self.writer.put("skipped", n.path, n.message)
            self.session_counts["skipped"] += 1
        elif n.kind in ("picks_changed", "picks_arrived") and self.cfg.reprocess_changed_picks:
            self.writer.put("forget", n.path)
        self.warnings.append(n.message)
        log.warning("%s", n.message)

    def _supervise(self) -> None:
        assert self.dispatcher is not None
        now = time.monotonic()
        for w in self.locals:
            if w.proc is None:
                if not self.drain and now >= w.respawn_at:
                    self._spawn(w)
                continue
            code = w.proc.poll()
            if code is None:
                continue
            reason = f"process exited with code {code}"
            for ev in self.dispatcher.worker_died(w.proc.pid, reason, host=socket.gethostname()):
                self._event(ev)
            w.proc = None
            w.deaths.append(now)
            if len(w.deaths) == MAX_QUICK_DEATHS and now - w.deaths[0] < 60:
                self.abort = True
                self.abort_reason = (f"local worker {w.name} died {MAX_QUICK_DEATHS} times within a minute "
                                     f"(see {self.out / 'logs' / f'worker-{w.name}.log'})")
                log.error("%s", self.abort_reason)
                return
            log.warning("local worker %s %s; restarting it", w.name, reason)
            w.respawn_at = now + RESPAWN_DELAY_S

    # -- state ------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The session state for the console and ``status.json``.

        Keys: ``version``, ``time`` (epoch), ``phase`` (starting|running|draining|finished|aborted),
        ``session`` {movies, picks, out, started, uptime_s, endpoint, pid, host, once},
        ``counts`` {state: n} over every watcher state, ``particles``, ``stacks``, ``totals`` (the
        output folder's done/failed/skipped/particles/stacks), ``this_session`` (the same, this run),
        ``rates`` {movies_per_hour, movies_per_hour_recent, particles_per_s, particles_per_s_recent,
        latency_median_s, latency_p95_s, latency_last_s, backlog}, ``workers`` [{name, host, pid,
        device, gpu, state, movie, job_seconds, queued, done, failed, mean_s, gpu_mem_mb,
        busy_fraction, last_seen_s}], ``recent`` [{movie, particles, motion_total_A, motion_early_A,
        local_mean_A, quality_gain, seconds, latency_s, worker, time}] (newest last), ``waiting``
        [{movie, state, seconds, reason}], ``warnings`` [str], ``errors`` [{movie, reason, time}],
        ``paused``, ``quit_requested``, ``dropped_messages``.
        """
        now = time.monotonic()
        uptime = now - self.started
        counts = self.watcher.counts() if self.watcher else {}
        cutoff = now - RECENT_WINDOW_S
        while self.commits and self.commits[0][0] + 1 <= cutoff:  # buckets wholly before the window
            self.commits.popleft()
        window = min(RECENT_WINDOW_S, max(uptime, 1e-9))
        lat = sorted(self.latencies)
        done = self.session_counts["done"]
        rates = {
            "movies_per_hour": round(done / max(uptime, 1e-9) * 3600, 1),
            "movies_per_hour_recent": round(sum(b[1] for b in self.commits) / window * 3600, 1),
            "particles_per_s": round(self.session_counts["particles"] / max(uptime, 1e-9), 2),
            "particles_per_s_recent": round(sum(b[2] for b in self.commits) / window, 2),
            "latency_median_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
            "latency_last_s": round(self.latencies[-1], 3) if self.latencies else None,
            "backlog": sum(counts.get(k, 0) for k in ("settling", "queued", "running")),
        }
        cfg = self.cfg
        return clean({
            "version": 1,
            "time": time.time(),
            "phase": self.phase,
            "session": {
                "movies": cfg.movies,
                "picks": cfg.picks.dir,
                "out": str(self.out),
                "started": self.started_wall,
                "uptime_s": round(uptime, 1),
                "endpoint": getattr(self, "endpoint", None),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "once": self.once,
            },
            "counts": counts,
            "particles": self.totals.get("particles", 0),
            "stacks": self.totals.get("stacks", 0),
            "totals": dict(self.totals),
            "this_session": dict(self.session_counts),
            "rates": rates,
            "workers": self.dispatcher.snapshot() if self.dispatcher else [],
            "recent": list(self.recent),
            "waiting": self.watcher.waiting() if self.watcher else [],
            "warnings": list(self.warnings),
            "errors": list(self.errors),
            "paused": bool(getattr(self.controls, "paused", False)) if self.controls is not None else False,
            "quit_requested": self.drain,
            "dropped_messages": self.dispatcher.dropped if self.dispatcher else 0,
        })

    def _publish(self, now: float, force: bool = False) -> None:
        if self.writer is not None:
            self.totals = dict(self.writer.totals)
        # derived fields (disk space, ETA, trend, alerts) once here, so console and status.json agree
        snap = enrich_snapshot(self.snapshot(), self.out)
        if self.on_state is not None:
            try:
                self.on_state(snap)
            except Exception:
                log.exception("on_state callback failed")
        if force or now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            try:
                write_status(self.out, snap)
            except OSError as exc:
                log.warning("%s: cannot write status.json: %s", self.out, exc)

    def _shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        joined: set[int] = set()
        if self.dispatcher is not None:
            joined = {w.pid for w in self.dispatcher.workers.values()}
            self.dispatcher.close(stop_workers=True)
        deadline = time.monotonic() + 3.0
        for w in self.locals:
            if w.proc is None:
                continue
            # a worker that never joined cannot hear "stop" (and ignores SIGTERM): no point waiting
            wait = 0 if self.abort or w.proc.pid not in joined else max(deadline - time.monotonic(), 0.01)
            try:
                w.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(timeout=10)
        self.phase = "aborted" if self.abort else "finished"
        if self.writer is not None:
            opened = self.writer.opened
            try:
                self.writer.close(abort=self.abort)
                self._written()  # commits that landed while draining
            finally:
                if opened:  # never write status.json into a folder we refused to open
                    self._publish(time.monotonic(), force=True)
        log.info("session %s: %s", self.phase, self.session_counts)
        self._teardown_logging()

    def summary(self) -> dict[str, Any]:
        """What ``lmc run`` / ``lmc watch`` print at the end (folder totals + this run)."""
        lat = sorted(self.latencies)
        failures = []
        try:
            from streamer.output.ledger import Ledger

            led = Ledger(self.out / "ledger.sqlite", readonly=True)
            failures = [(m, r) for m, r in led.failed()]
            led.close()
        except Exception as exc:
            log.debug("ledger unreadable for the summary: %s", exc)
        return {
            "done": self.totals.get("done", 0),
            "failed": self.totals.get("failed", 0),
            "skipped": self.totals.get("skipped", 0),
            "particles": self.totals.get("particles", 0),
            "stacks": self.totals.get("stacks", 0),
            "this_session": dict(self.session_counts),
            "failures": failures,
            "out": str(self.out),
            "aborted": self.abort,
            "reason": self.abort_reason,
            "elapsed_s": round(time.monotonic() - self.started, 2),
            "latency_median_s": statistics.median(lat) if lat else None,
            "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        }


def run_session(
    cfg: Config,
    once: bool = False,
    headless: bool = True,
    new: bool = False,
    on_state: Callable[[dict[str, Any]], None] | None = None,
    controls: Any = None,
    *,
    worker_handler: str | None = None,
) -> dict[str, Any]:
    """Run ``lmc watch`` (``once``: ``lmc run``) until done, drained or aborted; returns the summary.

    ``on_state(snapshot)`` is called about once a second (see :meth:`Session.snapshot`);
    ``controls`` (``paused``, ``quit_requested`` attributes) is polled. ``worker_handler``
    (``module:function``) replaces the pipeline in local workers (tests only).
    """
    return Session(cfg, once=once, headless=headless, new=new, on_state=on_state, controls=controls,
                   worker_handler=worker_handler).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m streamer.live.session`` = ``lmc watch`` (for tests and process supervisors)."""
    from streamer.cli import main as cli_main

    return cli_main(["watch", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
