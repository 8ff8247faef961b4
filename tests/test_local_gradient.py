"""Per-particle alignment: the likelihood, its analytic gradient and the trajectory model.

Checked against independent computations: finite differences (float64 path), explicitly
Fourier-shifted patches (gpu.shift), and the kernel matrix itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu.backend import rfft2
from gpu.dose import dose_weights
from gpu.local import (
    TrajectoryModel,
    common_uncertainty,
    objective,
    overlap_weights,
    scaled_prior_evidence,
    spatial_basis,
)
from gpu.local_model import BandSpectra, data_term, per_particle_term, prepare_spectra, soft_mask
from gpu.motion import FrameMotion, prior_precision
from gpu.shift import fourier_shift


def random_spectra(rng: np.random.Generator, p: int = 3, f: int = 5, n: int = 4, box: int = 32) -> BandSpectra:
    shape = (p, f, 2 * n + 1, n + 1)
    x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    return BandSpectra(
        x=x.astype(np.complex128),
        kx=np.arange(n + 1) / box,
        ky=np.arange(-n, n + 1) / box,
        weight=rng.random((2 * n + 1, n + 1)),
        shell=np.zeros((2 * n + 1, n + 1), dtype=np.int64),
        band=np.ones((2 * n + 1, n + 1), dtype=bool),
        frames=np.arange(f),
        n_frames=f,
        box=box,
        apix=1.0,
    )


def test_data_term_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    spec = random_spectra(rng)
    d = rng.normal(0, 1.5, (3, 5, 2))
    _, grad = data_term(spec, d)
    h = 1e-6
    fd = np.zeros_like(d)
    for idx in np.ndindex(d.shape):
        dp, dm = d.copy(), d.copy()
        dp[idx] += h
        dm[idx] -= h
        fd[idx] = (data_term(spec, dp, gradient=False)[0] - data_term(spec, dm, gradient=False)[0]) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
    # the per-particle terms add up to the total
    assert per_particle_term(spec, d).sum() == pytest.approx(data_term(spec, d, gradient=False)[0], rel=1e-10)


def _patches(rng: np.random.Generator, d: np.ndarray, r: np.ndarray, box: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random blob whose content sits at +(r + d) in each frame (gpu.shift convention).

    Compact (Gaussian envelope) so that it stays inside the flat part of the alignment mask."""
    img = rng.standard_normal((box, box))
    k2 = np.fft.fftfreq(box)[:, None] ** 2 + np.fft.rfftfreq(box)[None, :] ** 2
    img = np.fft.irfft2(np.fft.rfft2(img) * np.exp(-k2 / (2 * 0.06**2)), s=(box, box))
    yy, xx = np.mgrid[0:box, 0:box] - box // 2
    img *= np.exp(-(xx**2 + yy**2) / (2 * (box / 9) ** 2))
    p, f = d.shape[:2]
    stack = np.broadcast_to(img, (p, f, box, box)).astype(np.float32)
    return fourier_shift(stack, (r + d).astype(np.float32)).astype(np.float64), img


def test_data_term_matches_explicitly_shifted_patches() -> None:
    """Value = Σ_p Σ_k w (|Σ_t G|² - Σ_t|G|²) with G from patches shifted by -(r + d) in real space."""
    rng = np.random.default_rng(2)
    p, f, box, apix = 2, 6, 48, 2.0
    d_true = rng.normal(0, 1.0, (p, f, 2))
    r = rng.uniform(-0.5, 0.5, (p, f, 2))
    patches, _ = _patches(rng, d_true, r, box)
    spec = prepare_spectra(patches, r, apix, dose_per_frame=2.0, band_low=200.0, band_high=8.0, dtype=np.complex128)
    d = rng.normal(0, 0.7, (p, f, 2))
    value, _ = data_term(spec, d)

    mask = soft_mask(box).astype(np.float64)
    masked = patches * mask
    masked -= (patches * mask).sum(axis=(-2, -1), keepdims=True) / mask.sum() * mask
    shifted = fourier_shift(masked.astype(np.float32), (-(r + d)).astype(np.float32)).astype(np.float64)
    full = np.asarray(rfft2(shifted))
    n = spec.x.shape[-1] - 1
    rows = np.r_[box - n : box, 0 : n + 1]
    g = full[..., rows, : n + 1]
    k = np.hypot(*np.meshgrid(np.arange(-n, n + 1), np.arange(0, n + 1), indexing="ij")) / (box * apix)
    g = g * dose_weights(k, f, 2.0, normalize=False)[None].astype(np.float64)
    a = g.sum(axis=1)
    direct = float(((np.abs(a) ** 2 - (np.abs(g) ** 2).sum(axis=1)) * spec.weight).sum())
    # float32 real-space shifts limit the agreement
    assert value == pytest.approx(direct, rel=2e-4)


def test_likelihood_is_maximal_at_the_true_shifts() -> None:
    """Sign convention: patches whose content moved by +d are best aligned at d (gradient ~ 0 there)."""
    rng = np.random.default_rng(3)
    p, f = 2, 6
    d_true = rng.normal(0, 1.0, (p, f, 2))
    d_true -= d_true.mean(axis=1, keepdims=True)
    r = rng.uniform(-0.5, 0.5, (p, f, 2))
    patches, _ = _patches(rng, d_true, r)
    spec = prepare_spectra(patches, r, 1.0, dose_per_frame=1.0, band_low=200.0, band_high=6.0, dtype=np.complex128)
    spec.weight = spec.band.astype(np.float64)  # noise-free: no SNR estimate to make
    v_true, g_true = data_term(spec, d_true)
    for delta in (0.3, -0.3):
        moved = d_true.copy()
        moved[0, 2, 0] += delta
        assert data_term(spec, moved, gradient=False)[0] < v_true
    v_opposite = data_term(spec, -d_true, gradient=False)[0]
    assert v_opposite < v_true
    _, g_zero = data_term(spec, np.zeros_like(d_true))
    assert np.abs(g_true).max() < 2e-3 * np.abs(g_zero).max()


def model_for(rng: np.random.Generator, p: int = 5, f: int = 7, residual: bool = True, common: bool = False,
              field_basis: bool = False) -> TrajectoryModel:
    pos = rng.uniform(0, 1000, (p, 2))
    psi = spatial_basis(pos, 1.0, 800.0, "gaussian", centred=common)
    motion = _posterior(rng, f) if common else None
    # the field modes' time-course prior of gpu.local.estimate_local (field_scale 0.15, 1.3 Å/px)
    field_prior = prior_precision(f, 0.8, 1.0, 1.0 / 0.15**2) * 1.3**2 if field_basis else None
    return TrajectoryModel(psi, f, 1.3, 0.8, 1.5, 0.2, 0.7, residual=residual, burst_exposure=2.5, pre_exposure=1.0,
                           common=motion, background_share=0.4, field_prior=field_prior)


def _posterior(rng: np.random.Generator, f: int) -> FrameMotion:
    """A full-frame posterior with a random trajectory, the physical prior (dense: the burst basis
    integrated out, gpu.motion.prior_precision) and random SPD curvatures."""
    a = rng.standard_normal((f, 2, 2))
    return FrameMotion(rng.normal(0, 3.0, (f, 2)), prior_precision(f, 0.8, 1.0) * 1.3**2,
                       np.einsum("tij,tkj->tik", a, a), (512, 512))


def test_model_adjoint_is_the_transpose() -> None:
    """<adjoint(g), z> == <g, d(z)> for the linear map z -> d."""
    rng = np.random.default_rng(4)
    for residual, common, basis in ((True, False, False), (False, False, False), (True, True, False), (True, True, True)):
        m = model_for(rng, residual=residual, common=common, field_basis=basis)
        z = rng.standard_normal(m.size)
        g = rng.standard_normal((m.P, m.F, 2))
        assert float(m.adjoint(g) @ z) == pytest.approx(float((g * m.trajectories(z)).sum()), rel=1e-10)
        d = m.trajectories(z)
        np.testing.assert_allclose(d.mean(axis=1), 0.0, atol=1e-12)  # zero-mean gauge


@pytest.mark.parametrize(("common", "field_basis"), [(False, False), (True, False), (True, True)])
def test_prior_and_objective_gradients_match_finite_differences(common: bool, field_basis: bool) -> None:
    rng = np.random.default_rng(5)
    m = model_for(rng, p=3, f=5, common=common, field_basis=field_basis)
    z = rng.standard_normal(m.size)
    _, grad = m.prior(z)
    spec = random_spectra(rng, p=3, f=5)
    _, jgrad = objective(spec, m, z)
    h = 1e-6
    idx = rng.choice(m.size - m.nc, 12, replace=False)
    if common:  # every common increment too
        idx = np.concatenate([idx, np.arange(m.size - m.nc, m.size)])
    for i in idx:
        zp, zm = z.copy(), z.copy()
        zp[i] += h
        zm[i] -= h
        # the prior is quadratic: central differences are exact for any step, so a large one
        # keeps the round-off of its (large, dense) value out
        zp2, zm2 = z.copy(), z.copy()
        zp2[i] += 1e-2
        zm2[i] -= 1e-2
        assert grad[i] == pytest.approx((m.prior(zp2)[0] - m.prior(zm2)[0]) / 2e-2, rel=1e-7, abs=1e-8)
        fd = (objective(spec, m, zp)[0] - objective(spec, m, zm)[0]) / (2 * h)
        assert jgrad[i] == pytest.approx(fd, rel=1e-5, abs=1e-6 * max(1.0, np.abs(jgrad).max()))


def test_field_basis_prior_is_the_stated_quadratic_form() -> None:
    """With ``field_prior``, the field part of the prior is ½ Σ_m,axis f_mᵀ Π_f f_m over the modes' zero-mean
    time courses f (px), written out here from cumulative sums, plus the residual's whitened ½|z_e|²
    and its acceleration term; and the preconditioner is positive definite."""
    rng = np.random.default_rng(12)
    m = model_for(rng, p=4, f=6, field_basis=True)
    z = rng.standard_normal(m.size)
    zf, ze, _ = m.split(z)
    f = np.concatenate([np.zeros((m.R, 1, 2)), np.cumsum(zf, axis=1)], axis=1)
    f -= f.mean(axis=1, keepdims=True)
    expected = 0.5 * sum(float(f[r, :, k] @ m.pi_f @ f[r, :, k]) for r in range(m.R) for k in range(2))
    expected += 0.5 * float((ze**2).sum()) + 0.5 * m.rho_e**2 * float((np.diff(ze, axis=1) ** 2).sum())
    assert m.prior(z)[0] == pytest.approx(expected, rel=1e-10)
    pc = m.preconditioner(rng.uniform(0.0, 2.0, (m.P, m.F)))
    assert pc.shape == (m.R + m.P, m.F - 1, 2)
    y = rng.standard_normal(m.size)
    np.testing.assert_allclose(pc.to_y(pc.to_z(y)), y, rtol=1e-8, atol=1e-8)


def test_prior_scales_follow_physical_units() -> None:
    """Velocity std σ Å/(e/Å²) at dose D e/Å²/frame and apix Å/px -> σ D / apix px per frame."""
    psi = np.ones((1, 1))
    m = TrajectoryModel(psi, 4, apix=0.5, dose_per_frame=2.0, sigma_field=1.0, sigma_velocity=0.25, sigma_acceleration=1.0)
    assert m.s_e == pytest.approx(0.25 * 2.0 / 0.5)
    np.testing.assert_allclose(m.s_f, 1.0 * 2.0 / 0.5)
    burst = TrajectoryModel(psi, 4, 1.0, 1.0, 1.0, 0.2, 1.0, burst_exposure=2.0)
    np.testing.assert_allclose(burst.s_f[:, 0], 2.0 / (np.array([1.0, 2.0, 3.0]) + 2.0))


@pytest.mark.parametrize("kernel", ["gaussian", "exponential"])
def test_spatial_basis_reproduces_the_kernel(kernel: str) -> None:
    rng = np.random.default_rng(6)
    pos = rng.uniform(0, 3000, (40, 2))
    psi = spatial_basis(pos, 1.2, 1500.0, kernel, rel_tol=1e-9)
    r = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1)) * 1.2 / 1500.0
    k = np.exp(-0.5 * r**2) if kernel == "gaussian" else np.exp(-r)
    np.testing.assert_allclose(psi @ psi.T, k, atol=1e-6)
    # the default truncation keeps far fewer modes for the smooth kernel
    assert spatial_basis(pos, 1.2, 1500.0, "gaussian").shape[1] < 20
    # centred: the basis of J K J (J = I - 11ᵀ/P), every mode summing to zero over the particles
    psi_c = spatial_basis(pos, 1.2, 1500.0, kernel, centred=True, rel_tol=1e-9)
    j = np.eye(len(pos)) - 1.0 / len(pos)
    np.testing.assert_allclose(psi_c @ psi_c.T, j @ k @ j, atol=1e-5)
    np.testing.assert_allclose(psi_c.sum(axis=0), 0.0, atol=1e-8)


def test_common_prior_is_the_stated_quadratic_form() -> None:
    """The common term's prior: ½ (s + c)ᵀ P (s + c) − β [(P s)ᵀ c − ½ cᵀ L c] (gpu/local.py), L from
    the curvatures by the rank-one pair couplings (gpu/motion.py), written out independently."""
    rng = np.random.default_rng(9)
    f = 6
    m = model_for(rng, p=4, f=f, common=True)
    pos_rng = np.random.default_rng(9)  # the same posterior as model_for's, rebuilt
    pos_rng.uniform(0, 1000, (4, 2))
    fm = _posterior(pos_rng, f)
    z = np.zeros(m.size)
    z[m.size - m.nc :] = rng.standard_normal(m.nc)
    com, _, _ = m.parts(z)
    s = fm.shifts - fm.shifts.mean(axis=0)
    p = fm.prior
    k = fm.curvature
    big_l = np.zeros((2 * f, 2 * f))
    for t in range(f):
        for u in range(f):
            coupling = -k[t] @ np.linalg.inv(k.sum(axis=0)) @ k[u] + (k[t] if t == u else 0.0)
            big_l[[t, f + t], [u, u]] = coupling[:, 0]
            big_l[[t, f + t], [f + u, f + u]] = coupling[:, 1]
    cv, sv = com.T.ravel(), s.T.ravel()
    pp = np.kron(np.eye(2), p)
    tot = cv + sv
    expected = 0.5 * tot @ pp @ tot - 0.4 * ((pp @ sv) @ cv - 0.5 * cv @ big_l @ cv)
    value, _ = m.prior(z)
    assert value == pytest.approx(expected, rel=1e-9)
    # L is blind to a common shift of all frames
    np.testing.assert_allclose(fm.data_precision() @ np.repeat([1.0, -2.0], f), 0.0, atol=1e-9)


@pytest.mark.gpu
def test_objective_same_on_gpu_and_cpu() -> None:
    import cupy as cp

    rng = np.random.default_rng(7)
    spec = random_spectra(rng, p=4, f=6)
    m = model_for(rng, p=4, f=6)
    z = rng.standard_normal(m.size)
    v_cpu, g_cpu = objective(spec, m, z)
    gspec = random_spectra(rng, p=4, f=6)
    for name in ("x", "kx", "ky", "weight"):
        setattr(gspec, name, cp.asarray(getattr(spec, name)))
    v_gpu, g_gpu = objective(gspec, m, z)
    assert v_gpu == pytest.approx(v_cpu, rel=1e-9)
    np.testing.assert_allclose(g_gpu, g_cpu, rtol=1e-8, atol=1e-10)


def test_spectra_from_frames_equals_prepare_spectra_on_cut_patches() -> None:
    # the chunked cutter used by the pipeline and the patch-based entry give the same band spectra
    from gpu.extract import cut_patches
    from gpu.local_model import spectra_from_frames

    rng = np.random.default_rng(3)
    frames = rng.poisson(1.0, size=(6, 200, 220)).astype(np.float32)
    centres = np.stack([rng.uniform(40, 170, (5, 1)) + rng.normal(0, 0.7, (5, 6)),
                        rng.uniform(40, 150, (5, 1)) + rng.normal(0, 0.7, (5, 6))], axis=-1)
    ci = np.rint(centres)
    patches = cut_patches(frames, ci.astype(np.int64), 64)
    kw = {"band_low": 200.0, "band_high": 8.0, "first_frame": 1, "last_frame": 4}
    a = prepare_spectra(patches, centres - ci, 1.0, 1.0, **kw)
    b = spectra_from_frames(frames, centres, 64, 1.0, 1.0, **kw)
    assert a.x.shape == b.x.shape and np.allclose(a.x, b.x, atol=1e-4)


def test_overlap_weights_match_pixel_masks() -> None:
    """``gpu.local.overlap_weights`` (masks sampled on a box/32 grid) against the same quantity from
    full-resolution patch masks (gpu.local_model.soft_mask) on a pixel canvas: w_p = Σ m_p² / Σ m_p M."""
    box = 64
    pos = np.array([[100.0, 100.0], [130.0, 100.0], [100.0, 100.0], [300.0, 300.0], [160.0, 140.0]])
    mask = soft_mask(box).astype(np.float64)
    canvas = np.zeros((2, 5, 420, 420))  # (m_p placed, per particle), then M
    for i, (x, y) in enumerate(pos.astype(int)):
        canvas[0, i, y - box // 2 : y + box // 2, x - box // 2 : x + box // 2] = mask
    total = canvas[0].sum(axis=0)
    expected = (canvas[0] ** 2).sum(axis=(1, 2)) / (canvas[0] * total).sum(axis=(1, 2))
    got = overlap_weights(pos, box)
    np.testing.assert_allclose(got, expected, rtol=0.02)
    assert got[3] == pytest.approx(1.0)  # alone
    assert overlap_weights(pos[[0, 2]], box) == pytest.approx([0.5, 0.5])  # two identical masks


def test_common_uncertainty_is_the_inverse_hessian_of_the_objective() -> None:
    """``common_uncertainty``: per frame sqrt(var_x + var_y) of ``c`` under the Laplace approximation,
    against the inverse Hessian of the common term's part of the objective taken numerically in its
    own parameters (the increments zc; the prior is quadratic, the data curvature ``h`` enters as
    ½ Σ_t h_t |c_t|² with h summed over particles)."""
    rng = np.random.default_rng(13)
    m = model_for(rng, p=4, f=6, common=True)
    h = rng.uniform(0.5, 2.0, (m.P, m.F))
    nc0 = m.size - m.nc
    z = np.zeros(m.size)
    c_mat = np.tril(np.ones((m.F, m.F - 1)), k=-1)
    c_mat -= c_mat.mean(axis=0)  # increments -> zero-mean positions (the model's integration)
    hess = np.zeros((m.nc, m.nc))
    step = 1e-2
    for i in range(m.nc):  # the prior's Hessian in zc by central differences of its (exact) gradient
        zp, zm = z.copy(), z.copy()
        zp[nc0 + i] += step
        zm[nc0 + i] -= step
        hess[:, i] = (m.prior(zp)[1][nc0:] - m.prior(zm)[1][nc0:]) / (2 * step)
    data = np.kron(c_mat.T @ np.diag(h.sum(axis=0)) @ c_mat, np.eye(2))  # zc packs (F-1, 2): frame-major
    cov_z = np.linalg.inv(hess + data)
    big_c = np.kron(c_mat, np.eye(2))  # positions (F, 2) frame-major from zc
    var = np.diag(big_c @ cov_z @ big_c.T).reshape(m.F, 2).sum(axis=1)
    np.testing.assert_allclose(common_uncertainty(m, h), np.sqrt(var), rtol=1e-6)


def test_scaled_prior_evidence_is_the_gaussian_marginal_likelihood() -> None:
    """``scaled_prior_evidence`` differs from log N(x̂; 0, k² p⁻¹ + h⁻¹) (scipy, written out) by a constant
    in k, and picks the scale the observations were drawn with."""
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(14)
    n = 8
    a = rng.standard_normal((n, n))
    p = a @ a.T + n * np.eye(n)
    h = np.diag(rng.uniform(1.0, 4.0, n))
    k_true = 2.0
    x = rng.multivariate_normal(np.zeros(n), k_true**2 * np.linalg.inv(p), size=400)
    xhat = x + rng.multivariate_normal(np.zeros(n), np.linalg.inv(h), size=400)
    factors = (0.5, 1.0, 2.0, 4.0)
    ev = scaled_prior_evidence(xhat @ h, h, p, factors)
    direct = np.array([multivariate_normal(np.zeros(n), k**2 * np.linalg.inv(p) + np.linalg.inv(h)).logpdf(xhat).sum()
                       for k in factors])
    np.testing.assert_allclose(ev - ev[0], direct - direct[0], rtol=1e-8, atol=1e-6)
    assert factors[int(np.argmax(ev))] == k_true
