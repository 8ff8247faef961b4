"""``lmc watch`` / ``lmc run``: the session loop, in one process with the watcher, the dispatcher
and the single writer.

The main thread runs the loop (:meth:`Session._step`): tick the watcher, hand ready movies to the
dispatcher as worker slots free up (so the processing order is decided as late as possible), poll
the dispatcher, pass each result to the writer, supervise the local worker processes, and publish a
snapshot. The other jobs live next door, one module each:

* ``streamer.live.writer``: the single writer thread that owns the Committer (one ledger
  transaction per movie), so a slow disk delays commits, not heartbeats; dispatch pauses while it
  is behind (``MAX_WRITE_BACKLOG``).
* ``streamer.live.local_workers``: the local worker processes (plan, start, restart, stop).
* ``streamer.live.slurm``: worker jobs under Slurm (submit, watch, replace, cancel).
* ``streamer.live.metrics``: counts, rates, latencies and publishing the snapshot (``on_state``
  about once a second, ``OUT/status.json`` every few seconds).
* ``streamer.live.signals``: drain on the first SIGINT/SIGTERM or the console's ``q``, abort on the
  second; the console's ``controls`` (``paused``, ``quit_requested``) pause dispatch and drain.
* ``streamer.live.logs``: ``OUT/logs/lmc.log``.

Exactly once: the committer skips movies already in the ledger, the watcher starts from the
ledger's done set, the dispatcher accepts one result per job, so a crash anywhere costs at most the
movies in flight, which are redone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamer.config import Config
from streamer.errors import ConfigError, OutputError, UserError, one_line
from streamer.formats.columns import ColumnSet
from streamer.formats.picks import pick_summary
from streamer.live.diskguard import DiskGuard
from streamer.live.dispatcher import Dispatcher, Event, Job, is_loopback
from streamer.live.jobspec import MAX_FRAME_BYTES, job_spec
from streamer.live.keys import session_keys
from streamer.live.local_workers import LocalWorkers, plan_workers
from streamer.live.logs import SessionLog
from streamer.live.metrics import Metrics, StatusPublisher
from streamer.live.protocol import ResultSpec
from streamer.live.signals import SignalHandlers, StopFlags
from streamer.live.slurm import SlurmPool, dispatcher_bind, job_endpoint, worker_command, worker_name
from streamer.live.watcher import Notice, Watcher, match_parts, split_pattern
from streamer.live.writer import Writer
from streamer.output.accounting import folder_account, movie_line, no_particle_warning
from streamer.output.ledger import Ledger
from streamer.output.status import clean
from streamer.physical import describe as describe_physical
from streamer.physical import resolve_session

log = logging.getLogger("lmc.session")

MAX_WRITE_BACKLOG = 4  # results waiting for the writer before dispatch pauses


def config_for_workers(cfg: Config, out: Path) -> Config:
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


def remote_join_command(endpoint: str, keys: str | None) -> list[str] | None:
    """The ``lmc worker`` command line that joins a worker on another node to the dispatcher at
    ``endpoint`` (the session logs it); None when the dispatcher listens on loopback only."""
    if is_loopback(endpoint):
        return None
    port = endpoint.rsplit(":", 1)[1]
    cmd = ["lmc", "worker", "--connect", f"tcp://{socket.getfqdn()}:{port}"]
    if keys:
        cmd += ["--keys", os.path.abspath(keys)]
    return cmd


def first_movie(spec: str) -> str | None:
    """The first movie (sorted) that ``spec`` (a folder, file or glob) matches now, or None."""
    from streamer.formats.movies import is_movie

    root, pattern = split_pattern(spec)
    if root.is_file():
        return str(root)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = Path(path).relative_to(root).parts
            if (match_parts(rel, pattern) if pattern is not None else True) and is_movie(path):
                return path
    return None


def check_writable(out: Path) -> None:
    """OutputError (one line naming the folder) unless ``out`` can be created and written: a read-only
    or full file system, or a folder without permission, stops the session before anything starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".lmc-write-test-{os.getpid()}"
        probe.write_bytes(b"lmc")
        probe.unlink()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise OutputError(f"{out}: cannot write to the output folder ({why}); choose a writable --out "
                          "(nothing was written)") from None


def check_inputs(cfg: Config) -> None:
    """Stop before anything is written when a file every movie needs is missing (rather than fail
    movie after movie)."""
    if not cfg.movies or not cfg.out:
        raise ConfigError("config: movies and out are required")
    if not cfg.picks.dir:
        raise ConfigError("config: picks.dir is required (--picks DIR: the pick files, matched to movies by name)")
    if os.path.isfile(cfg.picks.dir):  # one pick file for every movie: unusable means nothing can run
        from streamer.formats.picks import PickIndex

        unusable = PickIndex(cfg.picks.dir, format=cfg.picks.format).unusable
        if unusable:
            raise ConfigError(next(iter(unusable.values())))
    for key, path in (("gain.file", cfg.gain.file), ("gain.defects", cfg.gain.defects)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{path}: {key} not found (or not a file)")
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{path}: {key} is not readable")


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
        command: str = "watch",
    ) -> None:
        check_inputs(cfg)
        self.cfg = cfg
        self.command = command
        self.once = once
        self.headless = headless
        self.new = new
        self.controls = controls
        self.worker_handler = worker_handler
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.phase = "starting"
        self.stop = StopFlags()
        self.out = Path(os.path.abspath(cfg.out or "."))
        self.job_cfg: Config = cfg  # with absolute paths once the output folder is open
        self.endpoint: str | None = None  # where the dispatcher listens
        self.connect = ""  # the endpoint as local workers reach it
        self.writer: Writer | None = None
        self.dispatcher: Dispatcher | None = None
        self.watcher: Watcher | None = None
        self.workers: LocalWorkers | None = None
        self.slurm: SlurmPool | None = None
        self._slurm_alert = ""
        self.inflight: dict[str, Job] = {}
        self.submitted = 0
        self.metrics = Metrics()
        self.totals: dict[str, int] = {}  # the output folder's, as the writer last reported them
        self.columns: ColumnSet | None = None  # the folder's columns (fixed by this session from a pick file)
        self._picks_used: dict[str, tuple] | None = None  # done movies' pick files, checked once at start
        self.disk = DiskGuard(self.out, cfg.min_free_gb)
        self.publisher = StatusPublisher(on_state)
        self._signals = SignalHandlers(self.stop)
        self._log = SessionLog()

    # -- set-up -----------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.once and not split_pattern(self.cfg.movies or ".")[0].exists():
            raise ConfigError(f"{self.cfg.movies}: no such file or folder")
        # the pixel size and exposure, settled before the output folder's fingerprint is checked
        self.cfg = resolve_session(self.cfg, first_movie(self.cfg.movies or "."))
        check_writable(self.out)
        # logging first: what opening the folder repairs after a crash (a stack cut back) is logged
        self._log.attach(self.out, to_stderr=self.headless)
        for line in describe_physical(self.cfg):
            log.info("%s", line)
        self.writer = Writer(self.out, self.cfg, self.new)
        self.writer.start()
        asked, self.out = self.out, self.writer.out
        if self.out != asked:
            self._log.detach()
            self._log.attach(self.out, to_stderr=self.headless)
            self.disk.out = self.out
            msg = f"{asked} holds other processing parameters; writing to {self.out} instead (--new)"
            log.warning("%s", msg)
            self.metrics.warn(msg)
        # no peer joins without a key, loopback included: the folder's own keys unless --keys is given
        keys = os.path.abspath(self.cfg.keys) if self.cfg.keys else str(session_keys(self.out))
        cfg = self.job_cfg = dataclasses.replace(config_for_workers(self.cfg, self.out), keys=keys)
        self.columns = self.writer.columns
        self.totals = dict(self.writer.totals)
        log.info("session starting: movies %s, picks %s, out %s (%d movies already done)", cfg.movies,
                 cfg.picks.dir, self.out, self.totals.get("done", 0))
        self._start_dispatcher(cfg)
        if cfg.slurm.workers:
            assert self.endpoint is not None
            connect = job_endpoint(self.endpoint, cfg.slurm.host)
            if is_loopback(connect) or connect.startswith("tcp://localhost"):
                msg = (f"slurm: jobs will connect to {connect}, which only this machine can reach; jobs on other "
                       "nodes need --slurm-host (this machine's name or address on the cluster network)")
                log.warning("%s", msg)
                self.metrics.warn(msg)
            self.slurm = SlurmPool(cfg.slurm, self.out, worker_command(connect, cfg.keys, cfg.heartbeat, cfg.liveness))
            self.slurm.start()
        # with Slurm workers, workers = 0 means none here (the head node only dispatches and writes)
        plan = [] if cfg.slurm.workers and not cfg.workers else plan_workers(cfg)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(len(plan), 1))
        self.workers = LocalWorkers(self.out, self.connect, cfg, plan, threads, self.worker_handler)
        self.workers.start()
        self.watcher = Watcher(
            cfg.movies, cfg.picks.dir, picks_format=cfg.picks.format, settle_seconds=cfg.settle_seconds,
            incomplete_timeout=cfg.incomplete_timeout, picks_timeout=cfg.picks_timeout, newest_first=cfg.newest_first,
            poll=cfg.poll, poll_only=cfg.poll_only, reprocess_changed_picks=cfg.reprocess_changed_picks, once=self.once,
            done=self.writer.done_movies,
        )
        self.writer.done_movies = set()  # the watcher holds its own record; one copy per movie is enough
        self._picks_used, self.writer.picks_used = self.writer.picks_used, {}
        self.watcher.start()
        self.phase = "running"

    def _start_dispatcher(self, cfg: Config) -> None:
        bind = cfg.bind
        if cfg.slurm.workers:  # jobs on other nodes must reach the dispatcher (CURVE keys: always, see _start)
            bind = dispatcher_bind(cfg.bind)
        self.dispatcher = Dispatcher(
            bind, config=cfg.to_dict(), keys=cfg.keys, max_frame_bytes=MAX_FRAME_BYTES, heartbeat=cfg.heartbeat,
            liveness=cfg.liveness, max_attempts=cfg.max_attempts, float16=cfg.float16,
        )
        endpoint = self.endpoint = self.dispatcher.start()
        host, port = endpoint.rsplit(":", 1)
        self.connect = f"tcp://127.0.0.1:{port}" if host in ("tcp://0.0.0.0", "tcp://*") else endpoint
        join = remote_join_command(endpoint, cfg.keys)
        if join is not None:
            log.info("remote workers can join with: %s", shlex.join(join))

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._signals.install()
        try:
            self._start()
            while not self._step():
                pass
        except BaseException as exc:
            if not self.stop.abort:
                self.stop.request_abort(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._shutdown()
            self._signals.restore()
        return self.summary()

    def _step(self) -> bool:
        """One pass of the loop; True when the session is over."""
        assert self.dispatcher is not None and self.watcher is not None
        stop = self.stop
        if self.controls is not None and getattr(self.controls, "quit_requested", False):
            stop.request_drain("quit requested")
        if stop.abort:
            return True
        paused = bool(getattr(self.controls, "paused", False)) if self.controls is not None else False
        if not stop.drain:
            for notice in self.watcher.tick():
                self._notice(notice)
            if self._picks_used is not None and self.watcher.index is not None:
                self._picks_changed_while_down()
        if stop.drain:
            self.phase = "draining"
            for job in self.dispatcher.cancel_unstarted():
                self._unsubmit(job)
        elif not paused and not self._disk_paused():
            self._dispatch()
        for event in self.dispatcher.poll(0.05):
            self._event(event)
            if stop.abort:
                return True
        self._written()
        if stop.abort:
            return True
        self._supervise()
        now = time.monotonic()
        if self.publisher.due(now):
            self._publish(now)
        return self._finished()

    def _finished(self) -> bool:
        assert self.dispatcher is not None and self.watcher is not None
        assert self.writer is not None
        if self.dispatcher.pending() or self.writer.pending:
            return False
        if self.stop.drain:
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
            job = self.dispatcher.submit(e.path, picks, meta={"ready_at": e.ready_at or time.monotonic(),
                                                              "picks_source": e.picks}, spec=spec)
            self.inflight[e.path] = job
            self.submitted += 1

    def _spec(self, e: Any) -> ResultSpec | None:
        """What this movie's result must be (``jobspec``), read by the session itself; the first movie
        fixes the folder's columns from its pick file. A movie that cannot run fails here, at once."""
        assert self.writer is not None
        try:
            if self.columns is None:
                self.columns = ColumnSet.of(pick_summary(e.picks)[1])
                self.writer.put("declare", self.columns)
            return job_spec(self.cfg, e.path, e.picks, self.columns)
        except ConfigError as exc:  # the configuration cannot work for any movie (box larger than the frame)
            self.stop.request_abort(str(exc))
            log.error("%s", exc)
            return None
        except (UserError, OSError) as exc:  # unreadable picks/movie, an unwritable name, a too-large job
            self._fail(e.path, one_line(exc))
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
            self.inflight.pop(job.movie, None)
            self._fail(job.movie, ev.reason)
        elif ev.kind == "joined" and self.slurm is not None and ev.worker.startswith("slurm-"):
            self.slurm.joined(ev.worker.removeprefix("slurm-"))
        elif ev.kind == "lost":
            self.metrics.warn(f"worker {ev.worker} lost: {ev.reason}")

    def _disk_paused(self) -> bool:
        """Dispatch waits while the output disk is below ``min_free_gb`` (``diskguard``)."""
        msg = self.disk.check()
        if msg is not None:
            self.metrics.warn(msg)
        return self.disk.paused

    def _picks_changed_while_down(self) -> None:
        """Once, when the pick files are first indexed: a done movie whose pick file is not the one
        it was processed with (path, size or mtime differ: edited, replaced, re-picked while lmc was
        not running) is reported, and redone with ``reprocess_changed_picks``."""
        assert self.watcher is not None and self.watcher.index is not None and self._picks_used is not None
        used, self._picks_used = self._picks_used, None
        changed = 0
        for movie, (path, _fmt, mtime, size, _mic) in used.items():
            src = self.watcher.index.lookup(movie)
            if src is None or (src.path, src.mtime, src.size) == (path, mtime, size):
                continue
            changed += 1
            what = f"{movie}: pick file {src.path} changed since the movie was processed (while lmc was not running)"
            if self.cfg.reprocess_changed_picks:
                self.watcher.revive(movie)
                self._notice(Notice("picks_changed", movie, f"{what}; reprocessing"))
            else:
                self._notice(Notice("picks_changed", movie, f"{what} (not reprocessed; set reprocess_changed_picks "
                                                             "to redo it)"))
        if changed:
            log.info("%d done movie(s) have pick files that changed while lmc was not running", changed)

    def _fail(self, movie: str, reason: str) -> None:
        assert self.writer is not None and self.watcher is not None
        self.writer.put("failed", movie, reason)
        self.watcher.mark(movie, "failed", reason)
        self.metrics.failed(movie, reason)
        log.error("failed: %s", reason if movie in reason else f"{movie}: {reason}")

    def _commit(self, job: Job, ev: Event) -> None:
        assert self.writer is not None and ev.result is not None
        ev.result.movie = job.movie
        if self.columns is not None:  # columns of this pick file the folder does not carry: not written
            dropped = sorted(set(ev.result.columns) - set(self.columns.labels))
            if dropped:
                ev.result.columns = self.columns.carried_of(ev.result.columns)
                log.info("%s: pick file column(s) %s not carried (this folder's columns were fixed by the "
                         "first pick file)", job.movie, ", ".join(dropped))
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
                self.stop.request_abort(outcome[2])
                log.error("%s", outcome[2])
                self.metrics.error(movie, outcome[2])

    def _committed(self, job: Job, now: float) -> None:
        assert self.watcher is not None
        result = job.meta.pop("result")
        worker = job.meta.pop("worker", "")
        if self.slurm is not None and worker.startswith("slurm-"):
            self.slurm.worker_ran()
        self.inflight.pop(job.movie, None)
        self.watcher.mark(job.movie, "done")
        latency = now - float(job.meta.get("ready_at", now))
        self.metrics.committed(job.movie, result.n, result.stats or {}, latency, now,
                               now - job.started if job.started else None, worker)
        stats = result.stats or {}
        log.info("done: %s (%s; %.2f s after ready)", job.movie, movie_line(stats), latency)
        for note in stats.get("notes") or []:
            log.info("%s", note)
        empty = no_particle_warning(job.movie, stats)
        if empty is not None:
            log.warning("%s", empty)

    def _notice(self, n: Notice) -> None:
        assert self.writer is not None
        if n.kind == "incomplete":
            self.writer.put("failed", n.path, n.message)
            self.metrics.failed(n.path, n.message)
            log.error("%s", n.message)
            return
        if n.kind == "skipped":
            self.writer.put("skipped", n.path, n.message)
            self.metrics.skipped()
        elif n.kind in ("picks_changed", "picks_arrived") and self.cfg.reprocess_changed_picks:
            self.writer.put("forget", n.path)
        self.metrics.warn(n.message)
        log.warning("%s", n.message)

    def _supervise(self) -> None:
        assert self.dispatcher is not None and self.workers is not None
        dispatcher = self.dispatcher

        def died(pid: int, reason: str, host: str) -> None:
            for ev in dispatcher.worker_died(pid, reason, host=host):
                self._event(ev)

        reason = self.workers.supervise(self.stop.drain, died)
        if reason is not None:
            self.stop.request_abort(reason)
            log.error("%s", reason)
        if self.slurm is not None:
            self._supervise_slurm()

    def _supervise_slurm(self) -> None:
        """Jobs that ended: their worker leaves the pool now (its movies are requeued) and the pool
        submits a replacement; a streak of jobs failing at once becomes an error on the console."""
        assert self.slurm is not None and self.dispatcher is not None
        ended = self.slurm.tick(time.monotonic(), draining=self.stop.drain)
        if ended:
            by_name = {w["name"]: w for w in self.dispatcher.snapshot()}
            for e in ended:
                w = by_name.get(worker_name(e.job.job_id))
                if w is not None:
                    for ev in self.dispatcher.worker_died(w["pid"], e.message, host=w["host"]):
                        self._event(ev)
                if not self.stop.drain:
                    self.metrics.warn(e.message)
        alert = self.slurm.alert
        if alert and alert != self._slurm_alert:
            self.metrics.error("", alert)
        self._slurm_alert = alert

    # -- state ------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The session state for the console and ``status.json``.

        Keys: ``version``, ``time`` (epoch), ``phase`` (starting|running|draining|finished|aborted),
        ``session`` {movies, picks, out, started, uptime_s, endpoint, pid, host, once, command ("run" or
        "watch": the command that made the folder's session)}, ``picks`` (this run's pick accounting:
        movies, picks, particles, skipped, skip_reasons {reason: n}, movies_without_particles),
        ``counts`` {state: n} over every watcher state, ``particles``, ``stacks``, ``totals`` (the
        output folder's done/failed/skipped/particles/stacks), ``this_session`` (the same, this run),
        ``rates`` {movies_per_hour, movies_per_hour_recent, particles_per_s, particles_per_s_recent,
        latency_median_s, latency_p95_s, latency_last_s, backlog}, ``workers`` [{name, host, pid,
        device, gpu, state, movie, job_seconds, queued, done, failed, mean_s, gpu_mem_mb,
        busy_fraction, last_seen_s}], ``recent`` [{movie, particles, motion_total_A, motion_early_A,
        local_mean_A, quality_gain, seconds, latency_s, worker, time}] (newest last), ``waiting``
        [{movie, state, seconds, reason}], ``warnings`` [str], ``errors`` [{movie, reason, time}],
        ``paused``, ``quit_requested``, ``disk`` {free_gb, min_free_gb, paused} (dispatch waits for
        space), ``dropped_messages``, ``refused_connections`` (handshakes refused: no or a wrong key), ``slurm`` ({} without Slurm workers, else
        {wanted, ended, alert, jobs [{job_id, state, reason, node, gpus, worker, movie, done, waited_s,
        running_s}]}).
        """
        now = time.monotonic()
        uptime = now - self.started
        counts = self.watcher.counts() if self.watcher else {}
        backlog = sum(counts.get(k, 0) for k in ("settling", "queued", "running"))
        m = self.metrics
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
                "endpoint": self.endpoint,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "once": self.once,
                "command": self.command,
            },
            "picks": m.picks.as_dict(),
            "counts": counts,
            "particles": self.totals.get("particles", 0),
            "stacks": self.totals.get("stacks", 0),
            "totals": dict(self.totals),
            "this_session": dict(m.counts),
            "rates": m.rates(now, uptime, backlog),
            "workers": self.dispatcher.snapshot() if self.dispatcher else [],
            "recent": list(m.recent),
            "waiting": self.watcher.waiting() if self.watcher else [],
            "warnings": list(m.warnings),
            "errors": list(m.errors),
            "paused": bool(getattr(self.controls, "paused", False)) if self.controls is not None else False,
            "quit_requested": self.stop.drain,
            "disk": self.disk.as_dict(),
            "dropped_messages": self.dispatcher.dropped if self.dispatcher else 0,
            "refused_connections": sum(self.dispatcher.refused_counts().values()) if self.dispatcher else 0,
            "slurm": self._slurm_snapshot(now),
        })

    def _slurm_snapshot(self, now: float) -> dict[str, Any]:
        if self.slurm is None:
            return {}
        workers = self.dispatcher.snapshot() if self.dispatcher else []
        return {"wanted": self.cfg.slurm.workers, "ended": self.slurm.ended_count, "alert": self.slurm.alert,
                "jobs": self.slurm.snapshot(workers, now)}

    def _publish(self, now: float, force: bool = False) -> None:
        if self.writer is not None:
            self.totals = dict(self.writer.totals)
        self.publisher.publish(self.snapshot(), self.out, now, force)

    def _shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        joined: set[int] = set()
        if self.dispatcher is not None:
            joined = {w.pid for w in self.dispatcher.workers.values()}
            self.dispatcher.close(stop_workers=True)
        if self.slurm is not None:
            self.slurm.close()  # the workers were told to stop: cancel what is left (pending jobs too)
        if self.workers is not None:
            self.workers.stop(joined, self.stop.abort)
        self.phase = "aborted" if self.stop.abort else "finished"
        if self.writer is not None:
            opened = self.writer.opened
            try:
                self.writer.close(abort=self.stop.abort)
                self._written()  # commits that landed while draining
            finally:
                if opened:  # never write status.json into a folder we refused to open
                    self._publish(time.monotonic(), force=True)
        log.info("session %s: %s", self.phase, self.metrics.counts)
        log.info("picks this run: %s", self.metrics.picks.line())
        self._log.detach()

    def summary(self) -> dict[str, Any]:
        """What ``lmc run`` / ``lmc watch`` print at the end (folder totals + this run)."""
        failures = []
        folder_picks: dict[str, Any] = {}
        try:
            led = Ledger(self.out / "ledger.sqlite", readonly=True)
            failures = [(m, r) for m, r in led.failed()]
            folder_picks = folder_account(r.stats for r in led.rows(with_payload=False)).as_dict()
            led.close()
        except Exception as exc:
            log.debug("ledger unreadable for the summary: %s", exc)
        median, p95 = self.metrics.latency_quantiles()
        return {
            "done": self.totals.get("done", 0),
            "failed": self.totals.get("failed", 0),
            "skipped": self.totals.get("skipped", 0),
            "particles": self.totals.get("particles", 0),
            "stacks": self.totals.get("stacks", 0),
            "this_session": dict(self.metrics.counts),
            "failures": failures,
            "picks": self.metrics.picks.as_dict(),
            "picks_folder": folder_picks,
            "command": self.command,
            "out": str(self.out),
            "aborted": self.stop.abort,
            "stopped_early": self.stop.drain and bool(self.watcher is not None and self.watcher.pending()),
            "reason": self.stop.reason,
            "elapsed_s": round(time.monotonic() - self.started, 2),
            "latency_median_s": median,
            "latency_p95_s": p95,
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
    command: str = "watch",
) -> dict[str, Any]:
    """Run ``lmc watch`` (``once``: ``lmc run``) until done, drained or aborted; returns the summary.

    ``on_state(snapshot)`` is called about once a second (see :meth:`Session.snapshot`);
    ``controls`` (``paused``, ``quit_requested`` attributes) is polled. ``worker_handler``
    (``module:function``) replaces the pipeline in local workers (tests only). ``command``: "run" or
    "watch", recorded in ``status.json`` so ``lmc status`` says which command made the folder.
    """
    return Session(cfg, once=once, headless=headless, new=new, on_state=on_state, controls=controls,
                   worker_handler=worker_handler, command=command).run()
