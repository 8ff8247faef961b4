from __future__ import annotations

import numpy as np
import pytest

from gpu.fourier import (
    band_mask,
    bfactor_envelope,
    freq_grid,
    is_smooth,
    next_smooth_even,
    prev_smooth_even,
    radial_freq,
    rfft_multiplicity,
)


def test_freq_grid_matches_hand_written_frequencies():
    ky, kx = freq_grid(6, 8, rfft=True)
    assert ky.shape == (6, 1) and kx.shape == (1, 5) and ky.dtype == np.float32
    np.testing.assert_allclose(ky[:, 0], [0, 1 / 6, 2 / 6, -3 / 6, -2 / 6, -1 / 6], atol=1e-7)
    np.testing.assert_allclose(kx[0], [0, 0.125, 0.25, 0.375, 0.5], atol=1e-7)
    _, kx_full = freq_grid(6, 7, rfft=False)
    np.testing.assert_allclose(kx_full[0], [0, 1 / 7, 2 / 7, 3 / 7, -3 / 7, -2 / 7, -1 / 7], atol=1e-7)


def test_radial_freq_in_inverse_angstrom():
    k = radial_freq(10, 10, rfft=True, apix=2.0)
    assert k.shape == (10, 6)
    assert k[3, 4] == pytest.approx(np.hypot(0.3, 0.4) / 2.0, rel=1e-6)
    assert k[7, 1] == pytest.approx(np.hypot(-0.3, 0.1) / 2.0, rel=1e-6)


def test_bfactor_envelope_value_and_real_space_gaussian():
    env = bfactor_envelope(20, 20, apix=1.0, bfactor=100.0)
    assert env[0, 2] == pytest.approx(np.exp(-100 * 0.1**2 / 4), rel=1e-6)  # k = 0.1 1/Å
    # exp(-B k²/4) is the transform of a Gaussian with variance B / (8 π²) Å² (Debye-Waller)
    n, apix, b = 64, 1.5, 600.0
    delta = np.zeros((n, n), np.float32)
    delta[0, 0] = 1.0
    blurred = np.fft.irfft2(np.fft.rfft2(delta) * bfactor_envelope(n, n, apix, b), s=(n, n))
    sigma_px = np.sqrt(b / (8 * np.pi**2)) / apix
    d = np.minimum(np.arange(n), n - np.arange(n))
    gauss = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma_px**2))
    gauss /= gauss.sum()
    np.testing.assert_allclose(blurred, gauss, atol=1e-6)


def test_band_mask_selects_the_annulus():
    m = band_mask(40, 40, apix=1.0, low_A=20.0, high_A=5.0)
    k = radial_freq(40, 40, apix=1.0)
    assert m.dtype == bool
    assert not m[0, 0] and not m[0, 1]  # 40 Å, 40 Å/1 -> below 1/20
    assert m[0, 2] and m[0, 8] and not m[0, 9]  # 20 Å, 5 Å kept; 4.4 Å not
    assert np.array_equal(m, (k >= 1 / 20) & (k <= 1 / 5))
    assert band_mask(8, 8, 1.0).all()


@pytest.mark.parametrize("w", [16, 15])
def test_rfft_multiplicity_gives_parseval_on_half_plane(w):
    img = np.random.default_rng(0).standard_normal((12, w))
    full = np.sum(np.abs(np.fft.fft2(img)) ** 2)
    half = np.sum(rfft_multiplicity(w) * np.abs(np.fft.rfft2(img)) ** 2)
    assert half == pytest.approx(full, rel=1e-10)


def test_smooth_sizes():
    assert is_smooth(840) and is_smooth(1) and not is_smooth(22) and not is_smooth(0)
    assert next_smooth_even(257) == 270
    assert next_smooth_even(256) == 256
    assert prev_smooth_even(1023) == 1008
    assert prev_smooth_even(2046) == 2016
    with pytest.raises(ValueError, match=r"^prev_smooth_even: no even FFT size <= 1"):
        prev_smooth_even(1)
