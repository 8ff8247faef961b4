"""The speed-motivated pieces of gpu/motion.py equal direct computations of what they stand for."""

from __future__ import annotations

import numpy as np
import pytest

from gpu import motion
from gpu.shift import ramp_factors


def random_spectra(n: int, hc: int, wc: int, seed: int) -> np.ndarray:
    """``(n, hc, wc//2+1)`` complex64 rfft spectra of random real images."""
    rng = np.random.default_rng(seed)
    return np.fft.rfft2(rng.standard_normal((n, hc, wc))).astype(np.complex64)


@pytest.mark.parametrize(("hc", "wc", "radius"), [(96, 128, (10, 7)), (90, 120, (30, 22)), (45, 64, (5, 11))])
def test_window_maps_equal_the_windows_of_the_full_inverse_transform(hc, wc, radius):
    # c_t(δ) = Σ_k m_k Re[p_k e^{2πik·δ}] (hc·wc · irfft2), and c1 the same from the checkerboard half
    p = random_spectra(5, hc, wc, 0)
    rx, ry = radius
    half = ((np.arange(hc)[:, None] + np.arange(wc // 2 + 1)[None, :]) % 2).astype(np.float64)
    rows = np.arange(-ry, ry + 1) % hc
    cols = np.arange(-rx, rx + 1) % wc

    def ref(q: np.ndarray) -> np.ndarray:
        return (np.fft.irfft2(q.astype(np.complex128), s=(hc, wc)) * (hc * wc))[:, rows][:, :, cols]

    c, c1 = motion._window_maps(p, radius, hc, wc, split=True, chunk=2)
    assert c.shape == c1.shape == (5, 2 * ry + 1, 2 * rx + 1) and c.dtype == np.float64
    scale = np.abs(ref(p)).max()
    np.testing.assert_allclose(c, ref(p), atol=1e-5 * scale)
    np.testing.assert_allclose(c1, ref(p * half), atol=1e-5 * scale)
    (only,) = motion._window_maps(p, radius, hc, wc, split=False)
    np.testing.assert_allclose(only, c, atol=1e-6 * scale)  # other chunks: other GEMM blocking


def test_peak_terms_are_the_interpolant_and_its_derivatives():
    # value, gradient and Hessian of c(δ) = Σ_k m_k Re[p_k e^{2πik·δ}] at non-integer δ, summed directly in float64
    n, hc, wc = 4, 24, 30
    p = random_spectra(n, hc, wc, 1)
    d = np.random.default_rng(2).uniform(-2.0, 2.0, (n, 2))
    ky = np.fft.fftfreq(hc)[:, None]
    kx = np.fft.rfftfreq(wc)[None, :]
    m = np.where(np.arange(kx.size) == 0, 1.0, 2.0)[None, :]  # as in the module: Nyquist counted twice too
    got = motion._peak_terms(p, d, motion._Trig.make(hc, wc, np), np)
    assert got.shape == (n, 3, 3) and got.dtype == np.float64
    for t in range(n):
        z = m * p[t].astype(np.complex128) * np.exp(2j * np.pi * (kx * d[t, 0] + ky * d[t, 1]))
        for i in range(3):
            for j in range(3):
                want = np.sum((2j * np.pi * ky) ** i * (2j * np.pi * kx) ** j * z).real
                assert got[t, i, j] == pytest.approx(want, abs=1e-5 * np.abs(z).sum() * (2 * np.pi) ** (i + j))


def test_cross_spectra_and_noise_variance_over_many_row_chunks():
    # big enough for several row chunks (motion._row_chunk); against the full-array formulas of the module doc
    n, hc, wc = 16, 512, 512
    spectra = random_spectra(n, hc, wc, 3)
    movie = motion.BinnedMovie(spectra, (hc, wc), (1.0, 1.0), 1.0, (hc, wc))
    assert motion._row_chunk(n, wc // 2 + 1, np) < hc // 4
    wgt = motion.correlation_weights(movie, 50.0)
    power, power_sq = motion._frame_power(spectra, wgt)
    a64 = spectra.astype(np.complex128)
    pw64 = (a64.real**2 + a64.imag**2) * wgt
    np.testing.assert_allclose(power, pw64, rtol=1e-6)
    np.testing.assert_allclose(power_sq, np.sum(pw64**2, axis=(1, 2)), rtol=1e-5)
    s = np.random.default_rng(4).normal(0.0, 3.0, (n, 2))
    p = np.empty_like(spectra)
    var = motion._cross_spectra(movie, s, wgt, power, power_sq, p)
    ey, ex = ramp_factors(-s, hc, wc, True, np)
    shifted = a64 * ey * ex
    total = shifted.sum(axis=0)
    want = shifted * np.conj(total - shifted) * wgt  # frame against the sum of the others
    np.testing.assert_allclose(p, want, atol=1e-5 * np.abs(want).max())
    r = want.real
    wr2 = (total.real**2 + total.imag**2) * wgt - 2 * r - pw64  # w|R_t|²
    noise = pw64 - r / (n - 1)  # w N_t
    np.testing.assert_allclose(var, 2.0 * np.sum(wr2 * noise, axis=(1, 2)), rtol=1e-4)


def test_max_plus_dense_and_banded_equal_the_direct_maximum():
    rng = np.random.default_rng(5)
    for wy, w, offset, precision in [(9, 31, 0.4, 0.3), (120, 200, -2.6, 0.05), (120, 200, 3.3, 4.0)]:
        score = np.cumsum(rng.normal(0.0, 2.0, (wy, w)), axis=1)
        got = motion._max_plus(score, offset, precision)
        i = np.arange(w)
        want = np.full((wy, w), -np.inf)
        for j in range(w):
            want = np.maximum(want, score[:, j : j + 1] - 0.5 * precision * (offset + i[None, :] - j) ** 2)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    assert 120 * 200 * 200 > motion._DENSE_MAX_PLUS  # the last two took the banded path


def test_bin_movie_from_the_2x2_sums_equals_binning_the_frames():
    """A plan that bins by 2 gives the same spectra and scale from the frames' 2x2 sums (a quarter of the reading)."""
    from gpu.crop import downsample_plan
    from gpu.local_model import binned_movie
    from gpu.motion import bin_movie

    rng = np.random.default_rng(21)
    frames = rng.poisson(2.0, (3, 412, 576)).astype(np.float32)
    apix = 0.83
    assert downsample_plan(412, 576, 8.0 / (2 * apix))[0] == 2
    plain = bin_movie(frames, apix, 8.0)
    fast = bin_movie(frames, apix, 8.0, sums2=binned_movie(frames))
    assert fast.shape == plain.shape and fast.movie_shape == plain.movie_shape
    np.testing.assert_allclose(fast.scale, plain.scale, rtol=1e-12)
    np.testing.assert_allclose(fast.spectra, plain.spectra, rtol=1e-4, atol=1e-4 * np.abs(plain.spectra).max())
    # a plan that does not bin by 2 ignores the sums
    coarse = bin_movie(frames, 0.4, 8.0, sums2=binned_movie(frames))
    np.testing.assert_array_equal(coarse.spectra, bin_movie(frames, 0.4, 8.0).spectra)
