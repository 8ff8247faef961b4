"""Trust no peer: real sockets, real worker processes, hostile peers speaking the real wire format.

An unauthenticated peer and a peer with the wrong key cannot join or send anything (and are logged);
an authenticated peer cannot deliver a result for a job held by another worker; a result from the
assigned worker is refused when its content is not what the session expects (columns, text, counts,
numbers, size). STAR text values round-trip through starfile and a model of RELION's reader, or are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import starfile
import zmq
from test_dispatcher import keyed_socket, kinds, movie, run_until, shut, spawn_worker, started_dispatcher

from streamer.config import Config
from streamer.formats import relion_star
from streamer.formats.columns import ColumnError, ColumnSet, star_quote
from streamer.live import protocol
from streamer.live.dispatcher import Dispatcher, Event
from streamer.live.keys import create_keys, setup_client
from streamer.types import MovieResult


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[Dispatcher]:
    # refused results are retried: enough attempts that no test runs out of them
    d = started_dispatcher(tmp_path / "keys", max_attempts=20)
    yield d
    shut(d)


def _result(movie_path: str, n: int = 2, box: int = 8, frames: int = 3, columns: dict | None = None,
            skipped: int = 1) -> MovieResult:
    return MovieResult(
        movie=movie_path,
        particles=np.ones((n, box, box), np.float32),
        x=np.arange(n, dtype=np.float64) + 5,
        y=np.arange(n, dtype=np.float64) + 5,
        columns=columns if columns is not None else {"rlnDefocusU": np.full(n, 1.5e4), "rlnGroupName": np.array(["g 1"] * n, dtype=object)},
        skipped=[(0.0, 0.0, "outside the 64x64 frame")] * skipped,
        frame_shifts=np.zeros((frames, 2)),
        traj_raw=np.zeros((n, frames, 2)),
        traj_smooth=np.zeros((n, frames, 2)),
        micrograph_shape=(64, 64),
        apix=1.0,
        stats={},
    )


def _poll_for(d: Dispatcher, seconds: float) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        events += d.poll(0.05)
    return events


def _rogue_worker(d: Dispatcher, wid: str) -> zmq.Socket:
    """An authenticated peer (it holds the workers' key) that registers and answers by hand."""
    sock = keyed_socket(d)
    sock.send_multipart(protocol.encode("ready", {"worker": {"wid": wid, "name": wid, "pid": 1}}))
    return sock


def _await(d: Dispatcher, sock: zmq.Socket, kind: str, timeout: float = 10.0) -> list[Event]:
    """Poll the dispatcher until an event of ``kind``, heartbeating for the hand-driven worker."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not kinds(events, kind):
        assert time.monotonic() < deadline, f"no {kind} event"
        sock.send_multipart(protocol.encode("heartbeat"))
        events += d.poll(0.05)
    return events


def _next_job(d: Dispatcher, sock: zmq.Socket, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.send_multipart(protocol.encode("heartbeat"))  # stay alive like a real worker
        d.poll(0.02)
        if sock.poll(30):
            msg = protocol.decode(sock.recv_multipart(), allowed=protocol.DISPATCHER_TYPES)
            if msg.type == "job":
                return msg.header
    raise AssertionError("no job arrived")


def test_unauthenticated_and_wrong_key_peers_never_join_and_are_logged(keyed: Dispatcher, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    d = keyed
    stranger = tmp_path / "stranger"  # a complete key set of its own + this dispatcher's public server key
    create_keys(stranger)
    shutil.copyfile(d.keys / "server.key", stranger / "server.key")
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)  # no CURVE at all
    plain.linger = 0
    plain.connect(d.endpoint)
    wrong = ctx.socket(zmq.DEALER)
    wrong.linger = 0
    setup_client(wrong, stranger)
    wrong.connect(d.endpoint)
    procs = []
    try:
        with caplog.at_level(logging.WARNING, logger="lmc"):
            job = d.submit(movie(tmp_path, "real", n=2, value=7))
            for peer in (plain, wrong):  # both try to join and to forge the (guessed) result
                peer.send_multipart(protocol.encode("ready", {"worker": {"wid": "evil", "name": "evil"}}))
                peer.send_multipart(protocol.encode_result(job.job_id, _result(job.movie)))
            events = _poll_for(d, 1.5)
            assert not d.workers and not kinds(events, "joined") and not kinds(events, "result")
            assert d.pending() == 1 and job.worker is None  # nobody was handed the job
            # the real worker with the key gets it and its result is the one delivered
            procs.append(spawn_worker(d, "--name", "real"))
            events = run_until(d, lambda ev: bool(kinds(ev, "result")))
            (res,) = kinds(events, "result")
            assert res.worker == "real" and float(res.result.particles.mean()) == 7.0
        text = caplog.text
        assert "refused a connection" in text
        assert "a peer without CURVE" in text  # the plain peer
        assert re.search(r"Unknown key: CURVE key \S{40} from 127\.0\.0\.1", text)  # the stranger, with its key
        assert any("Unknown key" in k for k in d.refused_counts()) and d.dropped == 0  # never even heard
    finally:
        plain.close()
        wrong.close()
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_a_result_for_another_workers_job_is_refused(keyed: Dispatcher, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    d = keyed
    procs = [spawn_worker(d, "--name", "real")]
    rogue = None
    try:
        run_until(d, lambda ev: bool(kinds(ev, "joined")))
        rogue = _rogue_worker(d, "rogue")
        run_until(d, lambda ev: bool(kinds(ev, "joined")))
        job = d.submit(movie(tmp_path, "held", n=2, value=3, sleep=1.0))
        run_until(d, lambda ev: bool(kinds(ev, "started")))
        assert d.workers[job.worker].name == "real"
        assert re.fullmatch(r"[0-9a-f]{32}", job.job_id)  # unguessable: 128 random bits
        # worst case: the rogue knows the id (and the movie) and answers first
        with caplog.at_level(logging.WARNING, logger="lmc"):
            rogue.send_multipart(protocol.encode_result(job.job_id, _result(job.movie, columns={})))
            rogue.send_multipart(protocol.encode("error", {"job_id": job.job_id, "movie": job.movie, "reason": "x",
                                                           "user_error": True}))
            events = run_until(d, lambda ev: bool(kinds(ev, "result")))
        (res,) = kinds(events, "result")
        assert res.worker == "real" and float(res.result.particles.mean()) == 3.0 and not kinds(events, "failed")
        assert d.dropped == 2 and caplog.text.count("not a job of this worker") == 2
    finally:
        if rogue is not None:
            rogue.close()
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_results_that_do_not_match_the_session_are_refused(keyed: Dispatcher, tmp_path: Path) -> None:
    """The rogue is the assigned worker: each bad answer is refused (the job goes back to the queue,
    and back to it, the only worker), then a good one is accepted."""
    d = keyed
    columns = ColumnSet((("rlnDefocusU", "f"), ("rlnGroupName", "s"), ("rlnClassNumber", "i")))
    expected = {"rlnDefocusU": "f", "rlnGroupName": "s"}  # what this movie's pick file has
    spec = protocol.ResultSpec(out_box=8, n_picks=3, frames=3, apix=1.0, columns=columns, expected=expected,
                               max_bytes=protocol.result_limit(3, 8, 3, 2))
    path = movie(tmp_path, "m", n=2)
    good = _result(path)
    bad: list[tuple[str, MovieResult]] = []

    def variant(why: str, **change: object) -> None:
        r = _result(path)
        for k, v in change.items():
            setattr(r, k, v)
        bad.append((why, r))

    variant("control character ('\\n')", columns={"rlnDefocusU": np.full(2, 1.0), "rlnGroupName": np.array(["a\n/etc/passwd", "b"], dtype=object)})
    variant("missing rlnDefocusU", columns={"rlnGroupName": np.array(["a", "b"], dtype=object)})
    variant("unexpected rlnClassNumber", columns={**good.columns, "rlnClassNumber": np.array([1, 2])})
    variant("unexpected rlnEvil", columns={**good.columns, "rlnEvil": np.array([1.0, 2.0])})
    variant("not a finite number", columns={"rlnDefocusU": np.array([1.0, np.inf]), "rlnGroupName": good.columns["rlnGroupName"]})
    variant("particles holds a value that is not a finite", particles=np.full((2, 8, 8), np.nan, np.float32))
    variant("quote character", columns={"rlnDefocusU": np.full(2, 1.0), "rlnGroupName": np.array(['x" y', "b"], dtype=object)})
    variant("the pick file has 3", skipped=[])
    variant("particle box 16", particles=np.ones((2, 16, 16), np.float32))
    variant("outside the 64x64", x=np.array([5.0, 99.0]))
    rogue = _rogue_worker(d, "assigned")
    try:
        run_until(d, lambda ev: bool(kinds(ev, "joined")))
        job = d.submit(path, spec=spec)
        for why, r in bad:
            header = _next_job(d, rogue)
            assert header["job_id"] == job.job_id
            rogue.send_multipart(protocol.encode_result(job.job_id, r))
            events = _await(d, rogue, "requeued")
            (req,) = kinds(events, "requeued")
            assert "result refused" in req.reason and why in req.reason, (why, req.reason)
            assert not kinds(events, "result")
        # a message larger than the job's limit (a small limit here: the real one is result_limit's)
        d.jobs[job.job_id].spec = dataclasses.replace(spec, max_bytes=20_000)
        _next_job(d, rogue)
        big = _result(path)
        big.plot_png = b"\x89PNG\r\n\x1a\n" + bytes(30_000)
        rogue.send_multipart(protocol.encode_result(job.job_id, big))
        (req,) = kinds(_await(d, rogue, "requeued"), "requeued")
        assert "exceeds this job's limit of 20000" in req.reason
        d.jobs[job.job_id].spec = spec
        _next_job(d, rogue)
        rogue.send_multipart(protocol.encode_result(job.job_id, good))
        (res,) = kinds(_await(d, rogue, "result"), "result")
        assert list(res.result.columns["rlnGroupName"]) == ["g 1", "g 1"]
    finally:
        rogue.close()


# -- STAR text values --------------------------------------------------------------------------


def relion_tokens(line: str) -> list[str]:
    """RELION's loop-line reader as documented in streamer/formats/columns.py (simplify, then
    nextTokenInSTAR): control characters dropped, tabs to spaces, runs of spaces collapsed, a token
    starting with a quote runs to the matching quote followed by a space or the end, '#' starts a comment."""
    line = line.replace("\t", " ")
    line = "".join(ch for ch in line if ch not in "\n\v\b\r\f\a")
    line = re.sub(" +", " ", line).lstrip(" ")
    out: list[str] = []
    i = 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        if line[i] == "#":
            break
        if line[i] in "\"'":
            q = line[i]
            j = i + 1
            while j < len(line) and not (line[j] == q and (j + 1 == len(line) or line[j + 1] == " ")):
                j += 1
            out.append(line[i + 1 : j])
            i = j + 1
        else:
            j = line.find(" ", i)
            j = len(line) if j < 0 else j
            out.append(line[i:j])
            i = j
    return out


GOOD_TEXT = ["plain", "with space", "a#b", "#hash", "_under", "data_x", "loop_", "$dollar", ";semi", "",
             "/data/session 1/FoilHole_1_Data 2.tif", "ünïcödé name"]
BAD_TEXT = ["new\nline", "tab\there", "quo\"te", "it's", "two  spaces", " lead", "trail ", "nul\x00", "\u2028sep"]


def test_star_text_values_round_trip_through_starfile_and_relion_or_are_refused(tmp_path: Path) -> None:
    cfg = Config(box=16, apix=1.0, dose_per_frame=1.0)
    cols = ColumnSet((("rlnGroupName", "s"),)).star_columns()
    mic = "/data/session 1/FoilHole 7.tif"
    n = len(GOOD_TEXT)
    rows = relion_star.render_rows(cols, [f"{i + 1}@/out dir/stacks/particles_00001.mrcs" for i in range(n)], mic,
                                   np.arange(n, dtype=float), np.arange(n, dtype=float),
                                   {"rlnGroupName": np.array(GOOD_TEXT, dtype=object)})
    path = tmp_path / "p.star"
    path.write_text(relion_star.render_header(cfg, cols) + rows)
    star = starfile.read(path, always_dict=True)["particles"]
    assert len(star) == n
    assert [("" if v is None or v != v else str(v)) for v in star["rlnGroupName"]] == GOOD_TEXT
    assert set(star["rlnMicrographName"]) == {mic}
    assert list(star["rlnImageName"])[:2] == ["1@/out dir/stacks/particles_00001.mrcs", "2@/out dir/stacks/particles_00001.mrcs"]
    for i, line in enumerate(rows.splitlines()):
        tokens = relion_tokens(line)
        assert len(tokens) == len(cols) and tokens[1] == mic and tokens[-1] == GOOD_TEXT[i], (line, tokens)
    for value in BAD_TEXT:
        with pytest.raises(ColumnError):
            star_quote(value)
        with pytest.raises(ColumnError):
            relion_star.render_rows(cols, ["1@s.mrcs"], "m.tif", np.zeros(1), np.zeros(1),
                                    {"rlnGroupName": np.array([value], dtype=object)})
    with pytest.raises(ColumnError, match="not a RELION label"):
        ColumnSet((("rln bad", "f"),))
    with pytest.raises(ColumnError, match="written by lmc itself"):
        ColumnSet((("rlnImageName", "s"),))


def test_a_worker_writes_no_files_whatever_folder_the_job_names(tmp_path: Path) -> None:
    """A job naming an output folder (here one outside any session) makes the worker write nothing
    there: the plot comes back as PNG bytes for the session's writer."""
    from streamer.live.handler import PipelineHandler
    from streamer.sim.simulate import SimParams, simulate_session

    scope = tmp_path / "scope"
    simulate_session(scope, SimParams(movies=1, frames=8, shape=(256, 256), particles=4, seed=2))
    (movie,) = sorted((scope / "movies").iterdir())
    elsewhere = tmp_path / "not-a-session"
    cfg = Config(box=64, device="cpu", apix=1.0, dose_per_frame=1.0, out=str(elsewhere), plots=True).with_(
        gain=dataclasses.replace(Config().gain, file=str(scope / "gain.mrc")))
    job = {"job_id": "x", "movie": str(movie), "picks": str(scope / "picks"), "config": cfg.to_dict()}
    before = set(tmp_path.rglob("*"))
    result = PipelineHandler()(job)
    assert result.n > 0 and result.plot_png is not None and result.plot_png.startswith(b"\x89PNG\r\n\x1a\n")
    assert not elsewhere.exists() and set(tmp_path.rglob("*")) == before
