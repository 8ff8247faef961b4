"""No silent physical defaults: the pixel size comes from --apix, the movie's MRC header or the pick
file's optics group (all that know it must agree), the exposure per frame must be given, and both
are said with their source."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import starfile
from lmc_cli import lmc

from streamer.config import from_dict
from streamer.errors import ConfigError, MovieError, PicksError
from streamer.formats.movies import movie_pixel_size, read_movie
from streamer.formats.picks import PickIndex, read_picks
from streamer.physical import for_movie, pixel_size_sources, settle_pixel_size
from streamer.sim.simulate import SimParams, simulate_session

DATA = Path(__file__).parent / "data"




@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phys")
    for fmt in ("mrc", "tiff"):
        simulate_session(root / fmt, SimParams(movies=1, frames=6, shape=(256, 256), particles=3, seed=4, format=fmt,
                                               apix=1.25, local_A=0.0, junk_picks=0, edge_particles=0))
    return root


def _run(sessions: Path, fmt: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    s = sessions / fmt
    return lmc("run", "--movies", str(s / "movies"), "--picks", str(s / "picks"), "--gain", str(s / "gain.mrc"),
               "--out", str(sessions / out), "--box", "64", "--workers", "1", "--settle-seconds", "0",
               "--no-local-enabled", "--no-progress", *extra, cwd=sessions)


def test_mrc_header_gives_the_pixel_size_and_says_so(sessions: Path) -> None:
    movie = next((sessions / "mrc" / "movies").iterdir())
    assert movie_pixel_size(movie) == pytest.approx(1.25)
    assert read_movie(str(movie)).apix == pytest.approx(1.25)
    res = _run(sessions, "mrc", "out_mrc", "--dose-per-frame", "1.0")
    assert res.returncode == 0, res.stdout + res.stderr
    log = (sessions / "out_mrc" / "logs" / "lmc.log").read_text()
    assert f"pixel size 1.25 Å/px from the MRC header of {movie}" in log
    assert "exposure 1 e/Å² per frame (given)" in log
    traj = starfile.read(next((sessions / "out_mrc" / "trajectories").iterdir()), always_dict=True)["general"]
    assert traj["lmcPixelSizeSource"] == f"the MRC header of {movie}"
    assert traj["rlnMicrographOriginalPixelSize"] == pytest.approx(1.25)
    optics = starfile.read(sessions / "out_mrc" / "particles.star")["optics"]
    assert optics["rlnMicrographOriginalPixelSize"][0] == pytest.approx(1.25)


def test_disagreeing_sources_stop_with_one_line(sessions: Path) -> None:
    res = _run(sessions, "mrc", "out_bad", "--dose-per-frame", "1.0", "--apix", "1.06")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and "pixel sizes disagree: 1.06 Å/px from --apix" in line and "1.25 Å/px from the MRC header" in line
    assert not (sessions / "out_bad" / "ledger.sqlite").exists()


def test_unknown_pixel_size_or_exposure_stop_with_one_line(sessions: Path) -> None:
    res = _run(sessions, "tiff", "out_tiff", "--dose-per-frame", "1.0")  # TIFF records no pixel size
    assert res.returncode == 2
    assert "the movie pixel size is not recorded in" in res.stderr and "pass --apix" in res.stderr
    res = _run(sessions, "tiff", "out_tiff", "--apix", "1.25")
    assert res.returncode == 2 and "pass --dose-per-frame" in res.stderr and "Traceback" not in res.stderr
    res = _run(sessions, "tiff", "out_tiff", "--apix", "1.25", "--dose-per-frame", "1.0")
    assert res.returncode == 0, res.stderr
    log = (sessions / "out_tiff" / "logs" / "lmc.log").read_text()
    assert "pixel size 1.25 Å/px from --apix / config.yaml" in log


def test_pick_file_optics_is_a_source_and_is_checked(tmp_path: Path) -> None:
    (tmp_path / "run_data.star").write_text((DATA / "relion5_refine3d_run_data.star").read_text())
    src = PickIndex(tmp_path).lookup("raw/FoilHole_24681357_Data_13579246_13579248_20240101_123456_fractions.tiff")
    cfg = from_dict({"dose_per_frame": 1.0})
    found = pixel_size_sources(cfg, None, src)
    assert found == [(pytest.approx(0.83), f"rlnMicrographOriginalPixelSize in {src.path}")]
    assert settle_pixel_size(cfg, found, "x").apix == pytest.approx(0.83)
    with pytest.raises(ConfigError, match=r"pixel sizes disagree: 1 Å/px from --apix / config\.yaml but 0\.83"):
        settle_pixel_size(cfg, pixel_size_sources(cfg.with_(apix=1.0), None, src), "x")
    with pytest.raises(PicksError, match=r"rlnMicrographOriginalPixelSize = 0\.83 Å/px but the movie's pixel size is 1"):
        read_picks(src, cfg.picks, (4092, 5760), apix=1.0)


def test_a_movie_whose_header_disagrees_fails_alone() -> None:
    cfg = from_dict({"apix": 1.0, "dose_per_frame": 1.0})
    assert for_movie(cfg, "m.mrc", 1.004).apix == 1.0  # within 1%: the session's value stands
    with pytest.raises(MovieError, match=r"m\.mrc: its header records 1\.2 Å/px but the session uses 1 Å/px"):
        for_movie(cfg, "m.mrc", 1.2)
    with pytest.raises(MovieError, match="exposure per frame is not known"):
        for_movie(from_dict({"apix": 1.0}), "m.tif", None)
    assert for_movie(from_dict({"dose_per_frame": 1.0}), "m.mrc", 0.9).apix_source == "the MRC header of m.mrc"
