"""The dispatcher: a ROUTER socket handing movie jobs to workers (the Paranoid Pirate pattern).

Each worker holds at most ``1 + prefetch`` jobs and runs them in order, so the head of its list is
the job it is running. Both sides send a heartbeat every ``heartbeat`` seconds; a worker silent for
``heartbeat * liveness`` seconds (or reported dead by the session) is dropped and its jobs go back
to the front of the queue. The job it was running counts one attempt; a job that has cost
``max_attempts`` workers is set aside as a poison job. Each job yields one result.

Trust (README "Security"): the socket is always a CURVE server (``keys``, loopback binds included);
a ZAP handler admits only the public keys in ``keys/authorized`` and logs every refused handshake.
Job ids are unguessable (``secrets.token_hex``). A result or error is accepted only from the
worker the job was handed to: the same ROUTER identity (one connection) and the same
authenticated CURVE key it registered with; anything else is dropped and logged. With a
``ResultSpec`` (``submit(spec=...)``) a result is also refused when larger than the job allows or
when its content is not what the session expects (box, pick count, columns, finite numbers).

Not thread-safe: one thread owns the dispatcher (ZeroMQ sockets are single-threaded).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from streamer.errors import UserError
from streamer.live import protocol
from streamer.types import MovieResult

log = logging.getLogger("lmc.dispatcher")


class DispatcherError(UserError, RuntimeError):
    """The dispatcher cannot start as configured (e.g. a public bind without keys)."""


def is_loopback(endpoint: str) -> bool:
    """True for ``tcp://127.x.x.x:P``, ``tcp://localhost:P``, ``tcp://[::1]:P``, ``ipc://`` and ``inproc://``."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or "*": not loopback
        return False


@dataclass
class Job:
    """One movie to process. ``attempts``: workers lost while running it."""

    job_id: str
    movie: str
    picks: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    submitted: float = 0.0
    attempts: int = 0
    losses: list[str] = field(default_factory=list)
    worker: bytes | None = None
    assigned: float | None = None
    started: float | None = None
    spec: protocol.ResultSpec | None = None


@dataclass
class WorkerInfo:
    """A registered worker. ``jobs``: job ids it holds, the head being the one it runs."""

    ident: bytes
    wid: str
    name: str
    host: str
    pid: int
    device: str
    gpu: int | None
    joined: float
    last_seen: float
    jobs: list[str] = field(default_factory=list)
    done: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    gpu_mem_mb: float | None = None
    user_id: str = ""  # the CURVE public key (Z85) the ZAP handler authenticated

    def snapshot(self, jobs: dict[str, Job], now: float) -> dict[str, Any]:
        head = jobs.get(self.jobs[0]) if self.jobs else None
        running = head is not None and head.started is not None
        return {
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "device": self.device,
            "gpu": self.gpu,
            "state": "busy" if running else ("assigned" if self.jobs else "idle"),
            "movie": head.movie if head is not None else None,
            "job_seconds": round(now - head.started, 2) if running and head.started is not None else None,
            "queued": max(len(self.jobs) - 1, 0),
            "done": self.done,
            "failed": self.failed,
            "mean_s": round(self.busy_seconds / self.done, 2) if self.done else None,
            "gpu_mem_mb": self.gpu_mem_mb,
            "busy_fraction": round(self.busy_seconds / max(now - self.joined, 1e-9), 3),
            "last_seen_s": round(now - self.last_seen, 2),
        }


@dataclass
class Event:
    """What happened during :meth:`Dispatcher.poll`.

    ``kind``: ``started`` (a worker began the job), ``result`` (``result`` set), ``failed`` (the
    worker reported an error, ``reason``), ``cancelled`` (dropped unstarted while draining), ``requeued`` (taken back from a lost worker), ``poison``
    (the job cost ``max_attempts`` workers), ``joined`` / ``lost`` (a worker, ``worker``).
    """

    kind: str
    job: Job | None = None
    result: MovieResult | None = None
    reason: str = ""
    worker: str = ""
    user_error: bool = False


class Dispatcher:
    """Hands out jobs over a ROUTER socket; see the module docstring.

    ``config``: the processing configuration (``Config.to_dict()``) sent with every job so remote
    workers use the session's parameters. ``keys``: folder from ``lmc keys`` or
    ``keys.session_keys`` (CURVE), required on every bind. ``max_frame_bytes``: the socket refuses
    any single message frame larger than this (a per-job limit applies on top, see ``ResultSpec``).
    """

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:0",
        *,
        config: dict[str, Any] | None = None,
        keys: str | Path | None = None,
        max_frame_bytes: int = 1 << 31,
        heartbeat: float = 1.0,
        liveness: int = 5,
        max_attempts: int = 3,
        prefetch: int = 1,
        float16: bool = False,
        context: zmq.Context | None = None,
    ) -> None:
        if not keys:
            raise DispatcherError(
                f"bind {bind}: refusing to listen without CURVE keys, on any address "
                "(the session makes its own in OUT/keys; or create them with `lmc keys DIR` and pass --keys DIR)"
            )
        self.bind_address = bind
        self.config = config or {}
        self.keys = keys
        self.max_frame_bytes = int(max_frame_bytes)
        self.heartbeat = float(heartbeat)
        self.liveness = int(liveness)
        self.max_attempts = int(max_attempts)
        self.prefetch = int(prefetch)
        self.float16 = float16
        self.ctx = context or zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.auth: Any = None
        self.endpoint = ""
        self.queue: deque[str] = deque()
        # unfinished jobs only: a finished job is forgotten, so a late copy of its result finds no job
        # and is dropped (no per-job record outlives the job: memory stays flat over a long session)
        self.jobs: dict[str, Job] = {}
        self.workers: dict[bytes, WorkerInfo] = {}
        self.dropped = 0
        self.refused: dict[str, int] = {}  # refused handshakes by reason (also logged)
        self._refused_logged: dict[str, tuple[float, int]] = {}
        self._refused_lock = threading.Lock()
        self._monitor: zmq.Socket | None = None
        self._next_heartbeat = 0.0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> str:
        """Bind and return the actual endpoint (with the port chosen when binding port 0)."""
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        from streamer.live.keys import setup_server

        self.auth = setup_server(self.ctx, sock, self.keys, on_refused=self._refused)
        # handshakes that fail before ZAP is asked (no CURVE at all, wrong server key) show up here
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        bind = self.bind_address
        try:
            if bind.startswith("tcp://") and bind.rsplit(":", 1)[-1] == "0":
                port = sock.bind_to_random_port(bind.rsplit(":", 1)[0])
                self.endpoint = f"{bind.rsplit(':', 1)[0]}:{port}"
            else:
                sock.bind(bind)
                self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._close_monitor(sock)
            sock.close()
            if self.auth is not None:
                self.auth.stop()
            raise DispatcherError(f"bind {bind}: {exc}") from None
        self.sock = sock
        log.info("dispatcher listening on %s (CURVE, keys %s)", self.endpoint, self.keys)
        return self.endpoint

    def _refused(self, what: str) -> None:
        """Log a refused handshake: the first of each kind at once, repeats (a peer retrying every
        0.1 s) at most once a minute with their count. ``refused``: {what: count} (bounded). Called
        from the ZAP thread and from this one: under a lock."""
        with self._refused_lock:
            self._note_refused(what)

    def refused_counts(self) -> dict[str, int]:
        """A copy of ``refused`` ({reason: count}), safe while the ZAP thread adds to it."""
        with self._refused_lock:
            return dict(self.refused)

    def _note_refused(self, what: str) -> None:
        now = time.monotonic()
        count = self.refused.get(what, 0) + 1
        if what not in self.refused and len(self.refused) >= 50:
            self.refused.pop(next(iter(self.refused)))
        self.refused[what] = count
        last = self._refused_logged.get(what)
        if last is None or now - last[0] >= 60:
            since = count - last[1] if last is not None else 1
            log.warning("refused a connection on %s: %s%s", self.endpoint or self.bind_address, what,
                        f" ({since} times in the last minute)" if since > 1 else "")
            if len(self._refused_logged) >= 50:
                self._refused_logged.pop(next(iter(self._refused_logged)))
            self._refused_logged[what] = (now, count)

    def _close_monitor(self, sock: zmq.Socket) -> None:
        if self._monitor is None:
            return
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._monitor = None

    def _read_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor is not None:
            try:
                evt = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            name = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "security handshake failed: protocol error (a peer "
                    "without CURVE, or without this session's server key)", zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    "security handshake failed: key not authorized", zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    "security handshake failed (a peer without CURVE, or without this session's server key)"
                    }.get(evt["event"], f"security handshake failed (event {evt['event']})")
            self._refused(name)

    def close(self, stop_workers: bool = True) -> None:
        if self.sock is None:
            return
        if stop_workers:
            for ident in list(self.workers):
                self._send(ident, "stop")
        self._close_monitor(self.sock)
        self.sock.close(linger=200 if stop_workers else 0)
        self.sock = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    # -- jobs -----------------------------------------------------------------------------------
    def submit(self, movie: str, picks: str | None = None, meta: dict[str, Any] | None = None,
               spec: protocol.ResultSpec | None = None) -> Job:
        """Queue a movie (after any requeued jobs); it goes out on the next :meth:`poll`. ``spec``: what
        its result must be (else it is refused, see the module docstring)."""
        job = Job(secrets.token_hex(16), movie, picks, dict(meta or {}), time.monotonic(), spec=spec)
        self.jobs[job.job_id] = job
        self.queue.append(job.job_id)
        return job

    def capacity(self) -> int:
        """Free job slots over the live workers, minus jobs already waiting."""
        slots = sum(max(1 + self.prefetch - len(w.jobs), 0) for w in self.workers.values())
        return max(slots - len(self.queue), 0)

    def pending(self) -> int:
        """Jobs not finished yet (queued or held by workers)."""
        return len(self.jobs)

    def cancel_queued(self) -> list[Job]:
        """Drop the jobs no worker holds yet (used when draining)."""
        dropped = [self.jobs.pop(j) for j in self.queue if j in self.jobs]
        self.queue.clear()
        return dropped

    def cancel_unstarted(self) -> list[Job]:
        """Drain: drop queued jobs now and ask workers to drop the prefetched ones they have not
        started. Returns the queued jobs; the others come back as ``cancelled`` events (or as
        results, when the worker had already started them)."""
        dropped = self.cancel_queued()
        for w in self.workers.values():
            for jid in w.jobs:
                job = self.jobs.get(jid)
                if job is not None and job.started is None and not job.meta.get("_cancelling"):
                    job.meta["_cancelling"] = True
                    self._send(w.ident, "cancel", {"job_id": jid})
        return dropped

    # -- the loop -------------------------------------------------------------------------------
    def poll(self, timeout: float = 0.1) -> list[Event]:
        """Wait up to ``timeout`` s for messages; handle them, heartbeats, liveness and assignment."""
        assert self.sock is not None, "start() first"
        events: list[Event] = []
        self._read_monitor()
        deadline = time.monotonic() + timeout
        while True:
            wait = max(deadline - time.monotonic(), 0.0)
            if not self.sock.poll(int(wait * 1000)):
                break
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(frames, events)
            self._assign()
            if events or time.monotonic() >= deadline:
                break
        now = time.monotonic()
        self._check_liveness(now, events)
        if now >= self._next_heartbeat:
            for ident in list(self.workers):
                self._send(ident, "heartbeat")
            self._next_heartbeat = now + self.heartbeat
        self._assign()
        return events

    def worker_died(self, pid: int, reason: str, host: str | None = None) -> list[Event]:
        """The session saw a local worker process exit: drop it now rather than after the timeout."""
        events: list[Event] = []
        host = host or socket.gethostname()
        for ident, w in list(self.workers.items()):
            if w.pid == pid and w.host == host:
                self._lose(ident, reason, events)
        return events

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [w.snapshot(self.jobs, now) for w in self.workers.values()]

    # -- internals ------------------------------------------------------------------------------
    def _send(self, ident: bytes, type_: str, header: dict[str, Any] | None = None) -> None:
        assert self.sock is not None
        try:
            self.sock.send_multipart([ident, *protocol.encode(type_, header)], copy=False)
        except zmq.ZMQError as exc:  # a peer that vanished: liveness will handle it
            log.debug("send %s to %s failed: %s", type_, ident.hex(), exc)

    def _handle(self, frames: list[Any], events: list[Event]) -> None:
        ident = bytes(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
        user = _user_id(frames[1]) if len(frames) > 1 else ""
        w = self.workers.get(ident)
        if w is not None and user != w.user_id:  # cannot happen on one CURVE connection; refuse if it does
            self.dropped += 1
            log.warning("dropped a message from worker %s: its CURVE key changed", w.name)
            return
        try:
            msg = protocol.decode(frames[1:], allowed=protocol.WORKER_TYPES)
        except protocol.ProtocolError as exc:
            self.dropped += 1
            log.warning("dropped a malformed message from peer %s: %s", ident.hex()[:12], exc)
            return
        now = time.monotonic()
        if msg.type == "ready":
            self._register(ident, msg.header["worker"], now, events, user)
            return
        if w is None:
            if msg.type in ("result", "error"):
                self.dropped += 1
                log.warning("dropped a %s for job %s from a peer that is not a registered worker",
                            msg.type, str(msg.header["job_id"])[:40])
            if msg.type != "bye":
                self._send(ident, "reset")
            return
        w.last_seen = now
        if msg.type == "heartbeat":
            mem = msg.header.get("gpu_mem_mb")
            w.gpu_mem_mb = float(mem) if isinstance(mem, (int, float)) and not isinstance(mem, bool) else None
        elif msg.type == "started":
            job = self.jobs.get(msg.header["job_id"])
            if job is not None and job.worker == ident:
                job.started = time.monotonic()
                events.append(Event("started", job=job, worker=w.name))
        elif msg.type in ("result", "error"):
            self._finish_message(w, msg, events, protocol.message_bytes(frames[1:]))
        elif msg.type == "cancelled":
            jid = msg.header["job_id"]
            job = self.jobs.get(jid)
            if jid in w.jobs and job is not None:
                w.jobs.remove(jid)
                self._forget(job)
                events.append(Event("cancelled", job=job, worker=w.name))
        elif msg.type == "bye":
            self._lose(ident, "worker left", events, count_attempt=False)

    def _register(self, ident: bytes, info: dict[str, Any], now: float, events: list[Event], user: str) -> None:
        try:
            wid = str(info["wid"])
            name = str(info.get("name") or wid[:8])
            pid = int(info.get("pid", 0))
            gpu = info.get("gpu")
            gpu = int(gpu) if gpu is not None else None
        except (KeyError, TypeError, ValueError):
            self.dropped += 1
            log.warning("dropped a ready message with bad worker info from %s", ident.hex()[:12])
            return
        # the same worker process reconnecting (new socket): its old registration is stale
        for old_ident, old in list(self.workers.items()):
            if old.wid == wid and old_ident != ident:
                self._lose(old_ident, "reconnected", events, count_attempt=False)
        if ident in self.workers:
            self._lose(ident, "registered again", events, count_attempt=False)
        w = WorkerInfo(
            ident=ident,
            wid=wid,
            name=name,
            host=str(info.get("host", "")),
            pid=pid,
            device=str(info.get("device", "cpu")),
            gpu=gpu,
            joined=now,
            last_seen=now,
            user_id=user,
        )
        self.workers[ident] = w
        self._send(ident, "heartbeat")
        events.append(Event("joined", worker=name))
        log.info("worker %s joined (%s, pid %s on %s)", name, w.device if w.gpu is None else f"gpu {w.gpu}", pid, w.host)

    def _finish_message(self, w: WorkerInfo, msg: protocol.Message, events: list[Event], size: int) -> None:
        jid = msg.header["job_id"]
        job = self.jobs.get(jid)
        if job is None or job.worker != w.ident or jid not in w.jobs:
            # a finished job's late copy, or a job this worker was never given: never accepted
            self.dropped += 1
            log.warning("dropped a %s from worker %s for job %s: %s", msg.type, w.name, str(jid)[:40],
                        "not a job of this worker" if job is not None else "no such open job")
            return
        w.jobs.remove(jid)
        if job.movie != msg.header["movie"]:
            self.dropped += 1
            log.warning("dropped a %s for job %s: movie %s does not match %s", msg.type, jid, msg.header["movie"], job.movie)
            self._release(job, "result for another movie", events, count_attempt=True)
            return
        if msg.type == "result":
            try:
                if job.spec is not None and size > job.spec.max_bytes:
                    raise protocol.ProtocolError(f"result of {size} bytes exceeds this job's limit of {job.spec.max_bytes}")
                result = protocol.decode_result(msg, job.spec)
            except protocol.ProtocolError as exc:
                self.dropped += 1
                log.warning("refused the result of worker %s for %s: %s", w.name, job.movie, exc)
                # the job is still owed a result: give it to another worker (counts as an attempt)
                self._release(job, f"result refused: {exc}", events, count_attempt=True)
                return
            event = Event("result", job=job, result=result, worker=w.name)
            w.done += 1
        else:
            event = Event(
                "failed",
                job=job,
                reason=msg.header["reason"],
                worker=w.name,
                user_error=bool(msg.header["user_error"]),
            )
            w.failed += 1
        if job.started is not None:
            w.busy_seconds += time.monotonic() - job.started
        self._forget(job)
        events.append(event)

    def _forget(self, job: Job) -> None:
        """The job is finished: no other copy of it will be accepted (job ids are never reused)."""
        self.jobs.pop(job.job_id, None)
        if job.job_id in self.queue:
            self.queue.remove(job.job_id)

    def _release(self, job: Job, reason: str, events: list[Event], count_attempt: bool) -> None:
        """Take ``job`` back from its worker: requeue it at the front, or set it aside as poison."""
        job.worker = None
        job.assigned = None
        job.started = None
        job.meta.pop("_cancelling", None)
        if count_attempt:
            job.attempts += 1
            job.losses.append(reason)
            if job.attempts >= self.max_attempts:
                self._forget(job)
                why = f"set aside after {job.attempts} failed attempts ({'; '.join(job.losses)})"
                log.error("poison job %s: %s", job.movie, why)
                events.append(Event("poison", job=job, reason=why))
                return
        if job.job_id not in self.queue:
            self.queue.appendleft(job.job_id)
        events.append(Event("requeued", job=job, reason=reason))

    def _lose(self, ident: bytes, reason: str, events: list[Event], count_attempt: bool = True) -> None:
        w = self.workers.pop(ident, None)
        if w is None:
            return
        log.warning("worker %s lost: %s", w.name, reason)
        events.append(Event("lost", worker=w.name, reason=reason))
        held = [self.jobs[j] for j in w.jobs if j in self.jobs]
        # requeue in reverse so the original order is kept at the front of the queue
        for i, job in reversed(list(enumerate(held))):
            self._release(job, f"worker {w.name} {reason}", events, count_attempt=count_attempt and i == 0)

    def _check_liveness(self, now: float, events: list[Event]) -> None:
        limit = self.heartbeat * self.liveness
        for ident, w in list(self.workers.items()):
            silent = now - w.last_seen
            if silent > limit:
                self._lose(ident, f"silent for {silent:.1f} s", events)

    def _assign(self) -> None:
        if not self.queue or not self.workers:
            return
        limit = 1 + self.prefetch
        while self.queue:
            # least loaded first: an idle worker gets a job before anyone gets a prefetch
            candidates = [w for w in self.workers.values() if len(w.jobs) < limit]
            if not candidates:
                return
            w = min(candidates, key=lambda w: (len(w.jobs), w.done + w.failed))
            jid = self.queue.popleft()
            job = self.jobs.get(jid)
            if job is None:
                continue
            job.worker = w.ident
            job.assigned = time.monotonic()
            w.jobs.append(jid)
            header = {"job_id": jid, "movie": job.movie, "picks": job.picks, "config": self.config,
                      "float16": self.float16}
            self._send(w.ident, "job", header)


def _user_id(frame: Any) -> str:
    """The User-Id the ZAP handler gave this connection (the client's Z85 public key), or ""."""
    try:
        return str(frame.get("User-Id") or "")
    except (AttributeError, zmq.ZMQError):
        return ""
