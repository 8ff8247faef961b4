"""``lmc demo``: the truth score, and the fast demo end to end through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu.quality import band_frc, image_ring_sums
from streamer.config import ConfigError
from streamer.sim.demo import _prepare_dir, truth_references
from streamer.sim.simulate import SimParams, load_truth, simulate_session, truth_particles

ROOT = Path(__file__).resolve().parents[1]


def _frc_full_plane(a: np.ndarray, b: np.ndarray, apix: float, band: tuple[float, float]) -> float:
    """Independent FRC: full complex FFT, rings by radius, pooled over images, band-averaged."""
    n = a.shape[-1]
    fa = np.fft.fft2(a.astype(np.float64))
    fb = np.fft.fft2(b.astype(np.float64))
    ky, kx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")
    ring = np.rint(np.hypot(ky, kx) * n).astype(int)
    vals = []
    for r in range(1, n // 2 + 2):
        res = n * apix / r
        if not (band[1] <= res <= band[0]):
            continue
        m = ring == r
        num = (fa[:, m] * fb[:, m].conj()).real.sum()
        den = np.sqrt((np.abs(fa[:, m]) ** 2).sum() * (np.abs(fb[:, m]) ** 2).sum())
        vals.append(num / den)
    return float(np.mean(vals))


def test_pooled_frc_of_images_matches_a_full_plane_computation() -> None:
    rng = np.random.default_rng(3)
    signal = rng.standard_normal((20, 64, 64)).astype(np.float32)
    noisy = signal + 2.0 * rng.standard_normal(signal.shape).astype(np.float32)
    band = (60.0, 5.0)
    ours = band_frc(image_ring_sums(noisy, signal, 1.5, band))
    assert ours == pytest.approx(_frc_full_plane(noisy, signal, 1.5, band), abs=1e-5)
    # white signal + white noise of 4x the variance: FRC = sqrt(1/5) in every ring
    assert ours == pytest.approx(np.sqrt(1 / 5), abs=0.03)
    assert band_frc(image_ring_sums(signal, signal, 1.5, band)) == pytest.approx(1.0, abs=1e-6)
    assert band_frc(image_ring_sums(-signal, signal, 1.5, band)) == pytest.approx(-1.0, abs=1e-6)


def _numpy_shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Content moved by (+dx, +dy) px with a full complex FFT (independent of gpu.shift)."""
    n = img.shape[-1]
    ky, kx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")
    return np.fft.ifft2(np.fft.fft2(img) * np.exp(-2j * np.pi * (kx * dx + ky * dy))).real


def test_truth_references_follow_the_pick_offset(tmp_path: Path) -> None:
    params = SimParams(movies=1, frames=2, shape=(256, 256), particles=3, edge_particles=0, junk_picks=1,
                       mass_kda=60.0, pick_jitter_A=2.0, seed=2)
    simulate_session(tmp_path, params)
    stem = "FoilHole_1_Data_1_fractions"
    truth = load_truth(tmp_path, stem)
    picks, pos = truth["picks"], truth["positions"]
    box = 64
    refs, keep = truth_references(tmp_path, stem, picks[:, 0], picks[:, 1], box, 1.0, 1.0)
    assert keep.tolist() == [True, True, True, False]  # the junk pick has no particle
    centred = truth_particles(tmp_path, stem, box, 1.0, ids=truth["pick_particle"][:3])
    scale = np.abs(centred).max()
    for i in range(3):
        dx, dy = pos[i] - picks[i]  # the particle sits off the box centre by (true - pick)
        assert np.hypot(dx, dy) > 0.3
        np.testing.assert_allclose(refs[i], _numpy_shift(centred[i], dx, dy), atol=0.02 * scale)
        assert np.abs(refs[i] - _numpy_shift(centred[i], -dx, -dy)).max() > 0.05 * scale
    # a pick that matches no pick file entry is left out
    _, keep = truth_references(tmp_path, stem, np.array([5.0]), np.array([5.0]), box, 1.0, 1.0)
    assert keep.tolist() == [False]


def test_demo_refuses_a_folder_with_a_previous_demo(tmp_path: Path) -> None:
    (tmp_path / "scope" / "movies").mkdir(parents=True)
    with pytest.raises(ConfigError, match=str(tmp_path)):
        _prepare_dir(str(tmp_path))
    assert _prepare_dir(str(tmp_path / "new")) == (tmp_path / "new").resolve()


@pytest.mark.slow
def test_fast_demo_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([sys.executable, "-m", "streamer.cli", "demo", str(tmp_path / "d"), "--fast", "--movies", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    text = proc.stdout
    assert proc.returncode == 0, text + proc.stderr
    out = tmp_path / "d" / "lmc"
    # the movies arrived over time: the emulator's log lines come before the end
    assert text.count("[scope] movie ") == 2 and text.count("[scope] picks ") == 2
    assert "2 done, 0 failed" in text
    status = json.loads((out / "status.json").read_text())
    assert status["counts"]["done"] == 2 and status["phase"] == "finished"
    n_written = status["particles"]
    assert n_written > 0 and f"particles  {n_written} in" in text
    assert list((out / "stacks").glob("*.mrcs")) and (out / "particles.star").is_file()
    assert len(list((out / "plots").glob("*.png"))) == 2
    quality = json.loads((out / "demo_quality.json").read_text())
    assert 0 < quality["particles"] <= n_written
    assert -1 < quality["frc_fullframe"] < 1 and -1 < quality["frc_local"] < 1
    assert quality["frc_local"] > 0.02  # the written particles do correlate with the truth
    assert quality["gain"] == pytest.approx(quality["frc_local"] - quality["frc_fullframe"], abs=2e-4)
    assert f"{quality['frc_local']:.4f}" in text and "quality against the simulation's ground truth" in text
