"""A worker decodes the next movie ahead while the current one is processed (issue: speed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from streamer.config import from_dict
from streamer.formats.movies import MovieError
from streamer.live.handler import PipelineHandler
from streamer.pipeline import process_movie
from streamer.sim.simulate import SimParams, simulate_session


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prefetch")
    simulate_session(root, SimParams(movies=3, frames=8, shape=(384, 384), particles=4, seed=5))
    return root


def _job(session: Path, movie: Path) -> dict:
    cfg = from_dict({"box": 96, "device": "cpu", "apix": 1.0, "dose_per_frame": 1.0, "gain": {"file": str(session / "gain.mrc")},
                     "picks": {"dir": str(session / "picks")}, "local": {"enabled": False}})
    return {"job_id": movie.name, "movie": str(movie), "picks": None, "config": dataclasses.asdict(cfg)}


def test_prefetched_movie_is_used_and_gives_the_same_result(session: Path) -> None:
    movies = sorted((session / "movies").iterdir())
    handler = PipelineHandler()
    job = _job(session, movies[1])
    handler.prefetch(job)
    assert list(handler._ahead) == [str(movies[1])]
    ahead = handler._ahead[str(movies[1])].result(timeout=60)
    assert ahead.frames.shape == (8, 384, 384)
    got = handler(job)
    assert handler._ahead == {} and handler.prefetch_hits == 1  # consumed
    assert ahead.frames.size == 0  # raw frames released after the gain stage
    direct = process_movie(handler._config(job), str(movies[1]), write_sidecars=False)
    assert np.array_equal(got.particles, direct.particles)


def test_worker_order_prefetch_next_then_run_current_uses_every_prefetch(session: Path, tmp_path: Path) -> None:
    # Worker._compute calls prefetch(next job) right before handler(current job): the current job's
    # decode, prefetched during the previous job, must survive that call
    movies = sorted((session / "movies").iterdir())
    jobs = [_job(session, m) for m in movies]
    handler = PipelineHandler()
    results = []
    for i, job in enumerate(jobs):
        if i + 1 < len(jobs):
            handler.prefetch(jobs[i + 1])
        if i >= 1:  # decoded ahead: the file itself is no longer needed
            handler._ahead[job["movie"]].result(timeout=60)
            Path(job["movie"]).rename(tmp_path / Path(job["movie"]).name)
        try:
            results.append(handler(job))
        finally:
            if i >= 1:
                (tmp_path / Path(job["movie"]).name).rename(job["movie"])
    assert handler.prefetch_hits == 2 and handler._ahead == {}
    for job, res in zip(jobs, results, strict=True):
        direct = process_movie(handler._config(job), job["movie"], write_sidecars=False)
        assert np.array_equal(res.particles, direct.particles)


def test_stale_prefetch_is_dropped_and_the_next_one_kept(session: Path) -> None:
    movies = sorted((session / "movies").iterdir())
    handler = PipelineHandler()
    handler.prefetch(_job(session, movies[0]))  # its job is then cancelled: never run
    handler.prefetch(_job(session, movies[2]))  # the job after the one that runs now
    res = handler(_job(session, movies[1]))
    assert res.movie == str(movies[1]) and handler.prefetch_hits == 0
    assert list(handler._ahead) == [str(movies[2])]
    handler.prefetch(_job(session, movies[2]))  # asked again: kept, not decoded twice
    handler.prefetch(_job(session, movies[0]))
    handler.prefetch(_job(session, movies[1]))  # never more than two movies ahead
    assert list(handler._ahead) == [str(movies[0]), str(movies[1])]


def test_decode_error_of_a_prefetched_movie_surfaces_with_its_job(session: Path, tmp_path: Path) -> None:
    bad = tmp_path / "FoilHole_9_Data_9_fractions.mrc"
    bad.write_bytes(b"\0" * 100)
    handler = PipelineHandler()
    job = _job(session, bad)
    handler.prefetch(job)
    with pytest.raises(MovieError, match=str(bad)):
        handler(job)
