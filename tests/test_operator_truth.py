"""The operator is told the truth: every pick accounted for (stdout, log, status.json, lmc status),
a warning for a movie that yields no particle, documented exit codes, ``lmc --version``, the
command that made the folder, and ``lmc run``'s progress bar."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from lmc_cli import lmc
from rich.console import Console

from streamer.formats.picks import write_star_coords
from streamer.sim.simulate import SimParams, load_truth, simulate_session
from streamer.ui.progress import RunProgress


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two simulated movies with hand-made picks: A has 3 picks inside the frame and 8 outside,
    B has 5 picks, all outside; C is a corrupt movie."""
    root = tmp_path_factory.mktemp("truth")
    s = root / "s"
    simulate_session(s, SimParams(movies=2, frames=8, shape=(384, 384), particles=4, seed=9, local_A=0.0,
                                  junk_picks=0, edge_particles=0))
    movies = sorted((s / "movies").iterdir())
    picks = root / "picks"
    picks.mkdir()
    inside = load_truth(s, movies[0].name)["picks"][:3]
    outside = np.array([[400.0 + 10 * i, 100.0] for i in range(8)])
    xy = np.vstack([inside, outside])
    write_star_coords(picks / f"{movies[0].name.split('.')[0]}.star", xy[:, 0], xy[:, 1])
    write_star_coords(picks / f"{movies[1].name.split('.')[0]}.star", outside[:5, 0], outside[:5, 1] + 300)
    bad = s / "movies" / "zz_corrupt.tiff"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    write_star_coords(picks / "zz_corrupt.star", [100.0], [100.0])
    return root


def _run(session: Path, out: str, movies: str) -> subprocess.CompletedProcess:
    s = session / "s"
    return lmc("run", "--movies", movies, "--picks", str(session / "picks"), "--gain", str(s / "gain.mrc"),
               "--out", str(session / out), "--box", "64", "--workers", "1", "--settle-seconds", "0",
               "--no-local-enabled", "--apix", "1.0", "--dose-per-frame", "1.0", cwd=session)


def test_every_pick_accounted_for_and_exit_code_1_when_a_movie_failed(session: Path) -> None:
    res = _run(session, "out", str(session / "s" / "movies"))
    assert res.returncode == 1, res.stdout + res.stderr  # one movie failed
    out = res.stdout
    assert "movies done: 2  failed: 1" in out
    # 11 + 5 picks: 3 particles, 13 outside the frame, all said with their reason
    assert "picks this run: 16 picks: 3 particles, 13 skipped (13 outside the 384x384 frame)" in out
    assert "1 movie(s) yielded no particle" in out
    assert "failed:" in out and "zz_corrupt" in out
    log = (session / "out" / "logs" / "lmc.log").read_text()
    assert "11 picks: 3 particles, 8 skipped (8 outside the 384x384 frame)" in log
    assert "no particle: 5 picks: 0 particles, 5 skipped (5 outside the 384x384 frame)" in log
    status = json.loads((session / "out" / "status.json").read_text())
    assert status["session"]["command"] == "run"
    assert status["picks"]["picks"] == 16 and status["picks"]["particles"] == 3
    assert status["picks"]["skip_reasons"] == {"outside the 384x384 frame": 13}
    assert any("no particle" in w for w in status["warnings"])
    shown = lmc("status", str(session / "out"), cwd=session).stdout
    assert shown.startswith("lmc run ")
    assert "picks    16 picks: 3 particles, 13 skipped (13 outside the 384x384 frame)" in shown


def test_exit_code_0_when_every_movie_is_done(session: Path) -> None:
    first = sorted((session / "s" / "movies").glob("*.tif*"))[0]
    res = _run(session, "out0", str(first))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "picks this run: 11 picks: 3 particles, 8 skipped (8 outside the 384x384 frame)" in res.stdout


def test_usage_error_is_exit_2_and_version(session: Path) -> None:
    res = lmc("run", "--movies", "nowhere", "--out", "x", "--box", "63", cwd=session)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    ver = lmc("--version", cwd=session)
    assert ver.returncode == 0 and ver.stdout.startswith("lmc ") and ver.stdout.split()[1][0].isdigit()


def test_progress_bar_shows_movies_particles_and_rate() -> None:
    buf = io.StringIO()
    bar = RunProgress(Console(file=buf, force_terminal=True, width=140))
    bar.start()
    bar.update({"counts": {"done": 3, "failed": 1, "queued": 4}, "particles": 1234,
                "rates": {"movies_per_hour": 120.0}, "picks": {"movies_without_particles": 1},
                "recent": [{"movie": "raw/m1.tif", "time": 1.0, "picks": 11, "particles": 3,
                            "skip_reasons": {"outside the 384x384 frame": 8}}]})
    bar.stop()
    text = buf.getvalue()
    assert "4/8" in text and "1234 particles" in text and "120 movies/h" in text and "1 failed" in text
    assert "done: raw/m1.tif (11 picks: 3 particles, 8 skipped (8 outside the 384x384 frame))" in text


def test_an_unusable_single_pick_file_stops_with_one_line(session: Path, tmp_path: Path) -> None:
    from test_picks_refined import cryosparc_refine_export

    arr = cryosparc_refine_export(3, "m.mrc", (10, 10), 1.0)
    bad = tmp_path / "P1_J5_particles.cs"
    with open(bad, "wb") as fh:
        np.save(fh, arr[[n for n in arr.dtype.names if not n.startswith("location/")]], allow_pickle=False)
    s = session / "s"
    res = lmc("run", "--movies", str(s / "movies"), "--picks", str(bad), "--out", str(tmp_path / "out"),
              "--apix", "1", "--dose-per-frame", "1", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and line.count(str(bad)) == 1
    assert "location/center_x_frac" in line and "Extract From Micrographs" in line
