from __future__ import annotations

import numpy as np
import pytest

from gpu.backend import irfft2
from gpu.motion import aligned_sum, bin_movie, estimate_frame_shifts
from gpu.shift import fourier_shift


def band_limited_image(h: int, w: int, kmax: float, seed: int) -> np.ndarray:
    """Periodic random image with content only below ``kmax`` cycles/px (plus a constant level)."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft2(rng.standard_normal((h, w)))
    k = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    return (np.fft.irfft2(spec * (k < kmax), s=(h, w)) + 5.0).astype(np.float32)


@pytest.fixture(scope="module")
def clean_movie():
    h, w, n = 384, 512, 12
    img = band_limited_image(h, w, 0.08, seed=1)
    rng = np.random.default_rng(2)
    true = np.cumsum(rng.normal(0.0, 1.5, (n, 2)), axis=0)
    true -= true[n // 2]
    return fourier_shift(np.broadcast_to(img, (n, h, w)), true), true, img


@pytest.mark.parametrize("max_res", [2.0, 8.0, 6.0])
def test_recovers_known_subpixel_shifts_noise_free(clean_movie, max_res):
    frames, true, _ = clean_movie
    movie = bin_movie(frames, 1.0, max_res)
    assert 2 * max(movie.binned_apix) <= max_res + 1e-9  # Nyquist never coarser than asked
    est = estimate_frame_shifts(movie, 1.0, max_resolution_A=max_res, bfactor=100.0)
    assert est.shape == (12, 2) and est.dtype == np.float64
    assert np.abs(est[6]).max() == 0.0  # central frame is the reference
    assert np.abs(est - true).max() < 0.05


def test_reference_frame_and_raw_frames_input(clean_movie):
    frames, true, _ = clean_movie
    est = estimate_frame_shifts(frames, 1.0, max_resolution_A=8.0, bfactor=100.0, reference_frame=0)
    assert np.abs(est - (true - true[0])).max() < 0.05
    with pytest.raises(ValueError, match=r"^estimate_frame_shifts: reference_frame 12"):
        estimate_frame_shifts(frames, 1.0, reference_frame=12)
    assert estimate_frame_shifts(frames[:1], 1.0).tolist() == [[0.0, 0.0]]


def test_aligned_sum_is_the_sum_of_the_reference_frame(clean_movie):
    frames, true, _ = clean_movie
    movie = bin_movie(frames, 1.0, 8.0)
    img, factor = aligned_sum(movie, true)
    assert factor == pytest.approx(4.0) and img.shape == movie.shape == (96, 128)
    ref = irfft2(movie.spectra[6], s=movie.shape) * 12
    np.testing.assert_allclose(img, ref, atol=1e-3 * np.abs(ref).max())
    img2, _ = aligned_sum(frames, true, apix=1.0, max_resolution_A=8.0)
    np.testing.assert_allclose(img2, img, atol=1e-4)
    # uncorrected, the sum is blurred: it differs from the aligned one
    blurred, _ = aligned_sum(movie, np.zeros_like(true))
    assert np.abs(blurred - img).max() > 0.05 * np.abs(img - img.mean()).max()
    with pytest.raises(ValueError, match=r"^aligned_sum needs apix"):
        aligned_sum(frames, true)


def test_noisy_counting_movie_with_drift_burst():
    # weak texture (10% rms, ~25 px scale), 1 e/px/frame Poisson, drift ~20 px with an early burst;
    # frames are cut from a larger specimen, so their edges are not periodic
    rng = np.random.default_rng(3)
    n, size, margin = 30, 640, 48
    big = size + 2 * margin
    spec = np.fft.rfft2(rng.standard_normal((big, big)))
    k2 = np.fft.fftfreq(big)[:, None] ** 2 + np.fft.rfftfreq(big)[None, :] ** 2
    texture = np.fft.irfft2(spec * np.exp(-k2 / (2 * 0.04**2)), s=(big, big))
    specimen = (1.0 + 0.1 * texture / texture.std()).astype(np.float32)
    t = np.arange(n)
    burst = 1.0 - np.exp(-t / 2.5)
    true = np.stack([12.0 * burst + 0.25 * t, -8.0 * burst + 0.15 * t], axis=1)
    true -= true[n // 2]
    dose = fourier_shift(np.broadcast_to(specimen, (n, big, big)), true)[:, margin:-margin, margin:-margin]
    frames = rng.poisson(np.clip(dose, 0.0, None)).astype(np.float32)
    est = estimate_frame_shifts(frames, 1.0, max_resolution_A=8.0, bfactor=500.0)
    rms = np.sqrt(np.mean(np.sum((est - true) ** 2, axis=1)))
    assert rms < 0.5, rms
    assert np.linalg.norm(true[-1] - true[0]) > 15.0  # the drift the estimate had to follow
