"""trajectories/<movie>.star: layout (read with an independent parser), round trip, edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import starfile

from streamer.formats.trajectories import TrajectoriesError, read_trajectories, stat_label, write_trajectories
from streamer.types import MovieResult


def _result(n: int = 3, nf: int = 5, seed: int = 0) -> MovieResult:
    rng = np.random.default_rng(seed)
    frame = np.cumsum(rng.normal(0, 2, (nf, 2)), axis=0)
    frame -= frame[nf // 2]
    raw = frame + rng.normal(0, 0.5, (n, nf, 2))
    smooth = frame + np.linspace(0, 1, nf)[:, None] * rng.normal(0, 1, (n, 1, 2))
    return MovieResult(
        movie="raw/FoilHole_1_Data_2_fractions.tiff",
        particles=np.zeros((n, 16, 16), np.float32),
        x=rng.uniform(0, 5760, n),
        y=rng.uniform(0, 4092, n),
        columns={},
        skipped=[],
        frame_shifts=frame,
        traj_raw=raw,
        traj_smooth=smooth,
        micrograph_shape=(4092, 5760),
        apix=0.83,
        stats={
            "motion_total_A": 12.5,
            "quality_gain": np.float32(0.031),
            "n_particles": n,
            "eer_leftover": 0,
            "local_guard_fallback": True,
            "warnings": ["something"],
            "seconds_align": 1.25,
        },
    )


def test_stat_label() -> None:
    assert stat_label("motion_total_A") == "lmcMotionTotalA"
    assert stat_label("quality_gain") == "lmcQualityGain"
    assert stat_label("n_picks") == "lmcNPicks"


def test_layout_read_by_independent_parser(tmp_path: Path) -> None:
    res = _result(n=3, nf=5)
    path = tmp_path / "trajectories" / "FoilHole_1_Data_2.star"
    write_trajectories(path, res, dose_per_frame=1.2)
    blocks = starfile.read(path, always_dict=True)
    assert list(blocks) == ["general", "global_shift", "particles"]
    g = blocks["general"]
    assert (g["rlnImageSizeX"], g["rlnImageSizeY"], g["rlnImageSizeZ"]) == (5760, 4092, 5)
    assert g["rlnMicrographMovieName"] == res.movie
    assert g["rlnMicrographOriginalPixelSize"] == pytest.approx(0.83)
    assert g["rlnMicrographDoseRate"] == pytest.approx(1.2)
    assert g["lmcMotionTotalA"] == pytest.approx(12.5)
    assert g["lmcQualityGain"] == pytest.approx(0.031, rel=1e-6)
    assert g["lmcLocalGuardFallback"] == 1
    assert "lmcWarnings" not in g
    gs = blocks["global_shift"]
    assert list(gs.columns) == ["rlnMicrographFrameNumber", "lmcFrameShiftX", "lmcFrameShiftY"]
    np.testing.assert_array_equal(gs["rlnMicrographFrameNumber"], np.arange(1, 6))
    np.testing.assert_allclose(gs["lmcFrameShiftY"], res.frame_shifts[:, 1], atol=1e-6)
    pt = blocks["particles"]
    assert list(pt.columns) == [
        "lmcParticleIndex",
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnMicrographFrameNumber",
        "lmcShiftRawX",
        "lmcShiftRawY",
        "lmcShiftSmoothX",
        "lmcShiftSmoothY",
    ]
    assert len(pt) == 15
    # particle-major: row 5 * p + f is particle p, frame f + 1
    row = pt.iloc[5 * 2 + 3]
    assert (row["lmcParticleIndex"], row["rlnMicrographFrameNumber"]) == (2, 4)
    assert row["lmcShiftSmoothX"] == pytest.approx(res.traj_smooth[2, 3, 0], abs=1e-6)
    assert row["lmcShiftRawY"] == pytest.approx(res.traj_raw[2, 3, 1], abs=1e-6)
    assert row["rlnCoordinateX"] == pytest.approx(res.x[2], abs=1e-3)


def test_round_trip(tmp_path: Path) -> None:
    res = _result(n=7, nf=40, seed=3)
    path = tmp_path / "m.star"
    write_trajectories(path, res)
    back = read_trajectories(path)
    np.testing.assert_allclose(back["frame_shifts"], res.frame_shifts, atol=1e-6)
    np.testing.assert_allclose(back["raw"], res.traj_raw, atol=1e-6)
    np.testing.assert_allclose(back["smooth"], res.traj_smooth, atol=1e-6)
    np.testing.assert_allclose(back["x"], res.x, atol=1e-3)
    np.testing.assert_allclose(back["y"], res.y, atol=1e-3)
    assert back["general"]["lmcNParticles"] == 7
    assert "rlnMicrographDoseRate" not in back["general"]  # not known, not invented


def test_no_particles_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "m.star"
    write_trajectories(path, _result(n=4, nf=6))
    empty = _result(n=0, nf=6)
    write_trajectories(path, empty)  # replaces the earlier file
    back = read_trajectories(path)
    assert back["raw"].shape == (0, 6, 2) and back["x"].shape == (0,)
    np.testing.assert_allclose(back["frame_shifts"], empty.frame_shifts, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.star"]  # no temp file left


def test_shape_mismatch_refused(tmp_path: Path) -> None:
    res = _result(n=3, nf=5)
    res.traj_smooth = res.traj_smooth[:, :4]
    with pytest.raises(ValueError, match=r"\(3, 5, 2\)"):
        write_trajectories(tmp_path / "m.star", res)
    assert not (tmp_path / "m.star").exists()


def test_incomplete_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "m.star"
    write_trajectories(path, _result(n=3, nf=5))
    lines = path.read_text().rstrip("\n").splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # drop the last (particle, frame) row
    with pytest.raises(TrajectoriesError) as info:
        read_trajectories(path)
    assert str(info.value).startswith(str(path))
