"""Slurm worker jobs: keep ``slurm.workers`` jobs running ``lmc worker`` for one session.

Slurm allocates the nodes and GPUs; lmc only submits, watches, replaces and cancels its own jobs
through the ordinary client commands (``sbatch``, ``squeue``, ``scontrol``, ``scancel``), so no
accounting database is needed. Each job runs one ``lmc worker --connect tcp://HOST:PORT --keys
DIR --name slurm-<jobid>``; the worker joins the session's ZeroMQ pool with its CURVE keys like any
other worker, and the dispatcher hands it movies. A job is only a container for a worker: when it
ends, the movie it held goes back to the queue (the dispatcher's requeue), and this module
submits a replacement.

Identity. Every job of a session carries the job name ``lmc-<hash of the output folder>`` and a
comment naming the folder, the session's host and pid. The output folder can be open in one
session at a time (its lock), so any job with that name that is not this session's own belongs
to a session that died (crash, SIGKILL, node reboot): :meth:`SlurmPool.start` cancels those
before submitting (their workers know an old endpoint and keys; adopting them is not possible).

Life of a job, as :meth:`SlurmPool.tick` sees it (every ``POLL_S`` seconds, ``squeue -t all``):
PENDING (shown with Slurm's reason; counts towards the N wanted, it is not lost work) ->
RUNNING (node and GPUs read once from ``scontrol show job -d``) -> an end state (COMPLETED,
FAILED, TIMEOUT, PREEMPTED, CANCELLED, NODE_FAIL, OUT_OF_MEMORY, ... or gone from ``squeue``).
A running job that Slurm puts back in the queue (preemption with requeue, ``scontrol requeue``)
stays one of the N, pending again; its worker is gone, so it is reported like an ended job
(``Ended.requeued``) for the session to drop that worker at once.
An ended job is replaced after a back-off that doubles with each job in a row that failed:
ended within ``QUICK_S`` seconds of being submitted, or without its worker ever joining the
session (``BACKOFF_S`` up to ``MAX_BACKOFF_S``); after ``ALERT_AFTER`` such jobs in a row the
session gets one clear error naming the state, the exit code and the job's log. A job running for
``JOIN_WARN_S`` without its worker joining raises an error too (the node cannot reach the head
node's address, or the keys are wrong: the job's log says which). ``sbatch`` refusing the very
first job (a bad partition, account or gres) stops the session at start with sbatch's own words;
refusing a replacement later backs off the same way, with sbatch's words as the error.

When the session ends (drain, SIGTERM, ``--once`` done, abort): :meth:`SlurmPool.close` cancels
every job it still has (``scancel``; the workers were already told to stop) and waits until
``squeue`` lists none of them.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.config import SlurmConfig
from streamer.errors import ConfigError

log = logging.getLogger("lmc.slurm")

POLL_S = 2.0  # seconds between squeue calls
QUICK_S = 60.0  # a job that ends this soon after submission counts as failing at once
BACKOFF_S = 2.0
MAX_BACKOFF_S = 300.0
ALERT_AFTER = 3  # failed jobs in a row before the session shows an error
JOIN_WARN_S = 120.0  # a running job whose worker has not joined by then: say so
CLOSE_WAIT_S = 20.0
COMMAND_TIMEOUT_S = 30.0
ORPHAN_TIMEOUT_S = 300.0  # a job's worker exits after this long without its session (crash, no restart)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
REQUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}  # after RUNNING: back in the queue
DEFAULT_SCRIPT = "#!/bin/bash\n# an lmc worker job (lmc submits, replaces and cancels these itself)\nexec {command}\n"


class SlurmError(RuntimeError):
    """A Slurm command failed (its own message included)."""


def job_name(out: Path) -> str:
    """The job name shared by every worker job of sessions writing to ``out``."""
    return "lmc-" + hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:10]


def worker_name(job_id: str) -> str:
    """The name the job's worker registers under (``--name``), which ties the two together."""
    return f"slurm-{job_id}"


@dataclass
class SlurmJob:
    """One submitted worker job. ``state`` is Slurm's (PENDING, RUNNING, ...) or GONE."""

    job_id: str
    submitted: float
    state: str = "PENDING"
    reason: str = ""
    node: str = ""
    gpus: str = ""
    started: float | None = None
    ended: float | None = None
    joined: bool = False  # its worker registered with the dispatcher
    warned: bool = False

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


@dataclass
class Ended:
    """A job that ended; ``quick``: it failed (ended within ``QUICK_S`` of its submission, or its
    worker never joined); ``requeued``: it did not end but went back to the queue (its worker is gone)."""

    job: SlurmJob
    message: str
    quick: bool
    requeued: bool = False


@dataclass
class SlurmPool:
    """Keeps ``cfg.workers`` jobs of ``command`` (the worker's argv) alive for the session on ``out``."""

    cfg: SlurmConfig
    out: Path
    command: list[str]
    env: dict[str, str] | None = None
    jobs: dict[str, SlurmJob] = field(default_factory=dict)
    ended_count: int = 0
    quick_in_row: int = 0
    next_submit: float = 0.0
    alert: str = ""
    _next_poll: float = 0.0

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.name = job_name(self.out)
        self.user = getpass.getuser()
        try:
            self.args = shlex.split(self.cfg.args)
        except ValueError as exc:
            raise ConfigError(f"config: slurm.args = {self.cfg.args!r} is not a valid argument list ({exc})") from None
        self.script = self._script()
        self.log_dir = self.out / "logs"

    # -- commands ---------------------------------------------------------------------------------
    def _run(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, env=self.env,
                                  timeout=COMMAND_TIMEOUT_S)
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]}: not found (slurm.workers needs the Slurm client commands on PATH)") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{argv[0]}: no answer from Slurm within {COMMAND_TIMEOUT_S:.0f} s") from None

    def _script(self) -> str:
        """The job script: the template (``slurm.script``) with ``{command}`` / ``{args}`` filled in."""
        template = DEFAULT_SCRIPT
        if self.cfg.script:
            path = Path(self.cfg.script)
            try:
                template = path.read_text()
            except OSError as exc:
                raise ConfigError(f"{path}: slurm.script cannot be read ({exc.strerror})") from None
            if "{command}" not in template and "{args}" not in template:
                raise ConfigError(f"{path}: slurm.script has no {{command}} (or {{args}}) to run the worker")
            if not template.startswith("#!"):
                raise ConfigError(f"{path}: slurm.script must start with #! (sbatch runs it as a script)")
        # the worker's name carries the job id and its threads the job's CPUs, both expanded by the job's shell
        shell_args = ' --name "slurm-${SLURM_JOB_ID}" --threads "${SLURM_CPUS_PER_TASK:-1}"'
        command = " ".join(shlex.quote(a) for a in self.command) + shell_args
        # {args}: what follows `worker` (for a template that runs lmc from a container image)
        after = self.command[self.command.index("worker") + 1:] if "worker" in self.command else self.command
        args = " ".join(shlex.quote(a) for a in after) + shell_args
        return template.replace("{command}", command).replace("{args}", args)

    def _comment(self) -> str:
        return f"lmc session {self.out} on {socket.gethostname()} pid {os.getpid()}"

    # -- life -------------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Cancel a dead predecessor's jobs, then submit the first jobs. Returns the cancelled ids.

        Raises :class:`ConfigError` when Slurm cannot be used or refuses the first job (sbatch's
        reason); the other first jobs, if refused, are retried with back-off like replacements."""
        if shutil.which("sbatch", path=(self.env or os.environ).get("PATH")) is None:
            raise ConfigError("slurm.workers is set but sbatch is not on PATH (run lmc on a Slurm submit host)")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / "slurm-job.sh").write_text(self.script)  # what every job runs, for whoever debugs it
        stale: list[str] = []
        try:
            stale = [j for j, state, *_ in self._squeue() if state in ACTIVE and j not in self.jobs]
            if stale:
                self._cancel(stale)
                log.warning("cancelled %d worker job(s) left by an earlier session on %s: %s", len(stale), self.out,
                            ", ".join(stale))
            for _ in range(self.cfg.workers):
                self._submit(time.monotonic())
        except SlurmError as exc:
            if not self.jobs:
                raise ConfigError(f"slurm: {exc}") from None
            self._refused(exc, time.monotonic())
        return stale

    def tick(self, now: float, draining: bool = False) -> list[Ended]:
        """Poll Slurm (every ``POLL_S``); return the jobs that ended since; submit replacements."""
        if now < self._next_poll:
            return []
        self._next_poll = now + POLL_S
        try:
            rows = {r[0]: r for r in self._squeue()}
        except SlurmError as exc:  # slurmctld restarting: try again next time
            log.warning("slurm: %s", exc)
            return []
        ended: list[Ended] = []
        for job in list(self.jobs.values()):
            row = rows.get(job.job_id)
            state, reason, node = (row[1], row[2], row[3]) if row else ("GONE", "", job.node)
            if job.started is not None and state in REQUEUED:
                ended.append(self._requeued(job, state, reason))
            if state == "RUNNING" and job.started is None:
                job.started = now
                job.node = node
                job.gpus = self._gpus(job.job_id)
                log.info("slurm job %s running on %s%s (%.1f s after submission)", job.job_id, node,
                         f" with GPU {job.gpus}" if job.gpus else "", now - job.submitted)
            job.state, job.reason = state, "" if reason == "None" else reason
            if node and node not in ("(null)", "n/a"):
                job.node = node
            if not job.active:
                ended.append(self._ended(job, now))
            elif job.started is not None and not job.joined and not job.warned and now - job.started > JOIN_WARN_S:
                job.warned = True
                self.alert = (f"slurm: job {job.job_id} has run on {job.node} for {now - job.started:.0f} s and its "
                              f"worker has not joined: can that node reach {self._connect()}? "
                              f"(see {self.log_dir / f'slurm-{job.job_id}.log'})")
                log.error("%s", self.alert)
        if not draining:
            self._replace(now)
        return ended

    def _requeued(self, job: SlurmJob, state: str, reason: str) -> Ended:
        msg = (f"slurm job {job.job_id} on {job.node} went back to the queue ({state}, {reason}: preempted or "
               f"requeued); it stays one of the {self.cfg.workers} jobs and waits to run again")
        log.warning("%s", msg)
        job.started, job.joined, job.warned, job.gpus = None, False, False, ""
        return Ended(job, msg, quick=False, requeued=True)

    def _ended(self, job: SlurmJob, now: float) -> Ended:
        del self.jobs[job.job_id]
        job.ended = now
        self.ended_count += 1
        quick = now - job.submitted < QUICK_S or not job.joined
        self.quick_in_row = self.quick_in_row + 1 if quick else 0
        exit_code = self._field(job.job_id, "ExitCode")
        where = f" on {job.node}" if job.node else ""
        # a job never seen running (cancelled or failed while pending) had no worker to lose
        unjoined = ", before it was seen running" if job.started is None else ", its worker never joined"
        msg = (f"slurm job {job.job_id}{where} ended: {job.state}"
               f"{f' (exit {exit_code})' if exit_code and exit_code != '0:0' else ''}"
               f"{f', {job.reason}' if job.reason else ''}{'' if job.joined else unjoined}"
               f"; log {self.log_dir / f'slurm-{job.job_id}.log'}")
        delay = min(BACKOFF_S * 2 ** max(self.quick_in_row - 1, 0), MAX_BACKOFF_S) if quick else BACKOFF_S
        self.next_submit = max(self.next_submit, now + delay)
        if self.quick_in_row >= ALERT_AFTER:
            self.alert = (f"slurm: {self.quick_in_row} worker jobs in a row failed "
                          f"(last: {msg}); check slurm.args ({self.cfg.args or 'none'}); next try in {delay:.1f} s")
            log.error("%s", self.alert)
        else:
            log.warning("%s; replacing it in %.1f s", msg, delay)
        return Ended(job, msg, quick)

    def _replace(self, now: float) -> None:
        while len(self.jobs) < self.cfg.workers and now >= self.next_submit:
            try:
                self._submit(now)
            except SlurmError as exc:
                self._refused(exc, now)
                return

    def _refused(self, exc: SlurmError, now: float) -> None:
        """sbatch refused a job (or Slurm did not answer): try again later, waiting longer each time."""
        self.quick_in_row += 1
        delay = min(BACKOFF_S * 2 ** (self.quick_in_row - 1), MAX_BACKOFF_S)
        self.next_submit = now + delay
        self.alert = f"slurm: {exc}; next try in {delay:.1f} s"
        log.error("%s", self.alert)

    def joined(self, job_id: str) -> None:
        """The job's worker registered with the dispatcher."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.joined = True

    def _connect(self) -> str:
        return self.command[self.command.index("--connect") + 1] if "--connect" in self.command else "the session"

    def worker_ran(self) -> None:
        """A Slurm worker finished a movie: the jobs work, so clear the failure streak."""
        self.quick_in_row = 0
        self.alert = ""

    def close(self) -> None:
        """Cancel every job this session still has and wait (a bounded time) until squeue drops them."""
        ids = list(self.jobs)
        if not ids:
            return
        try:
            self._cancel(ids)
            deadline = time.monotonic() + CLOSE_WAIT_S
            while time.monotonic() < deadline:
                left = {j for j, state, *_ in self._squeue() if state in ACTIVE} & set(ids)
                if not left:
                    break
                time.sleep(0.2)
            else:
                log.warning("slurm: jobs %s still listed %0.f s after scancel", ", ".join(sorted(left)), CLOSE_WAIT_S)
        except SlurmError as exc:
            log.error("slurm: could not cancel worker jobs %s: %s", ", ".join(ids), exc)
            return
        log.info("slurm: cancelled worker jobs %s", ", ".join(ids))
        self.jobs.clear()

    # -- Slurm commands -----------------------------------------------------------------------------
    def _submit(self, now: float) -> SlurmJob:
        res = self._run(
            "sbatch", "--parsable", f"--job-name={self.name}", f"--comment={self._comment()}",
            f"--output={self.log_dir / 'slurm-%j.log'}", "--open-mode=append", *self.args, stdin=self.script,
        )
        if res.returncode != 0:
            lines = [ln.removeprefix("sbatch: error: ") for ln in res.stderr.strip().splitlines() if ln.strip()]
            raise SlurmError(f"sbatch refused the worker job: {'; '.join(lines) or f'exit {res.returncode}'}"
                             f" (slurm.args = {self.cfg.args or 'none'})")
        job_id = res.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch answered {res.stdout.strip()!r}, not a job id")
        job = SlurmJob(job_id, now)
        self.jobs[job_id] = job
        log.info("slurm: submitted worker job %s (%s)", job_id, self.cfg.args or "default partition")
        return job

    def _squeue(self) -> list[tuple[str, str, str, str]]:
        """(job id, state, reason, node) of every job named like this session's, ended ones included."""
        res = self._run("squeue", "-h", "-t", "all", f"--name={self.name}", f"--user={self.user}", "-o", "%i|%T|%r|%N")
        if res.returncode != 0:
            raise SlurmError(f"squeue failed: {res.stderr.strip() or res.returncode}")
        rows = []
        for line in res.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 4:
                rows.append((parts[0], parts[1], parts[2], parts[3]))
        return rows

    def _show(self, job_id: str) -> str:
        res = self._run("scontrol", "show", "job", "-d", job_id)
        return res.stdout if res.returncode == 0 else ""

    def _field(self, job_id: str, name: str) -> str:
        m = re.search(rf"\b{name}=(\S+)", self._show(job_id))
        return m.group(1) if m else ""

    def _gpus(self, job_id: str) -> str:
        """The GPU indices Slurm gave the job (``GRES=gpu:a100:1(IDX:3)`` -> ``3``), or ''."""
        m = re.search(r"\bGRES=\S*?gpu[^\s(]*\(IDX:([^)]*)\)", self._show(job_id))
        return m.group(1) if m else ""

    def _cancel(self, ids: list[str]) -> None:
        res = self._run("scancel", *ids)
        if res.returncode != 0 and "Invalid job id" not in res.stderr:
            raise SlurmError(f"scancel failed: {res.stderr.strip() or res.returncode}")

    # -- state --------------------------------------------------------------------------------------
    def snapshot(self, workers: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        """One entry per job: job_id, state (pending|running|...), reason, node, gpus, worker, movie,
        done, waited_s (pending) or running_s. ``workers``: the dispatcher's worker snapshot."""
        by_name = {w.get("name"): w for w in workers}
        rows = []
        for job in self.jobs.values():
            w = by_name.get(worker_name(job.job_id)) or {}
            state = job.state.lower()
            if w and job.state == "PENDING":
                state = "running"  # its worker joined before the next squeue poll saw it start
            elif job.state == "RUNNING" and not w:
                state = "starting"  # the job runs, its worker has not joined yet
            rows.append({
                "job_id": job.job_id,
                "state": state,
                "reason": job.reason,
                "node": job.node or str(w.get("host") or ""),
                "gpus": job.gpus or (str(w["gpu"]) if w.get("gpu") is not None else ""),
                "worker": worker_name(job.job_id) if w else None,
                "movie": w.get("movie"),
                "done": int(w.get("done") or 0),
                "waited_s": round(now - job.submitted, 1) if job.started is None else None,
                "running_s": round(now - job.started, 1) if job.started is not None else None,
            })
        return rows


# -- how the session reaches its jobs and they reach it -----------------------------------------------


def dispatcher_bind(bind: str) -> str:
    """Where the dispatcher listens when Slurm jobs must reach it: a loopback bind (the default)
    becomes every interface on the same port, which the dispatcher allows only with CURVE keys."""
    from streamer.live.dispatcher import is_loopback

    if not is_loopback(bind) or not bind.startswith("tcp://"):
        return bind
    return "tcp://*:" + bind.rsplit(":", 1)[1]


def job_endpoint(endpoint: str, host: str) -> str:
    """``tcp://HOST:PORT`` for the jobs: ``host`` (slurm.host), else the interface the dispatcher
    is bound to, else this machine's fully qualified name."""
    address, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    if not host:
        host = socket.getfqdn() if address in ("*", "0.0.0.0", "[::]", "") else address
    return f"tcp://{host}:{port}"


def worker_command(connect: str, keys: str | None, heartbeat: float, liveness: int,
                   orphan_timeout: float = ORPHAN_TIMEOUT_S) -> list[str]:
    """The worker's argv in a job: this Python (lmc installed at the same path on the nodes, as on
    a shared software tree; ``slurm.script`` can run it otherwise), the session's CURVE keys."""
    import sys

    cmd = [sys.executable, "-m", "streamer.cli", "worker", "--connect", connect, "--heartbeat", str(heartbeat),
           "--liveness", str(liveness), "--orphan-timeout", str(orphan_timeout)]
    if keys:
        cmd += ["--keys", os.path.abspath(keys)]
    return cmd
