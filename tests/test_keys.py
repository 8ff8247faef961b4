"""CURVE keys: `lmc keys`, a remote worker with the key joins and works, others are refused."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from test_dispatcher import kinds, run_until, spawn_worker

from streamer import config as config_mod
from streamer.cli import build_parser, cmd_worker
from streamer.live import protocol
from streamer.live.dispatcher import Dispatcher
from streamer.live.keys import KeysError, create_keys
from streamer.live.session import Session
from streamer.live.worker import EXIT_REFUSED


def test_create_keys_layout_and_permissions(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    written = create_keys(d)
    names = sorted(str(p.relative_to(d)) for p in written)
    assert names == ["authorized/client.key", "client.key", "client.key_secret", "server.key", "server.key_secret"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for secret in ("client.key_secret", "server.key_secret"):
        assert stat.S_IMODE((d / secret).stat().st_mode) == 0o600
        assert "secret-key" in (d / secret).read_text()
    assert "secret-key" not in (d / "authorized" / "client.key").read_text()
    with pytest.raises(KeysError, match="already exist"):
        create_keys(d)


def test_missing_keys_give_a_clear_error(tmp_path: Path) -> None:
    d = Dispatcher("tcp://0.0.0.0:0", keys=tmp_path / "nokeys", context=zmq.Context())
    with pytest.raises(KeysError, match=r"server\.key_secret: key file not found"):
        d.start()
    d.ctx.term()


def test_remote_worker_with_key_works_and_others_are_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    create_keys(keys)
    # a second pair whose client key the dispatcher never authorised (it knows the server's public key)
    stranger = tmp_path / "stranger"
    create_keys(stranger)
    shutil.copyfile(keys / "server.key", stranger / "server.key")
    job_file = tmp_path / "m.json"
    job_file.write_text(json.dumps({"n": 3, "value": 5}))

    d = Dispatcher("tcp://0.0.0.0:0", keys=keys, heartbeat=0.2, liveness=5, context=zmq.Context())
    endpoint = d.start()
    port = endpoint.rsplit(":", 1)[1]
    connect = f"tcp://127.0.0.1:{port}"
    procs = []
    raw = d.ctx.socket(zmq.DEALER)
    try:
        no_key = spawn_worker(connect)
        wrong_key = spawn_worker(connect, "--keys", str(stranger))
        good = spawn_worker(connect, "--keys", str(keys), "--name", "remote")
        procs = [no_key, wrong_key, good]
        # an unauthenticated peer trying to inject a result is never heard
        raw.linger = 0
        raw.connect(connect)
        raw.send_multipart(protocol.encode("error", {"job_id": "x", "movie": "m", "reason": "r", "user_error": True}))
        d.submit(str(job_file))
        events = run_until(d, lambda ev: bool(kinds(ev, "result")), timeout=15)
        (res,) = kinds(events, "result")
        assert res.worker == "remote" and res.result.n == 3 and float(res.result.particles.mean()) == 5.0
        assert [e.worker for e in kinds(events, "joined")] == ["remote"]
        assert no_key.wait(timeout=10) == EXIT_REFUSED
        assert wrong_key.wait(timeout=10) == EXIT_REFUSED
        assert b"needs the session's CURVE keys" in no_key.stderr.read()
        assert b"refused this worker's key" in wrong_key.stderr.read()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:
            # nobody but the keyed worker is ever heard (it may itself re-join after a missed beat under load)
            heard = [e for e in d.poll(0.05) if e.kind in ("joined", "failed", "result")]
            assert all(e.worker == "remote" and e.kind == "joined" for e in heard), heard
        assert d.dropped == 0 and [w.name for w in d.workers.values()] == ["remote"]
    finally:
        raw.close()
        d.close(stop_workers=True)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        d.ctx.term()


def test_the_join_command_the_session_prints_runs_and_joins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ``lmc worker ...`` line a session bound beyond localhost logs for remote workers, run as printed."""
    keys = tmp_path / "keys"
    create_keys(keys)
    for d in ("movies", "picks"):
        (tmp_path / d).mkdir()
    cfg = config_mod.from_dict({"movies": str(tmp_path / "movies"), "picks": {"dir": str(tmp_path / "picks")},
                                "out": str(tmp_path / "out"), "apix": 1.0, "bind": "tcp://0.0.0.0:0", "keys": str(keys),
                                "heartbeat": 0.2})
    try:
        socket.gethostbyname(socket.getfqdn())
    except OSError:
        pytest.skip("this host's own name does not resolve")
    session = Session(cfg)
    with caplog.at_level(logging.INFO, logger="lmc.session"):
        session._start_dispatcher(cfg)
    d = session.dispatcher
    assert d is not None
    (line,) = [r.getMessage().split(": ", 1)[1] for r in caplog.records if "remote workers can join" in r.getMessage()]
    argv = shlex.split(line)
    assert argv[:2] == ["lmc", "worker"] and "--keys" in argv
    ns = build_parser().parse_args(argv[1:])  # the real `lmc` parser accepts every flag printed
    assert ns.func is cmd_worker and ns.keys == str(keys)
    proc = subprocess.Popen([sys.executable, "-m", "streamer.cli", *argv[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        events = run_until(d, lambda ev: bool(kinds(ev, "joined")), timeout=30)
        assert len(kinds(events, "joined")) == 1 and [w.pid for w in d.workers.values()] == [proc.pid]
    finally:
        d.close(stop_workers=True)
        try:
            assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else b""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        d.ctx.term()
