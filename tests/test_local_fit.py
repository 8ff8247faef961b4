"""Per-particle fit machinery: curvature, block preconditioner, chunked sums, thread chunks.

Each piece is checked against an independent computation: finite differences of the likelihood,
the plain (unpreconditioned) optimiser, the unchunked aligned spectra, a serial loop.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpu import backend
from gpu.local import BlockPreconditioner, TrajectoryModel, fit, objective, per_frame_shifts, spatial_basis
from gpu.local_model import aligned_spectra, aligned_sums, curvature, data_term, prepare_spectra
from gpu.shift import fourier_shift


def moving_patches(rng: np.random.Generator, p: int = 10, f: int = 12, box: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy patches of a random smooth object per particle, moving along a smooth local path (px)."""
    noise = rng.standard_normal((p, box, box))
    k2 = np.fft.fftfreq(box)[:, None] ** 2 + np.fft.rfftfreq(box)[None, :] ** 2
    obj = np.fft.irfft2(np.fft.rfft2(noise) * np.exp(-k2 / (2 * 0.08**2)), s=(box, box))
    obj = 2.0 + obj / obj.std()
    t = np.linspace(0.0, 1.0, f)
    path = np.stack([1.5 * (1 - np.exp(-4 * t)), -1.0 * (1 - np.exp(-4 * t))], -1)
    path = path[None] * rng.uniform(0.5, 1.5, (p, 1, 2))
    path -= path.mean(axis=1, keepdims=True)
    frames = fourier_shift(np.broadcast_to(obj[:, None], (p, f, box, box)).astype(np.float64), path)
    patches = rng.poisson(np.clip(frames, 0, None) * 4.0).astype(np.float32)
    pos = rng.uniform(0, 1500, (p, 2))
    return patches, path, pos


def spectra_and_model(seed: int = 0, dtype: object = None) -> tuple[object, TrajectoryModel]:
    rng = np.random.default_rng(seed)
    patches, _, pos = moving_patches(rng)
    spec = prepare_spectra(patches, np.zeros((*patches.shape[:2], 2)), 1.0, 1.0, band_low=200.0, band_high=6.0, dtype=dtype)
    psi = spatial_basis(pos, 1.0, 800.0, "gaussian")
    model = TrajectoryModel(psi, spec.n_frames, 1.0, 1.0, 2.0, 0.2, 0.5, burst_exposure=2.5)
    return spec, model


def test_curvature_matches_finite_differences() -> None:
    """h_t = -∂² log L/∂d_t² (x, y averaged) at d = 0, by central second differences (float64)."""
    spec, _ = spectra_and_model(1, dtype=np.complex128)
    h = curvature(spec)
    p, fa = spec.x.shape[:2]
    eps = 1e-3
    v0 = data_term(spec, np.zeros((p, fa, 2)), gradient=False)[0]
    for pi, ti in ((0, 0), (3, 5), (9, 11)):
        second = []
        for axis in (0, 1):
            dp = np.zeros((p, fa, 2))
            dp[pi, ti, axis] = eps
            vp = data_term(spec, dp, gradient=False)[0]
            vm = data_term(spec, -dp, gradient=False)[0]
            second.append((vp - 2 * v0 + vm) / eps**2)
        assert h[pi, ti] > 0
        assert h[pi, ti] == pytest.approx(-0.5 * sum(second), rel=1e-4)


def test_preconditioner_is_a_consistent_change_of_variables() -> None:
    spec, model = spectra_and_model(2, dtype=np.complex128)
    rng = np.random.default_rng(3)
    h = np.zeros((model.P, model.F))
    h[:, spec.frames] = curvature(spec)
    pc = model.preconditioner(h)
    assert isinstance(pc, BlockPreconditioner)
    y = rng.standard_normal(model.size)
    np.testing.assert_allclose(pc.to_y(pc.to_z(y)), y, atol=1e-10)
    # the chain rule: dJ(z(y))/dy == L^-1 dJ/dz, against finite differences in y
    _, gz = objective(spec, model, pc.to_z(y))
    gy = pc.gradient(gz)
    step = 1e-6
    for i in rng.choice(model.size, 8, replace=False):
        yp, ym = y.copy(), y.copy()
        yp[i] += step
        ym[i] -= step
        fd = (objective(spec, model, pc.to_z(yp))[0] - objective(spec, model, pc.to_z(ym))[0]) / (2 * step)
        assert gy[i] == pytest.approx(fd, rel=1e-5, abs=1e-6 * max(1.0, np.abs(gy).max()))


def test_preconditioned_fit_reaches_the_plain_minimum_with_fewer_evaluations() -> None:
    spec, model = spectra_and_model(4)
    z_plain, plain = fit(spec, model, precondition=False)
    z_pc, pre = fit(spec, model)
    assert pre["objective"] <= plain["objective"] + 0.05  # nats: the same minimum (or lower)
    d_plain, d_pc = model.trajectories(z_plain), model.trajectories(z_pc)
    assert np.sqrt(((d_plain - d_pc) ** 2).mean()) < 0.01  # px
    assert pre["evaluations"] < plain["evaluations"]
    assert np.abs(d_pc).max() > 0.1  # it found the motion


def test_aligned_sums_equal_the_sums_of_the_aligned_spectra() -> None:
    spec, _ = spectra_and_model(5)
    rng = np.random.default_rng(6)
    d = rng.standard_normal((*spec.x.shape[:2], 2)).astype(np.float32)
    groups = [np.arange(0, 12, 2), np.array([1, 4, 5])]
    full = aligned_spectra(spec, d)
    for got, idx in zip(aligned_sums(spec, d, groups), groups, strict=True):
        np.testing.assert_allclose(got, full[:, idx].sum(axis=1), rtol=1e-5, atol=1e-4 * np.abs(full).max())


def test_even_fold_subset_is_a_view_with_the_same_values() -> None:
    spec, _ = spectra_and_model(7)
    even = spec.subset(np.arange(0, 12, 2))
    assert np.shares_memory(even.x, spec.x)
    np.testing.assert_array_equal(even.x, spec.x[:, 0::2])
    picked = spec.subset(np.array([0, 3, 4]))
    np.testing.assert_array_equal(picked.x, spec.x[:, [0, 3, 4]])
    np.testing.assert_array_equal(picked.frames, spec.frames[[0, 3, 4]])


def test_per_frame_shifts_recover_a_known_frame_offset() -> None:
    """One frame displaced by a known amount: its raw estimate points back to the others."""
    spec, _ = spectra_and_model(8)
    p, fa = spec.x.shape[:2]
    offset = np.zeros((p, fa, 2))
    offset[:, 4] = [0.6, -0.4]  # displace frame 4's content by applying the shift as if it were the estimate
    moved = aligned_spectra(spec, offset.astype(np.float32))
    spec.x = moved
    spec.self_power = None
    raw = per_frame_shifts(spec, np.zeros((p, spec.n_frames, 2)))
    # frame 4 must be shifted back by -offset relative to the rest (raw is zero-mean over frames)
    rel = raw[:, 4] - np.delete(raw, 4, axis=1).mean(axis=1)
    np.testing.assert_allclose(np.median(rel, axis=0), [-0.6, 0.4], atol=0.1)


def test_map_chunks_keeps_order_uses_threads_and_does_not_nest() -> None:
    backend.set_threads(2)
    try:
        names: set[str] = set()

        def work(sl: slice) -> list[int]:
            names.add(threading.current_thread().name)
            inner = backend.map_chunks(lambda s: list(range(s.start, s.stop)), 4, 2)  # serial inside a chunk
            assert inner == [[0, 1], [2, 3]]
            return list(range(sl.start, sl.stop))

        out = backend.map_chunks(work, 10, 3)
        assert out == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
        assert all(n.startswith("lmc-xp") for n in names)
        backend.set_threads(1)
        names.clear()
        assert backend.map_chunks(work, 4, 2) == [[0, 1], [2, 3]]
        assert names == {threading.current_thread().name}
    finally:
        backend.set_threads(0)


def test_binned_band_spectra_equal_the_full_ones_times_the_box_filter() -> None:
    """2x2 binning before the transform (auto for a band within a quarter of Nyquist): X_b = cos(π kx) cos(π ky) X.

    Band-limited, zero-mean content inside the mask's flat disc, so neither the mask nor aliasing
    differs between the two; sub-pixel remainders exercise the half-pixel centre correction.
    """
    from gpu.local_model import auto_binning, band_size

    box, p, f = 64, 3, 4
    yy, xx = np.mgrid[0:box, 0:box] - box / 2
    r2 = xx**2 + yy**2
    blob = np.exp(-r2 / (2 * 3.0**2)) / 3.0**2 - np.exp(-r2 / (2 * 4.5**2)) / 4.5**2  # zero integral
    rng = np.random.default_rng(9)
    rem = rng.uniform(-0.5, 0.5, (p, f, 2))
    patches = fourier_shift(np.broadcast_to(blob, (p, f, box, box)).astype(np.float64), rem).astype(np.float64)
    n = band_size(box, 1.0, 8.0)
    assert auto_binning(box, n) == 2 and auto_binning(box, band_size(box, 1.0, 3.0)) == 1
    full = prepare_spectra(patches, rem, 1.0, 1.0, band_low=500.0, band_high=8.0, dtype=np.complex128, binning=1)
    binned = prepare_spectra(patches, rem, 1.0, 1.0, band_low=500.0, band_high=8.0, dtype=np.complex128)
    assert binned.x.shape == full.x.shape
    filt = np.cos(np.pi * full.ky)[:, None] * np.cos(np.pi * full.kx)[None, :]
    np.testing.assert_allclose(binned.x, full.x * filt, atol=2e-3 * np.abs(full.x).max())
    with pytest.raises(ValueError, match="binning"):
        prepare_spectra(patches, rem, 1.0, 1.0, band_high=3.0, binning=2)


def test_patches_cut_from_the_binned_movie_match_the_binned_patches() -> None:
    """spectra_from_frames with ``binned_frames`` (a quarter of the gather) ≈ binning each full patch.

    The two paths cut around different integer centres (rint(c) vs rint((c - 0.5)/2)) and correct
    the rest by phase, so on smooth frames their band spectra agree except for the soft mask's edge.
    """
    from gpu.local_model import binned_boxes_inside, binned_movie, spectra_from_frames

    rng = np.random.default_rng(12)
    f, h, w, box = 4, 300, 320, 64
    noise = rng.standard_normal((h, w))
    k2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2
    img = np.fft.irfft2(np.fft.rfft2(noise) * np.exp(-k2 / (2 * 0.04**2)), s=(h, w))
    drift = rng.uniform(-3, 3, (f, 2))
    frames = fourier_shift(np.broadcast_to(img, (f, h, w)).astype(np.float64), drift)
    pos = rng.uniform(60, 240, (6, 2))
    centres = pos[:, None, :] + drift[None]
    sums = binned_movie(frames)
    np.testing.assert_allclose(sums[1], frames[1, 0::2, 0::2] + frames[1, 1::2, 0::2] + frames[1, 0::2, 1::2]
                               + frames[1, 1::2, 1::2], rtol=1e-5, atol=1e-5)
    assert binned_boxes_inside(centres, box, sums.shape[1:]).all()
    a = spectra_from_frames(frames, centres, box, 1.0, 1.0, band_high=8.0)
    b = spectra_from_frames(frames, centres, box, 1.0, 1.0, band_high=8.0, binned_frames=sums)
    corr = np.abs(np.vdot(a.x, b.x)) / np.sqrt(np.vdot(a.x, a.x).real * np.vdot(b.x, b.x).real)
    assert corr > 0.98
    # aligned by the known drift, every frame of a particle has the same spectrum in both paths
    for s in (a, b):
        frames_k = s.x / np.abs(s.x).max()
        assert np.abs(frames_k - frames_k.mean(axis=1, keepdims=True)).max() < 0.15
    with pytest.raises(ValueError, match="binned frames"):
        spectra_from_frames(frames, centres + 200.0, box, 1.0, 1.0, band_high=8.0, binned_frames=sums)



def test_common_given_recovers_the_common_path_when_the_rest_is_known() -> None:
    """Particles moving along a common path plus their own large paths (zero-mean over the particles):
    with each particle's own path given, ``common_given`` finds the common path; with the own paths
    left unknown (zero), the misaligned frames decorrelate and it cannot."""
    from gpu.local import common_given
    from gpu.motion import FrameMotion, prior_precision

    rng = np.random.default_rng(11)
    patches, path, _ = moving_patches(rng, p=16)
    p, f = patches.shape[:2]
    t = np.linspace(0.0, 1.0, f)
    own = rng.normal(0.0, 4.0, (p, 1, 2)) * (t[None, :, None] - 0.5)  # drifts of a few px
    own -= own.mean(axis=0, keepdims=True)
    moved = fourier_shift(patches.astype(np.float64), own).astype(np.float32)
    spec = prepare_spectra(moved, np.zeros((p, f, 2)), 1.0, 1.0, band_low=200.0, band_high=6.0)
    motion = FrameMotion(np.zeros((f, 2)), prior_precision(f, 1.0, 0.0), np.zeros((f, 2, 2)), (2000, 2000))
    common = path.mean(axis=0)
    c = common_given(spec, own, motion, 0.0)
    assert c.shape == (f, 2)
    np.testing.assert_allclose(c.mean(axis=0), 0.0, atol=1e-9)  # the gauge: zero-mean over frames
    err = np.abs(c - common).max()
    assert err < 0.15
    assert np.abs(common_given(spec, np.zeros_like(own), motion, 0.0) - common).max() > 2 * err
    with pytest.raises(ValueError, match="known displacements"):
        common_given(spec, own[:, :-1], motion, 0.0)
