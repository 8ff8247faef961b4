"""plots/<movie>.png: size, where the red (smoothed) trajectories land, orientation, speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from streamer.formats.plot import TITLE_PX, plot_size, plot_trajectories
from streamer.types import MovieResult


def _result(x, y, smooth, apix: float = 1.0, shape=(2400, 3200)) -> MovieResult:
    x, y, smooth = np.asarray(x, float), np.asarray(y, float), np.asarray(smooth, float)
    n, nf = smooth.shape[:2]
    return MovieResult(
        movie="/data/raw/FoilHole_1_Data_2_fractions.tiff",
        particles=np.zeros((n, 8, 8), np.float32),
        x=x,
        y=y,
        columns={},
        skipped=[],
        frame_shifts=np.zeros((nf, 2)),
        traj_raw=smooth + 0.05,
        traj_smooth=smooth,
        micrograph_shape=shape,
        apix=apix,
        stats={"motion_total_A": 10.0, "local_mean_A": 1.0, "quality_gain": 0.01},
    )


def _red(img: np.ndarray) -> np.ndarray:
    return (img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)


def test_png_size_and_red_trajectory_position(tmp_path: Path) -> None:
    nf = 20
    ramp = np.linspace(0, 1, nf)
    smooth = np.zeros((2, nf, 2))
    smooth[0, :, 0] = 3.0 * ramp  # particle 0 drifts +3 Å in x: 3 / (1 Å/px * 8) * 40 = 15 binned px right
    smooth[1, :, 1] = 3.0 * ramp  # particle 1 drifts +3 Å in y: 15 binned px down (rows grow downwards)
    res = _result([1600.0, 800.0], [1200.0, 600.0], smooth)
    mic = np.random.default_rng(0).uniform(0, 1, (300, 400)).astype(np.float32)  # movie binned by 8
    path = tmp_path / "plots" / "FoilHole_1_Data_2.png"
    plot_trajectories(path, mic, 8.0, res, scale=40.0, width_px=800)

    img = imread(path)
    assert img.shape[:2] == plot_size((300, 400), 800) == (600 + TITLE_PX, 800)
    red = _red(img)

    def px(xb: float, yb: float) -> tuple[int, int]:  # binned micrograph pixel -> PNG (row, col)
        return int(TITLE_PX + (yb + 0.5) * 2), int((xb + 0.5) * 2)

    r, c = px(200 + 7.5, 150)  # middle of particle 0's red line
    assert red[r - 3 : r + 4, c - 3 : c + 4].any()
    r, c = px(200 - 7.5, 150)  # not to the left of its start
    assert not red[r - 3 : r + 4, c - 3 : c + 4].any()
    r, c = px(100, 75 + 7.5)  # particle 1 goes down the image
    assert red[r - 3 : r + 4, c - 3 : c + 4].any()
    r, c = px(100, 75 - 7.5)
    assert not red[r - 3 : r + 4, c - 3 : c + 4].any()
    # red only near the two particles
    rows, cols = np.nonzero(red)
    near0 = (np.abs(rows - px(207, 150)[0]) < 12) & (np.abs(cols - px(207, 150)[1]) < 24)
    near1 = (np.abs(rows - px(100, 82)[0]) < 24) & (np.abs(cols - px(100, 82)[1]) < 12)
    assert rows.size > 20 and np.all(near0 | near1)
    assert not (tmp_path / "plots" / f".{path.name}.tmp").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_no_particles_still_plots(tmp_path: Path) -> None:
    res = _result(np.zeros(0), np.zeros(0), np.zeros((0, 5, 2)))
    path = tmp_path / "m.png"
    plot_trajectories(path, np.ones((120, 160), np.float32), 20.0, res, width_px=320)
    img = imread(path)
    assert img.shape[:2] == (240 + TITLE_PX, 320)
    assert not _red(img).any()


def test_fast_for_500_particles_40_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n, nf = 500, 40
    smooth = np.cumsum(rng.normal(0, 0.1, (n, nf, 2)), axis=1)
    res = _result(rng.uniform(0, 4096, n), rng.uniform(0, 4096, n), smooth, shape=(4096, 4096))
    mic = rng.normal(size=(512, 512)).astype(np.float32)
    plot_trajectories(tmp_path / "warm.png", mic, 8.0, res)  # first call pays font loading
    t0 = time.perf_counter()
    plot_trajectories(tmp_path / "m.png", mic, 8.0, res)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"{elapsed:.2f} s"  # ~0.4 s on one free core; margin for a shared machine
    assert _red(imread(tmp_path / "m.png")).sum() > 1000


def test_full_frame_motion_is_removed_before_drawing(tmp_path: Path) -> None:
    # 30 Å of full-frame drift shared by all particles and no local motion: at 40x it would draw
    # 150 binned px lines; relative to the full-frame motion nothing moves
    nf = 20
    drift = np.zeros((nf, 2))
    drift[:, 0] = np.linspace(-15, 15, nf)
    smooth = np.repeat(drift[None], 2, axis=0)
    res = _result([1600.0, 800.0], [1200.0, 600.0], smooth)
    res.frame_shifts = drift
    mic = np.zeros((300, 400), np.float32)
    path = tmp_path / "p.png"
    plot_trajectories(path, mic, 8.0, res, scale=40.0, width_px=800)
    rows, cols = np.nonzero(_red(imread(path)))
    # nothing red further than a few px from the two pick positions (PNG = 2x the binned grid)
    starts = np.array([[TITLE_PX + 2 * 150.5, 2 * 200.5], [TITLE_PX + 2 * 75.5, 2 * 100.5]])
    dist = np.min(np.hypot(rows[:, None] - starts[None, :, 0], cols[:, None] - starts[None, :, 1]), axis=1)
    assert dist.size == 0 or dist.max() < 8
