"""Dispatcher + workers over real sockets with real worker processes (small real job handler)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from streamer.live import protocol
from streamer.live.dispatcher import Dispatcher, DispatcherError, Event, is_loopback
from streamer.live.keys import create_keys, setup_client
from streamer.types import MovieResult

HB = 0.2
LIVENESS = 5
TESTS = Path(__file__).resolve().parent


def job_handler(job: dict) -> MovieResult:
    """A real, small job: the 'movie' is a JSON file saying how many particles, how long, what goes wrong."""
    spec = json.loads(Path(job["movie"]).read_text())
    if spec.get("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.get("raise"):
        raise ValueError(f"{job['movie']}: {spec['raise']}")
    time.sleep(spec.get("sleep", 0.0))
    n, box = spec.get("n", 2), 8
    value = float(spec.get("value", 1.0))
    return MovieResult(
        movie=job["movie"],
        particles=np.full((n, box, box), value, np.float32),
        x=np.arange(n, dtype=np.float64),
        y=np.arange(n, dtype=np.float64) * 2,
        columns={},
        skipped=[],
        frame_shifts=np.zeros((3, 2)),
        traj_raw=np.zeros((n, 3, 2)),
        traj_smooth=np.zeros((n, 3, 2)),
        micrograph_shape=(64, 64),
        apix=1.0,
        stats={"pid": os.getpid()},
    )


def spawn_worker(endpoint: str | Dispatcher, *extra: str) -> subprocess.Popen:
    """A real worker process; given the Dispatcher itself, it connects with that dispatcher's keys."""
    if isinstance(endpoint, Dispatcher):
        extra = ("--keys", str(endpoint.keys), *extra)
        endpoint = endpoint.endpoint
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "streamer.live.worker", "--connect", endpoint, "--handler", "test_dispatcher:job_handler",
           "--heartbeat", str(HB), "--liveness", str(LIVENESS), "--device", "cpu", "--threads", "1", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def keyed_socket(d: Dispatcher, kind: int = zmq.DEALER) -> zmq.Socket:
    """A raw socket holding the workers' key (an authenticated peer speaking the wire format by hand)."""
    sock = zmq.Context.instance().socket(kind)
    sock.linger = 0
    setup_client(sock, d.keys)
    sock.connect(d.endpoint)
    return sock


def started_dispatcher(keys: Path, max_attempts: int) -> Dispatcher:
    """The tests' one recipe for a pool: new keys in ``keys``, a Dispatcher on a free local port with
    the tests' heartbeat, its own context, started. Close it with :func:`shut`."""
    create_keys(keys)
    d = Dispatcher("tcp://127.0.0.1:0", keys=keys, heartbeat=HB, liveness=LIVENESS, max_attempts=max_attempts,
                   context=zmq.Context())
    d.start()
    return d


def shut(d: Dispatcher) -> None:
    """Tell the workers it knows to stop, close it and drop its context's unsent messages."""
    d.close(stop_workers=True)
    d.ctx.destroy(linger=0)


@pytest.fixture
def dispatcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dispatcher]:
    d = started_dispatcher(tmp_path_factory.mktemp("keys") / "keys", max_attempts=2)
    yield d
    shut(d)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def run_until(d: Dispatcher, done: Callable[[list[Event]], bool], timeout: float = 15.0) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        assert time.monotonic() < deadline, f"timed out; events so far: {[(e.kind, e.reason) for e in events]}"
        events += d.poll(0.05)
        for w in d.workers.values():
            assert len(w.jobs) <= 1 + d.prefetch  # never more than one job plus one prefetch
    return events


def kinds(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


def movie(tmp: Path, name: str, **spec: object) -> str:
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(spec))
    return str(p)


def test_loopback_rules() -> None:
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:2")
    assert is_loopback("ipc:///tmp/x")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555") and not is_loopback("tcp://10.0.0.3:1")
    for bind in ("tcp://0.0.0.0:0", "tcp://127.0.0.1:0", "ipc:///tmp/lmc-x"):  # no bind without keys
        with pytest.raises(DispatcherError, match="without CURVE keys"):
            Dispatcher(bind)


def test_jobs_spread_over_workers_each_result_once(dispatcher: Dispatcher, procs: list, tmp_path: Path) -> None:
    procs += [spawn_worker(dispatcher, "--name", f"w{i}") for i in range(2)]
    run_until(dispatcher, lambda ev: len(kinds(ev, "joined")) == 2)
    jobs = [dispatcher.submit(movie(tmp_path, f"m{i}", n=i + 1, sleep=0.15, value=i)) for i in range(6)]
    events = run_until(dispatcher, lambda ev: len(kinds(ev, "result")) == 6)
    results = {e.job.job_id: e.result for e in kinds(events, "result")}
    assert sorted(results) == sorted(j.job_id for j in jobs)
    for i, j in enumerate(jobs):
        r = results[j.job_id]
        assert r.movie == j.movie and r.n == i + 1 and np.all(r.particles == i)
    assert len({r.stats["pid"] for r in results.values()}) == 2  # both workers took part
    assert dispatcher.pending() == 0
    snap = {w["name"]: w for w in dispatcher.snapshot()}
    assert set(snap) == {"w0", "w1"} and sum(w["done"] for w in snap.values()) == 6
    dispatcher.close(stop_workers=True)
    for p in procs:
        assert p.wait(timeout=10) == 0  # "stop" ends a worker cleanly


def test_sigkilled_worker_job_redone_by_another(dispatcher: Dispatcher, procs: list, tmp_path: Path) -> None:
    procs += [spawn_worker(dispatcher) for _ in range(2)]
    run_until(dispatcher, lambda ev: len(kinds(ev, "joined")) == 2)
    slow = dispatcher.submit(movie(tmp_path, "slow", n=3, sleep=1.5, value=7))
    events = run_until(dispatcher, lambda ev: bool(kinds(ev, "started")))
    victim = dispatcher.workers[slow.worker]
    os.kill(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    events = run_until(dispatcher, lambda ev: bool(kinds(ev, "result")))
    assert [e.worker for e in kinds(events, "lost")] == [victim.name]
    assert "silent" in kinds(events, "lost")[0].reason
    assert time.monotonic() - t0 < HB * LIVENESS + 3.0
    (res,) = kinds(events, "result")
    assert res.job.job_id == slow.job_id and res.job.attempts == 1 and res.result.stats["pid"] != victim.pid
    assert np.all(res.result.particles == 7)
    # nothing else arrives for that job
    assert not kinds(dispatcher.poll(0.5), "result")


def test_reported_death_requeues_at_once_and_poison_is_set_aside(dispatcher: Dispatcher, procs: list, tmp_path: Path) -> None:
    procs += [spawn_worker(dispatcher) for _ in range(2)]
    run_until(dispatcher, lambda ev: len(kinds(ev, "joined")) == 2)
    bad = dispatcher.submit(movie(tmp_path, "bad", crash=True))
    lost: list[Event] = []
    t0 = time.monotonic()
    while not any(e.kind == "poison" for e in lost):
        assert time.monotonic() - t0 < 10
        lost += dispatcher.poll(0.05)
        for p in procs:  # the session's view: a child process exited
            if p.poll() is not None and p.pid in [w.pid for w in dispatcher.workers.values()]:
                lost += dispatcher.worker_died(p.pid, f"exited with {p.returncode}")
    assert time.monotonic() - t0 < HB * LIVENESS  # reported deaths do not wait for the heartbeat timeout
    (poison,) = kinds(lost, "poison")
    assert poison.job.job_id == bad.job_id and poison.job.attempts == 2
    assert "set aside after 2 failed attempts" in poison.reason and "exited with -9" in poison.reason
    assert dispatcher.pending() == 0


def test_error_is_reported_not_retried(dispatcher: Dispatcher, procs: list, tmp_path: Path) -> None:
    procs.append(spawn_worker(dispatcher))
    run_until(dispatcher, lambda ev: bool(kinds(ev, "joined")))
    m = movie(tmp_path, "broken", **{"raise": "truncated: header says 40 frames, file holds 37"})
    dispatcher.submit(m)
    good = dispatcher.submit(movie(tmp_path, "good", n=1))
    events = run_until(dispatcher, lambda ev: bool(kinds(ev, "failed")) and bool(kinds(ev, "result")))
    (failed,) = kinds(events, "failed")
    assert failed.reason == f"ValueError: {m}: truncated: header says 40 frames, file holds 37"
    assert failed.job.attempts == 0 and not failed.user_error
    assert kinds(events, "result")[0].job.job_id == good.job_id


def test_silent_worker_is_replaced_and_its_late_result_dropped(dispatcher: Dispatcher, procs: list, tmp_path: Path) -> None:
    procs += [spawn_worker(dispatcher) for _ in range(2)]
    run_until(dispatcher, lambda ev: len(kinds(ev, "joined")) == 2)
    job = dispatcher.submit(movie(tmp_path, "m", n=2, sleep=1.0, value=3))
    run_until(dispatcher, lambda ev: bool(kinds(ev, "started")))
    frozen = dispatcher.workers[job.worker]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        events = run_until(dispatcher, lambda ev: bool(kinds(ev, "result")))
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert kinds(events, "lost")[0].worker == frozen.name
    # the thawed worker finishes its copy; the dispatcher drops it and the worker registers again
    later = run_until(dispatcher, lambda ev: bool(kinds(ev, "joined")), timeout=10)
    later += dispatcher.poll(1.5)
    assert not kinds(later, "result")
    assert len(dispatcher.workers) == 2


def test_garbage_is_logged_and_dropped(dispatcher: Dispatcher, procs: list, tmp_path: Path, caplog) -> None:
    raw = keyed_socket(dispatcher)
    req = keyed_socket(dispatcher, zmq.REQ)
    try:
        raw.send_multipart([b"\x80\x04\x95 pickle?"])
        raw.send_multipart([json.dumps({"v": 1, "type": "result", "job_id": "x"}).encode()])
        raw.send_multipart([json.dumps({"v": 1, "type": "ready", "worker": {"name": "no wid"}, "arrays": []}).encode()])
        req.send(b"hello")
        # a well-formed result for a job nobody was given is dropped too
        fake = protocol.encode("error", {"job_id": "nope", "movie": "m", "reason": "r", "user_error": True})
        raw.send_multipart(fake)
        t0 = time.monotonic()
        while dispatcher.dropped < 5 and time.monotonic() - t0 < 5:
            assert not [e for e in dispatcher.poll(0.05) if e.kind in ("result", "failed", "joined")]
        assert dispatcher.dropped == 5 and not dispatcher.workers
        assert "malformed" in caplog.text
        # the dispatcher still works
        procs.append(spawn_worker(dispatcher))
        dispatcher.submit(movie(tmp_path, "ok", n=1))
        assert kinds(run_until(dispatcher, lambda ev: bool(kinds(ev, "result"))), "result")
    finally:
        raw.close()
        req.close()


def test_heartbeats_flow_while_a_long_job_runs(dispatcher: Dispatcher, procs: list, tmp_path: Path) -> None:
    procs.append(spawn_worker(dispatcher))
    run_until(dispatcher, lambda ev: bool(kinds(ev, "joined")))
    dispatcher.submit(movie(tmp_path, "long", n=1, sleep=2 * HB * LIVENESS))  # twice the silence limit
    events = run_until(dispatcher, lambda ev: bool(kinds(ev, "result")))
    assert not kinds(events, "lost") and not kinds(events, "requeued")


def test_drain_cancels_prefetched_jobs_but_not_the_running_one(dispatcher: Dispatcher, procs: list, tmp_path: Path) -> None:
    procs.append(spawn_worker(dispatcher))
    run_until(dispatcher, lambda ev: bool(kinds(ev, "joined")))
    first = dispatcher.submit(movie(tmp_path, "a", n=1, sleep=1.0))
    second = dispatcher.submit(movie(tmp_path, "b", n=1))
    third = dispatcher.submit(movie(tmp_path, "c", n=1))
    run_until(dispatcher, lambda ev: bool(kinds(ev, "started")))
    (w,) = dispatcher.workers.values()
    assert w.jobs == [first.job_id, second.job_id]  # one running, one prefetched, one waiting here
    assert [j.job_id for j in dispatcher.cancel_unstarted()] == [third.job_id]
    events = run_until(dispatcher, lambda ev: dispatcher.pending() == 0)
    assert [e.job.job_id for e in kinds(events, "cancelled")] == [second.job_id]
    assert [e.job.job_id for e in kinds(events, "result")] == [first.job_id]


def test_nothing_is_kept_per_finished_job(dispatcher: Dispatcher, procs: list, tmp_path: Path) -> None:
    """A long session must not grow the dispatcher: after 40 jobs (and a late duplicate), no container
    it holds has an entry per job; a late copy of a finished job's result is still dropped."""
    procs.append(spawn_worker(dispatcher, "--name", "w0"))
    run_until(dispatcher, lambda ev: len(kinds(ev, "joined")) == 1)
    jobs = [dispatcher.submit(movie(tmp_path, f"m{i}", n=1)) for i in range(40)]
    events = run_until(dispatcher, lambda ev: len(kinds(ev, "result")) == 40)
    assert sorted(e.job.job_id for e in kinds(events, "result")) == sorted(j.job_id for j in jobs)
    sized = {k: len(v) for k, v in vars(dispatcher).items() if isinstance(v, (dict, set, list, deque))}
    assert max(sized.values()) <= 1, sized  # the one worker; no per-job record outlives its job
    # a stale result for a finished job (e.g. from a worker thought lost) is dropped, not delivered twice
    sock = keyed_socket(dispatcher)
    try:
        job = jobs[0]
        result = MovieResult(job.movie, np.zeros((1, 8, 8), np.float32), np.zeros(1), np.zeros(1), {}, [],
                             np.zeros((3, 2)), np.zeros((1, 3, 2)), np.zeros((1, 3, 2)), (64, 64), 1.0, {})
        sock.send_multipart(protocol.encode_result(job.job_id, result))
        late: list[Event] = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            late += dispatcher.poll(0.05)
        assert not kinds(late, "result") and dispatcher.pending() == 0
    finally:
        sock.close()
