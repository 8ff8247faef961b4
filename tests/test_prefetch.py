"""A worker decodes the next movie ahead while the current one is processed (issue: speed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from streamer.config import from_dict
from streamer.movies import MovieError
from streamer.pipeline import process_movie
from streamer.simulate import SimParams, simulate_session
from streamer.worker import PipelineHandler


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prefetch")
    simulate_session(root, SimParams(movies=2, frames=8, shape=(384, 384), particles=4, seed=5))
    return root


def _job(session: Path, movie: Path) -> dict:
    cfg = from_dict({"box": 96, "device": "cpu", "gain": {"file": str(session / "gain.mrc")},
                     "picks": {"dir": str(session / "picks")}, "local": {"enabled": False}})
    return {"job_id": movie.name, "movie": str(movie), "picks": None, "config": dataclasses.asdict(cfg)}


def test_prefetched_movie_is_used_and_gives_the_same_result(session: Path) -> None:
    movies = sorted((session / "movies").iterdir())
    handler = PipelineHandler()
    job = _job(session, movies[1])
    handler.prefetch(job)
    ahead_movie, future = handler._ahead
    assert ahead_movie == str(movies[1])
    future.result(timeout=60)
    got = handler(job)
    assert handler._ahead is None  # consumed
    direct = process_movie(handler._config(job), str(movies[1]), write_sidecars=False)
    assert np.array_equal(got.particles, direct.particles)


def test_prefetch_of_another_movie_is_dropped(session: Path) -> None:
    movies = sorted((session / "movies").iterdir())
    handler = PipelineHandler()
    handler.prefetch(_job(session, movies[0]))
    res = handler(_job(session, movies[1]))
    assert res.movie == str(movies[1]) and handler._ahead is None


def test_decode_error_of_a_prefetched_movie_surfaces_with_its_job(session: Path, tmp_path: Path) -> None:
    bad = tmp_path / "FoilHole_9_Data_9_fractions.mrc"
    bad.write_bytes(b"\0" * 100)
    handler = PipelineHandler()
    job = _job(session, bad)
    handler.prefetch(job)
    with pytest.raises(MovieError, match=str(bad)):
        handler(job)
