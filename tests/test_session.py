"""The session (``lmc run``) over many movies: its bookkeeping stays bounded, and a restart redoes nothing.

Real tiny TIFF movies and STAR pick files on disk, a real local worker process and the real writer;
only the per-movie processing is a small real handler (``handler`` below) so that 40 movies take a
few seconds.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from streamer import config as config_mod
from streamer.formats.picks import write_star_coords
from streamer.live.session import Session
from streamer.types import MovieResult

TESTS = Path(__file__).resolve().parent
N = 40


def handler(job: dict) -> MovieResult:
    """Two blank particles of the session's output box per movie (the worker's job handler)."""
    cfg = config_mod.from_dict(job["config"])
    b, n = cfg.out_box, 2
    return MovieResult(job["movie"], np.zeros((n, b, b), np.float32), np.array([8.0, 16.0]), np.array([8.0, 12.0]),
                       {}, [], np.zeros((4, 2)), np.zeros((n, 4, 2)), np.zeros((n, 4, 2)), (32, 32), cfg.apix,
                       {"motion_total_A": 1.0})


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(0).integers(0, 4, (4, 32, 32), dtype=np.uint8), photometric="minisblack")
    (tmp_path / "movies").mkdir()
    (tmp_path / "picks").mkdir()
    for i in range(N):
        (tmp_path / "movies" / f"m{i:03d}.tiff").write_bytes(buf.getvalue())
        write_star_coords(tmp_path / "picks" / f"m{i:03d}_autopick.star", np.array([8.0, 16.0]), np.array([8.0, 12.0]))
    return tmp_path


def run(folders: Path) -> tuple[Session, dict]:
    cfg = config_mod.from_dict({
        "local": {"enabled": False}, "movies": str(folders / "movies"), "picks": {"dir": str(folders / "picks")},
        "out": str(folders / "out"), "apix": 1.0, "dose_per_frame": 1.0, "box": 16, "plots": False, "device": "cpu", "workers": 1,
        "settle_seconds": 0.0, "poll": 0.3, "heartbeat": 0.3,
    })
    s = Session(cfg, once=True, headless=False, worker_handler="test_session:handler")
    return s, s.run()


def test_bookkeeping_stays_bounded_over_many_movies_and_restart_redoes_none(folders: Path) -> None:
    s, summary = run(folders)
    assert summary["this_session"]["done"] == N and summary["done"] == N and not summary["aborted"]
    assert s.watcher is not None and s.dispatcher is not None and s.writer is not None
    # finished movies keep no Entry (their paths only), the dispatcher no job, the writer no copy of the done set
    assert s.watcher.retained() == {"entries": 0, "finished": N}
    assert s.dispatcher.jobs == {} and not s.dispatcher.queue and s.inflight == {}
    assert s.writer.done_movies == set()
    # recent commits are one-second buckets, not one entry per movie
    assert sum(b[1] for b in s.metrics.commits) == N and sum(b[2] for b in s.metrics.commits) == 2 * N
    assert len(s.metrics.commits) <= math.ceil(summary["elapsed_s"]) + 1 and len(s.metrics.commits) < N
    snap = s.snapshot()
    assert snap["counts"]["done"] == N and snap["rates"]["movies_per_hour_recent"] > 0
    assert len(snap["recent"]) <= 50 and len(s.metrics.latencies) <= s.metrics.latencies.maxlen

    again, summary = run(folders)  # the ledger is the durable record: nothing is processed twice
    assert summary["this_session"] == {"done": 0, "failed": 0, "skipped": 0, "particles": 0}
    assert summary["done"] == N and summary["particles"] == 2 * N
    assert again.watcher is not None and again.watcher.retained() == {"entries": 0, "finished": N}
    assert again.snapshot()["counts"]["done"] == N
