"""The hard simulated sessions (issue 10: at least as hard as the held-out ones): streamer.sim.simulate.hard_params,
the "modes" motion model and plain ice (streamer/sim/motion.py, specimen.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamer.sim import motion as sim_motion
from streamer.sim import specimen as sim_specimen
from streamer.sim.simulate import _geometry, hard_params, render_movie


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_burst_drift_fast_start_then_linear_within_60_degrees() -> None:
    for seed in range(8):
        s = sim_motion.burst_drift_trajectory(40, 1.0, 20.0, 20, np.random.default_rng(seed))
        steps = np.linalg.norm(np.diff(s, axis=0), axis=1)
        assert steps.sum() == pytest.approx(20.0) and np.allclose(s[20], 0.0)
        # 60-85 % is an exponential start with tau <= 15 % of the exposure: over half of the path by 30 %
        assert steps[:12].sum() > 0.5 * steps.sum()
        assert steps[-10:].min() > 0  # the linear part goes on
        assert _angle(s[3] - s[0], s[-1] - s[-6]) <= 62.0


def test_mode_field_zero_mean_scaled_and_each_component_with_its_own_start() -> None:
    shape, apix = (2048, 2048), 1.0
    field = sim_motion.mode_field(shape, apix, 40, 1.0, 4.0, 20, np.random.default_rng(2))
    gy, gx = np.meshgrid(np.linspace(0, 2047, 64), np.linspace(0, 2047, 64), indexing="ij")
    disp = field.at(gx, gy)
    net = disp[..., -1, :] - disp[..., 0, :]
    assert np.sqrt((net**2).sum(-1).mean()) == pytest.approx(4.0, rel=0.02)
    assert np.abs(disp.mean(axis=(0, 1))).max() < 0.03 * np.abs(disp).max()  # zero mean over the field
    np.testing.assert_allclose(disp[..., 20, :], 0.0, atol=1e-12)
    assert field.profile.shape == (6, 40) and len({round(float(p[2] - p[0]), 6) for p in field.profile}) == 6
    speed = np.linalg.norm(np.diff(disp, axis=-2), axis=-1).mean(axis=(0, 1))
    assert speed[:5].mean() > 2 * speed[-5:].mean()  # fast start
    grid = field.grids(gx[0, :5], gy[:5, 0])
    np.testing.assert_allclose(np.moveaxis(grid, 1, -1), field.components(gx[:5, :5], gy[:5, :5]), atol=1e-5)


def test_hard_sessions_have_the_issue_ranges() -> None:
    for seed in range(4):
        p = hard_params(seed=seed, movies=1)
        assert p.shape == (2048, 2048) and p.particles == 60 and p.gain_sigma == 0.03 and p.astigmatism_A == 400
        geo = _geometry(p, 0)
        path = np.linalg.norm(np.diff(geo["frame_shifts"], axis=0), axis=1).sum()
        assert 5.0 <= path <= 30.0
        gy, gx = np.meshgrid(np.linspace(0, 2047, 48), np.linspace(0, 2047, 48), indexing="ij")
        disp = geo["_field"].at(gx, gy)
        rms = np.sqrt(((disp[..., -1, :] - disp[..., 0, :]) ** 2).sum(-1).mean())
        assert 2.5 * 0.97 <= rms <= 5.0 * 1.03
        r = geo["residual"]
        assert 0.3 - 1e-9 <= np.sqrt(((r[:, -1] - r[:, 0]) ** 2).sum(-1).mean()) <= 1.0 + 1e-9
        assert np.allclose(geo["trajectories"], geo["frame_shifts"][None] + geo["local"] + r)
        assert geo["pick_is_junk"].sum() == 3
        du = geo["micrograph_defocus"]
        assert 0.8e4 - 200 <= (du[0] + du[1]) / 2 <= 2.5e4 + 200 and abs(du[0] - du[1]) <= 400


def test_plain_ice_correlation_length() -> None:
    apix, corr = 5.0, 300.0
    ice = sim_specimen.ice_field((2048, 2048), apix, corr, np.random.default_rng(0))
    assert ice.std() == pytest.approx(1.0, rel=1e-3)
    f = np.fft.rfft2(ice)
    acf = np.fft.irfft2(np.abs(f) ** 2, s=ice.shape) / ice.size
    lag = int(corr / apix)
    # exponential covariance: exp(-1) at one correlation length (on a periodic 10 kÅ field)
    at_lag = (acf[0, lag] + acf[lag, 0]) / 2 / acf[0, 0]
    assert at_lag == pytest.approx(np.exp(-1), abs=0.08)
    assert (acf[0, 2] + acf[2, 0]) / 2 / acf[0, 0] > 0.9


def test_hard_movie_renders_and_the_cli_writes_it(tmp_path: Path) -> None:
    counts, _truth = render_movie(hard_params(shape=(256, 256), particles=3, junk_picks=1, frames=4, movies=1), 0)
    assert counts.shape == (4, 256, 256) and abs(counts.mean() - 1.0) < 0.1
    res = subprocess.run([sys.executable, "-m", "streamer.cli", "simulate", str(tmp_path / "s"), "--hard", "--movies", "1",
                          "--frames", "4", "--shape", "256", "256", "--particles", "3"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "s" / "session.json").read_text())
    assert info["params"]["motion_model"] == "modes" and info["params"]["texture_corr_A"] == 300.0
    assert len(list((tmp_path / "s" / "movies").iterdir())) == 1
