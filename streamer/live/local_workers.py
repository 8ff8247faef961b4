"""Local worker processes: how many, on which device, started, watched and replaced by the session.

Each local worker is ``python -m streamer.live.worker`` connecting back to the session's dispatcher
(remote workers join the same way by hand). A worker that exits is reported to the dispatcher
(its job goes back to the queue) and restarted after ``RESPAWN_DELAY_S``; one that dies
``MAX_QUICK_DEATHS`` times within a minute stops the session, since restarting it again would only
burn movies' attempts.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from streamer.config import Config
from streamer.errors import ConfigError

log = logging.getLogger("lmc.session")

RESPAWN_DELAY_S = 1.0
MAX_QUICK_DEATHS = 5  # local workers dying this often within a minute: give up


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


class LocalWorker:
    """A worker process started by the session."""

    def __init__(self, name: str, gpu: int | None) -> None:
        self.name = name
        self.gpu = gpu
        self.proc: subprocess.Popen | None = None
        self.deaths: deque[float] = deque(maxlen=MAX_QUICK_DEATHS)
        self.respawn_at = 0.0


def worker_names(plan: list[int | None]) -> list[str]:
    """``gpu0``, ``gpu1``, ``cpu0``, ...; a GPU shared by several workers gives ``gpu0``, ``gpu0-1``, ..."""
    names: list[str] = []
    cpu_i = 0
    for gpu in plan:
        name = f"gpu{gpu}" if gpu is not None else f"cpu{cpu_i}"
        if gpu is None:
            cpu_i += 1
        if name in names:
            name = f"{name}-{len(names)}"
        names.append(name)
    return names


class LocalWorkers:
    """The session's local worker processes: start them, notice deaths, restart them, stop them.

    ``connect`` is the dispatcher's endpoint as seen from this host; ``cfg`` the job configuration
    (absolute paths); ``threads`` the decoding threads per worker; ``handler`` (``module:function``)
    replaces the pipeline in the workers (tests only). Each worker logs to ``logs/worker-NAME.log``.
    """

    def __init__(self, out: Path, connect: str, cfg: Config, plan: list[int | None], threads: int,
                 handler: str | None = None) -> None:
        self.out = out
        self.connect = connect
        self.cfg = cfg
        self.threads = threads
        self.handler = handler
        self.workers = [LocalWorker(name, gpu) for name, gpu in zip(worker_names(plan), plan, strict=True)]

    def start(self) -> None:
        for w in self.workers:
            self.spawn(w)

    def command(self, w: LocalWorker) -> list[str]:
        cfg = self.cfg
        cmd = [sys.executable, "-m", "streamer.live.worker", "--connect", self.connect, "--exit-with-parent",
               "--name", w.name, "--heartbeat", str(cfg.heartbeat), "--liveness", str(cfg.liveness)]
        if w.gpu is not None:
            cmd += ["--gpu", str(w.gpu), "--device", "gpu"]
        else:
            cmd += ["--device", "cpu"]
        cmd += ["--threads", str(self.threads)]  # decoding (and CPU FFTs) share the cores between workers
        if cfg.keys:
            cmd += ["--keys", str(os.path.abspath(cfg.keys))]
        if self.handler:
            cmd += ["--handler", self.handler]
        return cmd

    def spawn(self, w: LocalWorker) -> None:
        env = dict(os.environ)
        if w.gpu is None:  # keep BLAS from starting a thread per core in every CPU worker
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(self.threads)
        with open(self.out / "logs" / f"worker-{w.name}.log", "ab") as logf:
            w.proc = subprocess.Popen(self.command(w), stdin=subprocess.DEVNULL, stdout=logf,
                                      stderr=subprocess.STDOUT, env=env)
        log.info("started local worker %s (pid %d)", w.name, w.proc.pid)

    def supervise(self, drain: bool, died: Callable[[int, str, str], None]) -> str | None:
        """Restart workers that are due, report those that exited (``died(pid, reason, host)``);
        returns the reason to abort the session when a worker keeps dying, else None."""
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None:
                if not drain and now >= w.respawn_at:
                    self.spawn(w)
                continue
            code = w.proc.poll()
            if code is None:
                continue
            reason = f"process exited with code {code}"
            died(w.proc.pid, reason, socket.gethostname())
            w.proc = None
            w.deaths.append(now)
            if len(w.deaths) == MAX_QUICK_DEATHS and now - w.deaths[0] < 60:
                return (f"local worker {w.name} died {MAX_QUICK_DEATHS} times within a minute "
                        f"(see {self.out / 'logs' / f'worker-{w.name}.log'})")
            log.warning("local worker %s %s; restarting it", w.name, reason)
            w.respawn_at = now + RESPAWN_DELAY_S
        return None

    def stop(self, joined: set[int], abort: bool, grace_s: float = 3.0) -> None:
        """Wait up to ``grace_s`` for the workers told to stop (pids in ``joined``), then kill the rest."""
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            if w.proc is None:
                continue
            # a worker that never joined cannot hear "stop" (and ignores SIGTERM): no point waiting
            wait = 0 if abort or w.proc.pid not in joined else max(deadline - time.monotonic(), 0.01)
            try:
                w.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(timeout=10)
