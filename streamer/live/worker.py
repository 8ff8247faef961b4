"""A worker process: a DEALER socket that takes movie jobs from the dispatcher and returns results.

The main thread owns the socket (ZeroMQ sockets are single-threaded): it sends a heartbeat every
``heartbeat`` s, forwards results, and reconnects with exponential back-off when the dispatcher
has been silent for ``heartbeat * liveness`` s (the Paranoid Pirate pattern). Jobs run one at a
time, in order, in a compute thread that hands its encoded messages to the main thread over an
inproc socket, so heartbeats keep flowing while a movie is being processed.

What a job does is the handler's business (``streamer.live.handler``: the pipeline with the next
movie decoded ahead); this module is the transport only.

Entry points: :func:`worker_main` (``lmc worker``) and ``python -m streamer.live.worker`` (used by the
session to start local workers).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from streamer.config import Config
from streamer.errors import ConfigError, is_user_error, one_line
from streamer.live import protocol
from streamer.live.handler import Handler, load_handler, pipeline_handler

log = logging.getLogger("lmc.worker")

EXIT_OK = 0
EXIT_REFUSED = 3  # the dispatcher refused our keys (or wants keys we do not have)
MAX_BACKOFF = 32.0
class WorkerRefused(RuntimeError):
    """The CURVE handshake with the dispatcher failed."""


def _gpu_mem_mb() -> float | None:
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return None
    try:
        return round(cupy.get_default_memory_pool().total_bytes() / 2**20, 1)
    except Exception:  # no device or context yet
        return None


class Worker:
    """One worker (see the module docstring). ``run()`` returns an exit code."""

    def __init__(
        self,
        connect: str,
        handler: Handler,
        *,
        keys: str | Path | None = None,
        heartbeat: float = 1.0,
        liveness: int = 5,
        name: str | None = None,
        device: str = "cpu",
        gpu: int | None = None,
        exit_with_parent: bool = False,
        orphan_timeout: float = 0.0,
        context: zmq.Context | None = None,
    ) -> None:
        self.connect = connect
        self.handler = handler
        self.keys = keys
        self.heartbeat = float(heartbeat)
        self.liveness = int(liveness)
        self.wid = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.name = name or f"{self.host}:{os.getpid()}"
        self.device = device
        self.gpu = gpu
        self.parent = os.getppid() if exit_with_parent else None
        # a batch job whose session died must not hold its node (and GPU) until the time limit
        self.orphan_timeout = float(orphan_timeout)
        self.ctx = context or zmq.Context()
        self.jobs: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue()
        self.generation = 0  # bumped on reconnect: prefetched jobs of the old link are dropped
        self.jobs_done = 0
        self.gpu_mem_mb: float | None = None
        self._pipe_addr = f"inproc://worker-results-{self.wid}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._current: str | None = None  # job id being processed
        self._cancelled: set[str] = set()

    # -- compute thread -----------------------------------------------------------------------
    def _compute(self) -> None:
        out = self.ctx.socket(zmq.PAIR)
        out.connect(self._pipe_addr)
        try:
            while not self._stop.is_set():
                item = self.jobs.get()
                if item is None:
                    return
                gen, job = item
                jid, movie = job["job_id"], job["movie"]
                with self._lock:
                    if gen != self.generation:
                        continue
                    if jid in self._cancelled:
                        self._cancelled.discard(jid)
                        out.send_multipart(protocol.encode("cancelled", {"job_id": jid}))
                        continue
                    self._current = jid
                out.send_multipart(protocol.encode("started", {"job_id": jid}))
                self._prefetch_next()
                t0 = time.monotonic()
                try:
                    result = self.handler(job)
                    result.movie = movie
                    frames = protocol.encode_result(jid, result, float16=bool(job.get("float16")))
                    log.info("%s: %d particles in %.2f s", movie, result.n, time.monotonic() - t0)
                except Exception as exc:
                    user = is_user_error(exc)
                    if not user:
                        log.exception("%s: processing failed", movie)
                    reason = one_line(exc)
                    if not reason.startswith(movie) and movie not in reason:
                        reason = f"{movie}: {reason}"
                    frames = protocol.encode("error", {"job_id": jid, "movie": movie, "reason": reason, "user_error": user})
                with self._lock:
                    self._current = None
                self.jobs_done += 1
                self.gpu_mem_mb = _gpu_mem_mb()
                out.send_multipart(frames, copy=False)
                del frames
        finally:
            out.close(linger=1000)

    def _prefetch_next(self) -> None:
        """Let the handler start decoding the next queued job of this link while this one runs."""
        prefetch = getattr(self.handler, "prefetch", None)
        if prefetch is None:
            return
        with self.jobs.mutex:
            nxt = next((item for item in self.jobs.queue if item is not None), None)
        if nxt is None or nxt[0] != self.generation:
            return
        try:
            prefetch(nxt[1])
        except Exception:  # prefetching is an optimisation; the job itself reports any error
            log.debug("prefetch of %s failed", nxt[1].get("movie"), exc_info=True)

    # -- socket thread ------------------------------------------------------------------------
    def _open(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 26)  # jobs are small; refuse anything huge
        if self.keys:
            from streamer.live.keys import setup_client

            setup_client(sock, self.keys)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        sock.connect(self.connect)
        self._send(sock, "ready", {"worker": self._info()})
        return sock, monitor

    def _info(self) -> dict[str, Any]:
        return {"wid": self.wid, "name": self.name, "host": self.host, "pid": os.getpid(), "device": self.device,
                "gpu": self.gpu}

    @staticmethod
    def _close(sock: zmq.Socket, monitor: zmq.Socket) -> None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)
        sock.close(linger=0)

    @staticmethod
    def _send(sock: zmq.Socket, type_: str, header: dict[str, Any] | None = None) -> None:
        """Send a small control message, or drop it while there is no connection (never block)."""
        try:
            sock.send_multipart(protocol.encode(type_, header), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def run(self) -> int:
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.bind(self._pipe_addr)
        compute = threading.Thread(target=self._compute, name="compute", daemon=True)
        compute.start()
        sock, monitor = self._open()
        log.info("worker %s (%s) connecting to %s", self.name, self.device if self.gpu is None else f"gpu {self.gpu}",
                 self.connect)
        backoff = self.heartbeat
        outbox: deque[list[Any]] = deque()
        last_heard = last_contact = time.monotonic()
        next_beat = time.monotonic() + self.heartbeat
        try:
            while True:
                poller = zmq.Poller()
                poller.register(sock, zmq.POLLIN)
                poller.register(pipe, zmq.POLLIN)
                poller.register(monitor, zmq.POLLIN)
                wait = max(min(next_beat - time.monotonic(), self.heartbeat), 0.0)
                ready = dict(poller.poll(int(wait * 1000) + 1))
                now = time.monotonic()
                if monitor in ready:
                    evt = recv_monitor_message(monitor)
                    if evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        raise WorkerRefused(f"{self.connect}: the dispatcher refused this worker's key")
                    if evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                        raise WorkerRefused(
                            f"{self.connect}: security handshake failed (the dispatcher and this worker disagree "
                            "on CURVE keys: pass the same --keys folder to both)"
                        )
                if pipe in ready:
                    outbox.append(pipe.recv_multipart(copy=False))
                while outbox:  # results wait here while the dispatcher is unreachable
                    try:
                        sock.send_multipart(outbox[0], zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    outbox.popleft()
                if sock in ready:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        last_heard = last_contact = now
                        backoff = self.heartbeat
                        if self._handle(sock, frames):
                            return EXIT_OK
                if now >= next_beat:
                    self._send(sock, "heartbeat", {"jobs_done": self.jobs_done, "gpu_mem_mb": self.gpu_mem_mb})
                    next_beat = now + self.heartbeat
                if self.parent is not None and os.getppid() != self.parent:
                    log.info("parent process gone; worker exits")
                    return EXIT_OK
                if self.orphan_timeout and now - last_contact > self.orphan_timeout:
                    log.warning("no dispatcher for %.0f s (--orphan-timeout): the session is gone; worker exits",
                                now - last_contact)
                    return EXIT_OK
                if now - last_heard > self.heartbeat * self.liveness:
                    log.warning("dispatcher silent for %.1f s; reconnecting in %.1f s", now - last_heard, backoff)
                    self._close(sock, monitor)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    self.generation += 1
                    sock, monitor = self._open()
                    last_heard = time.monotonic()
        except WorkerRefused as exc:
            log.error("%s", exc)
            return EXIT_REFUSED
        finally:
            self._stop.set()
            self.jobs.put(None)
            try:
                self._send(sock, "bye")
            except zmq.ZMQError:
                pass
            self._close(sock, monitor)
            pipe.close(linger=0)

    def _handle(self, sock: zmq.Socket, frames: list[Any]) -> bool:
        """Handle one dispatcher message; True means stop."""
        try:
            msg = protocol.decode(frames, allowed=protocol.DISPATCHER_TYPES)
        except protocol.ProtocolError as exc:
            log.warning("dropped a malformed message from the dispatcher: %s", exc)
            return False
        if msg.type == "job":
            self.jobs.put((self.generation, msg.header))
        elif msg.type == "cancel":
            with self._lock:
                if msg.header["job_id"] != self._current:  # a started job runs to the end
                    self._cancelled.add(msg.header["job_id"])
        elif msg.type == "reset":
            self.generation += 1  # the dispatcher forgot us: it requeued what we held
            self._send(sock, "ready", {"worker": self._info()})
        elif msg.type == "stop":
            log.info("dispatcher asked this worker to stop")
            return True
        return False


def _device_for(cfg: Config, gpu: int | None) -> tuple[str, int | None]:
    """("gpu", id) or ("cpu", None); pins the process to ``gpu`` before CuPy is first imported."""
    if cfg.device == "cpu":
        return "cpu", None
    if gpu is not None and "cupy" not in sys.modules:
        # one visible device: every thread (and CuPy's default device 0) is this GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from gpu.backend import gpu_available

    if gpu_available():
        return "gpu", gpu if gpu is not None else 0
    if cfg.device == "gpu":
        raise RuntimeError("device=gpu requested but CuPy sees no CUDA device")
    return "cpu", None


def worker_main(
    connect: str,
    cfg: Config | None = None,
    gpu: int | None = None,
    keys: str | Path | None = None,
    *,
    handler: Handler | None = None,
    name: str | None = None,
    exit_with_parent: bool = False,
    orphan_timeout: float = 0.0,
) -> int:
    """Run a worker until the dispatcher says stop; returns the exit code (3: refused)."""
    cfg = cfg or Config()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    if not (keys or cfg.keys):
        log.error("%s: a worker needs the session's CURVE keys: --keys OUT/keys (every dispatcher requires them)",
                  connect)
        return EXIT_REFUSED
    device, gpu_id = _device_for(cfg, gpu)
    if cfg.threads:
        from gpu.backend import set_threads

        set_threads(cfg.threads)
    local = cfg.with_(device=device)
    worker = Worker(
        connect,
        handler or pipeline_handler(local),
        keys=keys or cfg.keys,
        heartbeat=cfg.heartbeat,
        liveness=cfg.liveness,
        name=name,
        device=device if gpu_id is None else f"gpu{gpu_id}",
        gpu=gpu_id,
        exit_with_parent=exit_with_parent,
        orphan_timeout=orphan_timeout,
    )
    return worker.run()


def main(argv: list[str] | None = None) -> int:
    """``python -m streamer.live.worker --connect ADDR [--gpu N] [--keys DIR] [--config YAML] ...``"""
    p = argparse.ArgumentParser(prog="python -m streamer.live.worker", description=__doc__.splitlines()[0])
    p.add_argument("--connect", required=True, help="dispatcher address, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device to pin this worker to")
    p.add_argument("--keys", default=None, help="folder from `lmc keys`")
    p.add_argument("--config", default=None, help="config.yaml (compute settings; processing comes with each job)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for FFTs (0 = all cores)")
    p.add_argument("--heartbeat", type=float, default=None)
    p.add_argument("--liveness", type=int, default=None)
    p.add_argument("--name", default=None, help="name shown in status")
    p.add_argument("--handler", default=None, help=argparse.SUPPRESS)  # module:function, for tests
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the starting process is gone; "
                   "ignore SIGINT/SIGTERM (the session stops its local workers itself)")
    ns = p.parse_args(argv)
    from streamer.config import build

    overrides = {k: getattr(ns, k) for k in ("device", "threads", "heartbeat", "liveness") if getattr(ns, k) is not None}
    try:
        cfg = build(None, config_path=ns.config, **overrides)
    except ConfigError as exc:
        print(f"lmc worker: {exc}", file=sys.stderr)
        return 2
    if ns.exit_with_parent:
        # Ctrl-C reaches the whole process group; the session drains and then stops us
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = load_handler(ns.handler) if ns.handler else None
    return worker_main(ns.connect, cfg, gpu=ns.gpu, keys=ns.keys, handler=handler, name=ns.name,
                       exit_with_parent=ns.exit_with_parent)


if __name__ == "__main__":
    sys.exit(main())
