"""Full-frame motion at low signal (gpu/motion.py): simulated movies, pure noise, and the pieces of
the temporal prior and of the calibration, each checked against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest

from gpu import motion
from gpu.motion import (
    _BASIS_A,
    _BASIS_LINEAR,
    _BASIS_TAUS,
    _RESIDUAL_BURST_A,
    burst_basis,
    estimate_frame_shifts,
    prior_matrix,
    prior_precision,
    trajectory_prior,
    viterbi_path,
)
from streamer.sim.simulate import SimParams, render_movie


def path_length(s: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(s, axis=0), axis=1).sum())


def simulated(**kw: object) -> tuple[np.ndarray, np.ndarray]:
    """``(frames (F, h, w) float32, true full-frame shifts (F, 2) px)`` of one simulated movie.

    No gain pattern and no hot pixels: the pipeline corrects both before estimating motion.
    """
    params = SimParams(movies=1, gain_sigma=0.0, hot_pixels=0, **kw)  # type: ignore[arg-type]
    counts, truth = render_movie(params, 0)
    return counts.astype(np.float32), truth["frame_shifts"] / params.apix


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_weak_small_movie_keeps_a_physical_path(seed):
    # four 100 kDa particles on 384² px, 16 frames at 1 e/Å²: a few Å of signal per frame at best
    frames, true = simulated(frames=16, shape=(384, 384), mass_kda=100.0, particles=4, edge_particles=0, seed=seed)
    est = estimate_frame_shifts(frames, 1.0)
    assert 0.5 < path_length(est) / path_length(true) < 2.0
    assert np.abs(est).max() < 40.0  # no frame pushed out of the field


def test_weak_small_movie_without_the_prior_follows_the_noise():
    # the same estimator with the prior off (only the search bound left) is what the prior fixes
    frames, true = simulated(frames=16, shape=(384, 384), mass_kda=100.0, particles=4, edge_particles=0, seed=0)
    assert path_length(estimate_frame_shifts(frames, 1.0, smoothing=0.0)) > 10.0 * path_length(true)
    assert path_length(estimate_frame_shifts(frames, 1.0)) < 2.0 * path_length(true)


def test_strong_movie_per_frame_accuracy_and_reference_offset():
    frames, true = simulated(frames=24, shape=(640, 640), mass_kda=600.0, seed=0)

    def errors(est: np.ndarray) -> tuple[float, float]:
        err = est - true
        offset = err.mean(axis=0)  # a constant error = the reference frame's own error
        return float(np.sqrt(np.mean(np.sum((err - offset) ** 2, axis=1)))), float(np.hypot(*offset))

    rms, offset = errors(estimate_frame_shifts(frames, 1.0))
    assert rms < 0.4 and offset < 0.3, (rms, offset)
    rms_free, offset_free = errors(estimate_frame_shifts(frames, 1.0, smoothing=0.0))
    assert rms < 0.85 * rms_free and offset < offset_free


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_movie_stays_still(seed):
    frames = np.random.default_rng(seed).poisson(1.0, (16, 384, 384)).astype(np.float32)
    est = estimate_frame_shifts(frames, 1.0)
    assert np.sqrt(np.mean(np.sum(est**2, axis=1))) < 1.0
    assert path_length(est) < 2.0


def test_noise_variance_matches_the_correlation_maps_of_pure_noise():
    # σ_t² from the spectra (module doc) against the empirical variance of each whole c_t map
    n = 10
    frames = np.random.default_rng(5).poisson(1.0, (n, 512, 512)).astype(np.float32)
    movie = motion.bin_movie(frames, 1.0, 8.0)
    hc, wc = movie.shape
    wgt = motion.correlation_weights(movie, 500.0)
    power = (movie.spectra.real**2 + movie.spectra.imag**2) * wgt
    power_sq = np.sum(power.astype(np.float64) ** 2, axis=(1, 2))
    p = np.empty_like(movie.spectra)
    var = motion._cross_spectra(movie, np.zeros((n, 2)), wgt, power, power_sq, p)
    c = np.fft.irfft2(p, s=(hc, wc)) * (hc * wc)  # c_t(δ) at every integer δ
    np.testing.assert_allclose(c.reshape(n, -1).var(axis=1) / var, 1.0, atol=0.06)


@pytest.mark.parametrize("anchor", [None, 2])
def test_viterbi_path_is_the_exhaustive_maximum(anchor):
    rng = np.random.default_rng(7)
    n, wy, wx = 4, 5, 5
    loglik = rng.normal(0.0, 3.0, (n, wy, wx))
    offsets = rng.normal(0.0, 1.5, (n - 1, 2))
    precision = rng.uniform(0.1, 3.0, (n - 1, 2))
    path = viterbi_path(loglik, offsets, precision, anchor)
    # every one of the 25^4 paths, scored directly
    dx = np.tile(np.arange(wx) - wx // 2, wy)
    dy = np.repeat(np.arange(wy) - wy // 2, wx)
    total = np.zeros((wy * wx,) * n)
    for t in range(n):
        shape = [1] * n
        shape[t] = -1
        total = total + loglik[t].reshape(shape)
        if t + 1 < n:
            ox, oy = offsets[t]
            cost = 0.5 * precision[t, 0] * (ox + dx[None, :] - dx[:, None]) ** 2
            cost += 0.5 * precision[t, 1] * (oy + dy[None, :] - dy[:, None]) ** 2
            shape2 = [1] * n
            shape2[t], shape2[t + 1] = wy * wx, wy * wx
            total = total - cost.reshape(shape2)
    if anchor is not None:
        keep = np.zeros(wy * wx, bool)
        keep[(wy // 2) * wx + wx // 2] = True
        shape = [1] * n
        shape[anchor] = -1
        total = np.where(keep.reshape(shape), total, -np.inf)
    best = np.unravel_index(int(np.argmax(total)), total.shape)
    np.testing.assert_array_equal(path, np.stack([dx[list(best)], dy[list(best)]], axis=1))


def test_prior_is_independent_of_fractionation():
    # a smooth physical trajectory (Å vs e/Å²) costs the same sampled at 1 or 0.25 e/Å² per frame
    def trajectory(e: np.ndarray) -> np.ndarray:
        return np.stack([6.0 * (1 - np.exp(-e / 1.5)) + 0.3 * e, -2.0 * (1 - np.exp(-e / 1.5)) + 0.1 * e], axis=1)

    costs = []
    for dose, n in [(1.0, 30), (0.25, 120)]:
        s = trajectory(dose * (np.arange(n) + 0.5))
        p = prior_matrix(*trajectory_prior(n, dose), n)
        costs.append(float(np.einsum("ta,tu,ua->", s, p, s)))
    assert costs[1] == pytest.approx(costs[0], rel=0.05)
    # prior_matrix is the quadratic form of the differences
    v, a = trajectory_prior(6, 0.8, 2.0, smoothing=3.0)
    x = np.random.default_rng(1).normal(size=6)
    direct = np.sum(v * np.diff(x) ** 2) + np.sum(a * np.diff(x, 2) ** 2)
    assert x @ prior_matrix(v, a, 6) @ x == pytest.approx(direct)
    # the burst is free, late drift is not: early steps have far lower precision than late ones
    v, a = trajectory_prior(40)
    assert v[0] < 0.01 * v[-1] and a[0] < 0.01 * a[-1]


def test_bad_prior_arguments():
    frames = np.random.default_rng(0).poisson(1.0, (4, 64, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^estimate_frame_shifts: need dose_per_frame > 0"):
        estimate_frame_shifts(frames, 1.0, dose_per_frame=0.0)
    with pytest.raises(ValueError, match=r"^estimate_frame_shifts: need dose_per_frame > 0"):
        estimate_frame_shifts(frames, 1.0, smoothing=-1.0)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0, 6.0])
@pytest.mark.parametrize("dose", [1.0, 0.5])
def test_prior_follows_a_fast_start_to_the_first_and_last_frames(tau: float, dose: float) -> None:
    """MAP of the prior and independent Gaussian per-frame observations (0.5 Å per e/Å² of frame,
    weak data) of a noise-free fast start (20 Å, time constant τ = 1-6 e/Å², = 2.5-15 % of 40 e/Å²)
    plus drift: the prior's bias stays below 0.15 Å in every frame, the first and last included
    (a linear-Gaussian computation, independent of the image machinery). The previous prior's single
    exp(-e/2) burst term (σ_a,late 0.2) is biased by 1.7x more for a slow start."""
    n = int(40 / dose)
    e = dose * (np.arange(n) + 0.5)
    s = 20.0 * (1.0 - np.exp(-e / tau)) + 0.3 * e
    w = np.eye(n) * dose / 0.5**2

    def bias(p: np.ndarray) -> np.ndarray:
        return np.linalg.solve(p + w, w @ s) - s

    b = bias(prior_matrix(*trajectory_prior(n, dose), n))
    assert np.abs(b).max() < 0.15
    if tau == 6.0:
        boundary = dose * np.arange(1, n)
        old_v = 1.0 / (dose * (0.5 + 10.0 * np.exp(-boundary / 2.0)) ** 2)
        old_a = 1.0 / (dose**3 * (0.2 + 10.0 * np.exp(-e[1:-1] / 2.0)) ** 2)
        assert np.abs(bias(prior_matrix(old_v, old_a, n))).max() > 1.5 * np.abs(b).max()


def test_burst_basis_prior_is_the_precision_of_the_summed_covariance() -> None:
    """prior_precision = the inverse of P_r⁻¹ + B Bᵀ on zero-sum trajectories (the constant is free),
    computed independently by explicit inversion in an orthonormal zero-sum basis."""
    n, dose, pre = 12, 0.8, 1.0
    p = prior_precision(n, dose, pre, smoothing=2.0)
    p_r = prior_matrix(*trajectory_prior(n, dose, pre, 1.0, burst_amplitude=_RESIDUAL_BURST_A), n)
    b = burst_basis(n, dose, pre)
    q = np.linalg.qr(np.eye(n) - 1.0 / n)[0][:, : n - 1]  # orthonormal, orthogonal to the constant
    cov = np.linalg.inv(q.T @ p_r @ q) + q.T @ b @ b.T @ q
    np.testing.assert_allclose(p, 2.0 * q @ np.linalg.inv(cov) @ q.T, atol=1e-9 * np.abs(p).max())
    np.testing.assert_allclose(p @ np.ones(n), 0.0, atol=1e-9 * np.abs(p).max())
    # the basis: 1 - exp(-e/τ) and e at each frame's mid-exposure, scaled by the amplitudes' std
    e = pre + dose * (np.arange(n) + 0.5)
    np.testing.assert_allclose(b[:, 0], _BASIS_A * (1.0 - np.exp(-e / _BASIS_TAUS[0])))
    np.testing.assert_allclose(b[:, -1], _BASIS_LINEAR * e)
    assert np.array_equal(prior_precision(n, dose, pre, 2.0, basis=False), prior_matrix(*trajectory_prior(n, dose, pre, 2.0), n))


def _map_error(p: np.ndarray, s: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per-frame RMS error (bias and noise, zero-mean gauge) of the MAP of prior p and independent
    Gaussian observations of s with per-frame std sigma (Å): a linear-Gaussian computation."""
    n = len(s)
    w = np.diag(1.0 / sigma**2)
    a = np.linalg.inv(p + w)
    j = np.eye(n) - 1.0 / n
    bias = j @ (a @ w @ s - s)
    return np.sqrt(bias**2 + np.diag(j @ a @ w @ a @ j))


@pytest.mark.parametrize("dose", [1.0, 0.7])
def test_burst_basis_pools_a_fast_start_and_bounds_the_cost_elsewhere(dose: float) -> None:
    """Weak data (0.4 Å per frame, 1.2 Å in the blurred first frames). An exponential fast start
    (τ 2-6 e/Å², 5-20 Å, plus drift) is recovered with a smaller early-frame error than with the
    envelope prior alone (RMS over the first 6 frames < 0.85x, worst frame lower); a linear-only or
    square-root drift no worse. What the basis cannot represent is absorbed by the residual at a
    bounded cost: a ramp that stops at 5 e/Å², a 5 Å step after the first frame and a 20 Å burst with
    τ = 1 e/Å² stay within 1.25 per-frame noise std of the envelope prior's error in every frame (the
    price of pooling: measured 0.7-1.1)."""
    n = round(40 / dose)
    e = dose * (np.arange(n) + 0.5)
    sigma = 0.4 + 0.8 * np.exp(-e / 2.0)
    new, old = prior_precision(n, dose), prior_precision(n, dose, basis=False)
    for tau in (2.0, 4.0, 6.0):
        for amp in (5.0, 20.0):
            s = amp * (1.0 - np.exp(-e / tau)) + 0.15 * e
            en, eo = _map_error(new, s, sigma), _map_error(old, s, sigma)
            assert np.sqrt((en[:6] ** 2).mean()) < 0.85 * np.sqrt((eo[:6] ** 2).mean())
            assert en.max() < eo.max()
    for s in (0.3 * e, 4.0 * np.sqrt(e)):
        assert np.all(_map_error(new, s, sigma) < _map_error(old, s, sigma) + 0.01)
    for s in (2.0 * np.minimum(e, 5.0), 5.0 * (e > dose), 20.0 * (1.0 - np.exp(-e))):
        en, eo = _map_error(new, s, sigma), _map_error(old, s, sigma)
        assert np.all(en < eo + 1.25 * sigma)
