"""The microscope emulator: movies grow under their final name, picks come later, the content is the simulation's."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from streamer.formats.movies import movie_is_whole, read_movie
from streamer.sim.emulator import MicroscopeEmulator, Timing
from streamer.sim.simulate import SimParams, load_truth, recommended_box, render_movie

TINY = SimParams(movies=2, frames=6, shape=(128, 128), particles=3, edge_particles=1, junk_picks=1, mass_kda=60.0, seed=7)


def _watch_sizes(path: Path, stop: threading.Event, seen: list[tuple[int, bool, bool]]) -> None:
    """Record (size, whole?, its picks exist?) of ``path`` as often as possible, like a watcher would."""
    picks = path.parent.parent / "picks"
    while not stop.is_set():
        if path.exists():
            size = path.stat().st_size
            whole, _ = movie_is_whole(path)
            seen.append((size, whole, any(picks.glob(path.name.split("_fractions")[0] + "*"))))
        time.sleep(0.01)


def test_movies_grow_in_place_and_picks_follow(tmp_path: Path) -> None:
    params = SimParams(**{**TINY.__dict__, "format": "mrc"})
    timing = Timing(interval_s=0.2, chunk_frames=2, chunk_s=0.25, picks_delay_s=0.6)
    events: list[tuple[str, int]] = []
    emu = MicroscopeEmulator(tmp_path / "scope", params, timing, on_event=lambda k, i, p: events.append((k, i)))
    first = emu.movie_path(0)
    seen: list[tuple[int, bool, bool]] = []
    stop = threading.Event()
    spy = threading.Thread(target=_watch_sizes, args=(first, stop, seen))
    spy.start()
    t0 = time.monotonic()
    emu.start()
    assert emu.join(30.0)
    stop.set()
    spy.join()
    assert emu.error is None
    elapsed = time.monotonic() - t0
    # 3 chunks per movie with 2 pauses of 0.25 s each, then 0.6 s until the last picks
    assert elapsed >= 2 * 0.25 + 0.6

    # the file existed partially under its final name, was reported incomplete, then whole
    sizes = [s for s, _, _ in seen]
    final = first.stat().st_size
    assert min(sizes) < final and sizes[-1] == final
    assert any(not whole for _, whole, _ in seen)
    assert all(s == final for s, whole, _ in seen if whole)
    # picks appear only after the movie is whole (never before)
    assert not any(p and not w for _, w, p in seen)
    assert any(w and not p for _, w, p in seen)

    # order: each movie's picks after the movie itself, at least picks_delay later
    order = [e for e in events if e[0] != "finished"]
    assert order.index(("movie_written", 0)) < order.index(("picks_written", 0))
    assert order.index(("movie_written", 1)) < order.index(("picks_written", 1))
    assert events[-1] == ("finished", -1)
    times = {(k, i): t for t, k, i, _ in emu.events}
    for i in range(2):
        assert times[("picks_written", i)] - times[("movie_written", i)] >= 0.6 - 0.05
    assert emu.counts() == {"movies": 2, "picks": 2}


def test_content_matches_the_simulation(tmp_path: Path) -> None:
    timing = Timing(interval_s=0.0, chunk_frames=4, chunk_s=0.05, picks_delay_s=0.05)
    emu = MicroscopeEmulator(tmp_path, TINY, timing)
    emu.run()
    info = json.loads((tmp_path / "session.json").read_text())
    assert info["recommended"]["box"] == recommended_box(TINY) and info["recommended"]["gain"]["file"] == "gain.mrc"
    assert [m["movie"] for m in info["movies"]] == [f"movies/{emu.movie_path(i).name}" for i in range(2)]
    assert (tmp_path / "gain.mrc").is_file()
    for i in range(2):
        counts, truth = render_movie(TINY, i)
        mov = read_movie(emu.movie_path(i))
        assert mov.frames.shape == (6, 128, 128)
        np.testing.assert_array_equal(mov.frames, counts)
        stored = load_truth(tmp_path, emu.movie_path(i).name)
        np.testing.assert_allclose(stored["positions"], truth["positions"])
        picks = sorted((tmp_path / "picks").glob(f"FoilHole_1_Data_{i + 1}_*"))
        assert len(picks) == 1 and picks[0].suffix == ".star"
        text = picks[0].read_text()
        assert "rlnCoordinateX" in text
        assert len([ln for ln in text.splitlines() if ln.strip() and ln[0].isdigit()]) == len(truth["picks"])


def test_stop_ends_early_without_error(tmp_path: Path) -> None:
    params = SimParams(**{**TINY.__dict__, "movies": 4})
    emu = MicroscopeEmulator(tmp_path, params, Timing(interval_s=5.0, chunk_s=0.05, picks_delay_s=5.0))
    emu.start()
    deadline = time.monotonic() + 20
    while emu.counts()["movies"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    t = time.monotonic()
    emu.stop()
    assert time.monotonic() - t < 2.0
    assert emu.finished and emu.error is None
    assert emu.counts() == {"movies": 1, "picks": 0}  # the pending picks were cancelled
    assert not emu.movie_path(2).exists()
