from __future__ import annotations

import numpy as np
import pytest

from gpu.backend import fft2, ifft2
from gpu.shift import fourier_shift, phase_ramp, shift_spectrum

# (amplitude, cycles across the width, cycles across the height, phase): well below Nyquist
WAVES = [(1.0, 3, 2, 0.3), (0.5, -5, 7, 1.1), (0.2, 0, 11, -0.4), (0.3, 9, -4, 2.0)]


def waves(x: np.ndarray, y: np.ndarray, h: int, w: int) -> np.ndarray:
    """A band-limited periodic function evaluated at arbitrary (x, y) px."""
    return sum(a * np.cos(2 * np.pi * (u * x / w + v * y / h) + p) for a, u, v, p in WAVES)


@pytest.mark.parametrize("shape", [(32, 48), (33, 47), (31, 40)])
def test_integer_shifts_equal_roll(shape):
    rng = np.random.default_rng(1)
    img = rng.standard_normal((3, *shape)).astype(np.float32)
    shifts = np.array([[3.0, -5.0], [0.0, 7.0], [-12.0, 1.0]])
    out = fourier_shift(img, shifts)
    assert out.dtype == np.float32 and out.shape == img.shape
    for i, (dx, dy) in enumerate(shifts):
        np.testing.assert_allclose(out[i], np.roll(img[i], (int(dy), int(dx)), axis=(0, 1)), atol=2e-6)


@pytest.mark.parametrize("shape", [(64, 96), (65, 81)])
def test_subpixel_shift_of_band_limited_function_is_exact(shape):
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = waves(x, y, h, w).astype(np.float32)
    for s in ([1.37, -2.71], [0.5, 0.5], [-10.25, 3.9]):
        out = fourier_shift(img, np.array(s))
        np.testing.assert_allclose(out, waves(x - s[0], y - s[1], h, w), atol=2e-6)


def test_shifts_compose_and_broadcast_over_leading_dims():
    h, w = 40, 50
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = waves(x, y, h, w).astype(np.float32)
    once = fourier_shift(img, np.array([0.8, -1.3]))
    twice = fourier_shift(fourier_shift(img, np.array([0.3, -0.6])), np.array([0.5, -0.7]))
    np.testing.assert_allclose(once, twice, atol=3e-6)
    ramp = phase_ramp(np.zeros((3, 4, 2)), h, w)
    assert ramp.shape == (3, 4, h, w // 2 + 1) and ramp.dtype == np.complex64
    batch = fourier_shift(np.broadcast_to(img, (2, 3, h, w)), np.full((2, 3, 2), 0.25))
    np.testing.assert_allclose(batch[1, 2], fourier_shift(img, np.array([0.25, 0.25])), atol=1e-6)


def test_full_fft_ramp_keeps_real_input_real_and_matches_rfft_path():
    rng = np.random.default_rng(2)
    img = rng.standard_normal((24, 30)).astype(np.float32)  # has Nyquist content on both axes
    s = np.array([0.37, -1.61])
    full = ifft2(fft2(img) * phase_ramp(s, 24, 30, rfft=False))
    assert np.abs(full.imag).max() < 1e-5
    np.testing.assert_allclose(full.real, fourier_shift(img, s), atol=1e-5)


def test_nyquist_terms_use_cosine():
    # (-1)^x lives only on the Nyquist column: a half-pixel shift gives cos(pi/2) = 0, one pixel negates it
    img = np.tile((-1.0) ** np.arange(8), (4, 1)).astype(np.float32)
    np.testing.assert_allclose(fourier_shift(img, np.array([0.5, 0.0])), 0.0, atol=1e-6)
    np.testing.assert_allclose(fourier_shift(img, np.array([1.0, 0.0])), -img, atol=1e-6)
    np.testing.assert_allclose(fourier_shift(img, np.array([0.25, 0.0])), np.cos(np.pi / 4) * img, atol=1e-6)


def test_shift_sign_convention():
    # content shifted by +s: a feature at p moves to p + s (gpu/__init__)
    img = np.zeros((16, 16), np.float32)
    img[5, 3] = 1.0
    out = fourier_shift(img, np.array([2.0, 4.0]))
    assert np.unravel_index(np.argmax(out), out.shape) == (9, 5)
    spec = shift_spectrum(np.fft.rfft2(img).astype(np.complex64), np.array([2.0, 4.0]), 16)
    np.testing.assert_allclose(np.fft.irfft2(spec, s=(16, 16)), out, atol=1e-6)


def test_bad_shift_shape_is_reported():
    with pytest.raises(ValueError, match=r"^ramp_factors: shifts must have shape"):
        phase_ramp(np.zeros(3), 8, 8)
