"""One simulated movie through the whole engine with full-frame motion only (issue: the batch engine).

Checks against the simulation's ground truth:
* every pick becomes exactly one particle or is reported as skipped with a reason;
* the estimated full-frame trajectory matches the true one;
* the particles correlate with the noise-free truth clearly better than an uncorrected sum, and
  about as well as extraction along the TRUE full-frame motion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu.extract import extract_particles
from gpu.gain import apply_gain
from streamer.config import from_dict
from streamer.formats.movies import read_movie
from streamer.formats.picks import movie_stem
from streamer.pipeline import load_gain, process_movie
from streamer.sim.simulate import SimParams, load_truth, simulate_session, truth_particles

BOX = 128


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    params = SimParams(
        movies=1, frames=24, shape=(640, 640), particles=10, seed=7, mass_kda=600.0, drift_A=(25.0, 30.0), local_A=0.0,
        particle_A=0.0, junk_picks=1, edge_particles=2,
    )
    simulate_session(root, params)
    return root


def _cfg(session: Path, out: Path, **extra: object) -> object:
    data = {
        "out": str(out),
        "box": BOX,
        "device": "cpu",
        "apix": 1.0,
        "dose_per_frame": 1.0,
        "gain": {"file": str(session / "gain.mrc")},
        "picks": {"dir": str(session / "picks")},
        "local": {"enabled": False},
    }
    data.update(extra)
    return from_dict(data)


def _best_cc(a: np.ndarray, b: np.ndarray, max_shift: int = 6) -> np.ndarray:
    """(n,) peak normalised cross-correlation of a[i] with b[i] over shifts up to ``max_shift`` px,
    low-pass filtered to 7 Å (the same procedure for every method)."""
    n, h, w = a.shape
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.fftfreq(w)[None, :]
    lp = (np.sqrt(kx**2 + ky**2) < 1 / 7.0).astype(float)
    lp[0, 0] = 0.0
    fa = np.fft.fft2(a) * lp
    fb = np.fft.fft2(b) * lp
    cc = np.fft.ifft2(fa * np.conj(fb)).real
    norm = np.sqrt((np.abs(fa) ** 2).sum((-2, -1)) * (np.abs(fb) ** 2).sum((-2, -1))) / (h * w)
    cc = np.roll(cc, (max_shift, max_shift), axis=(-2, -1))[:, : 2 * max_shift + 1, : 2 * max_shift + 1]
    return cc.reshape(n, -1).max(axis=1) / norm


def test_full_frame_pipeline_against_truth(session: Path, tmp_path: Path) -> None:
    movie = next((session / "movies").iterdir())
    cfg = _cfg(session, tmp_path / "out")
    result = process_movie(cfg, str(movie))
    truth = load_truth(session, movie.name)

    # every pick: one particle or a reported skip
    n_picks = len(truth["picks"])
    assert result.n + len(result.skipped) == n_picks
    assert all(reason for _, _, reason in result.skipped)
    assert result.stats["n_picks"] == n_picks

    # full-frame trajectory (Å), both referenced to the central frame
    err = result.frame_shifts - truth["frame_shifts"]
    err -= err.mean(axis=0)  # a constant offset only re-centres every particle alike
    assert np.sqrt((err**2).sum(-1).mean()) < 1.0, err
    assert result.stats["motion_total_A"] > 20

    # sidecar outputs
    stem = movie_stem(movie)
    assert (tmp_path / "out" / "trajectories" / f"{stem}.star").exists()
    assert (tmp_path / "out" / "plots" / f"{stem}.png").exists()

    # map written particles back to true particles through their pick coordinates
    picks = truth["picks"]
    idx = [int(np.argmin(np.hypot(picks[:, 0] - x, picks[:, 1] - y))) for x, y in zip(result.x, result.y, strict=True)]
    pid = truth["pick_particle"][idx]
    real = pid >= 0
    assert real.sum() >= 5
    ref = truth_particles(session, movie.name, BOX, 1.0, ids=pid[real])

    # uncorrected and true-motion extractions of the same picks from the same gain-corrected frames
    mov = read_movie(str(movie))
    frames = apply_gain(mov.frames, load_gain(cfg, mov.frames.shape[1:]))
    pos = np.stack([result.x, result.y], -1)
    dose = {"dose_per_frame": 1.0, "pre_exposure": 0.0, "kv": 300.0}
    zero = np.zeros_like(truth["frame_shifts"])
    raw, _, _ = extract_particles(frames, pos, zero, box=BOX, out_box=BOX, apix=1.0, dose=dose, edge="pad")
    true, _, _ = extract_particles(frames, pos, truth["frame_shifts"], box=BOX, out_box=BOX, apix=1.0, dose=dose, edge="pad")

    cc_est = _best_cc(result.particles[real], ref).mean()
    cc_raw = _best_cc(raw[real], ref).mean()
    cc_true = _best_cc(true[real], ref).mean()
    assert cc_est > cc_raw + 0.5 * (cc_true - cc_raw), (cc_raw, cc_est, cc_true)
    assert cc_est > 0.95 * cc_true, (cc_raw, cc_est, cc_true)


def test_float16_fcrop_and_no_dose_weighting(session: Path, tmp_path: Path) -> None:
    movie = next((session / "movies").iterdir())
    cfg = _cfg(session, tmp_path / "out", fcrop_box=64, dose_weighting=False, invert_contrast=True)
    result = process_movie(cfg, str(movie), write_sidecars=False)
    assert result.particles.shape[1:] == (64, 64)
    # normalised background: zero mean, unit std outside the circle
    yy, xx = np.mgrid[:64, :64]
    outside = np.hypot(xx - 32, yy - 32) > 0.75 * 32
    bg = result.particles[:, outside]
    assert np.allclose(bg.mean(1), 0, atol=1e-4) and np.allclose(bg.std(1), 1, atol=1e-3)
