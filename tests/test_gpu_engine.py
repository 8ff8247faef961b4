"""CuPy versus NumPy for every engine function (same code path; only the array module differs)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

from gpu import crop, extract, fourier, gain, motion, normalize, shift  # noqa: E402


def same(gpu_value, cpu_value, atol=1e-5, rtol=1e-5):
    assert isinstance(gpu_value, cp.ndarray), f"expected a CuPy array, got {type(gpu_value)}"
    np.testing.assert_allclose(cp.asnumpy(gpu_value), cpu_value, atol=atol, rtol=rtol)


def test_fourier():
    for rfft in (True, False):
        for a, b in zip(fourier.freq_grid(12, 15, rfft, cp), fourier.freq_grid(12, 15, rfft, np), strict=True):
            same(a, b, atol=0)
    same(fourier.radial_freq(12, 15, True, 1.3, cp), fourier.radial_freq(12, 15, True, 1.3, np))
    same(fourier.bfactor_envelope(32, 30, 1.1, 500.0, True, cp), fourier.bfactor_envelope(32, 30, 1.1, 500.0))
    same(fourier.band_mask(32, 30, 1.0, 20.0, 4.0, True, cp), fourier.band_mask(32, 30, 1.0, 20.0, 4.0), atol=0)
    same(fourier.rfft_multiplicity(30, cp), fourier.rfft_multiplicity(30), atol=0)


def test_shift():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((3, 40, 50)).astype(np.float32)
    s = rng.normal(0.0, 3.0, (3, 2))
    same(shift.phase_ramp(cp.asarray(s), 40, 50), shift.phase_ramp(s, 40, 50))
    same(shift.phase_ramp(cp.asarray(s), 40, 50, rfft=False), shift.phase_ramp(s, 40, 50, rfft=False))
    same(shift.fourier_shift(cp.asarray(img), cp.asarray(s)), shift.fourier_shift(img, s), atol=1e-4)


def test_crop():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((2, 64, 90)).astype(np.float32)
    for out in [(32, 48), (31, 45), (64, 90)]:
        same(crop.fourier_crop(cp.asarray(img), out), crop.fourier_crop(img, out), atol=1e-4)
    frames = rng.integers(0, 4, (5, 61, 83)).astype(np.uint8)
    same(crop.bin_real(cp.asarray(frames), 3), crop.bin_real(frames, 3))
    dg, dc = crop.downsample_spectra(cp.asarray(frames), 4.3), crop.downsample_spectra(frames, 4.3)
    assert dg.shape == dc.shape and dg.scale == dc.scale
    same(dg.spectra, dc.spectra, atol=1e-3)


def test_gain():
    rng = np.random.default_rng(2)
    g = rng.uniform(0.5, 2.0, (40, 30)).astype(np.float32)
    g[3, 4] = 0.0
    same(gain.orient_gain(cp.asarray(g), 1, True, False), gain.orient_gain(g, 1, True, False), atol=0)
    same(gain.gain_multiplier(cp.asarray(g), "divide"), gain.gain_multiplier(g, "divide"))
    frames = rng.integers(0, 5, (6, 30, 40)).astype(np.uint8)
    mult = gain.orient_gain(g, 1)
    same(gain.apply_gain(cp.asarray(frames), cp.asarray(mult)), gain.apply_gain(frames, mult))
    total = rng.poisson(40.0, (512, 640)).astype(np.float32)
    total[100, 200] += 500.0
    total[300:302, 10] += 1000.0
    cpu_mask = gain.hot_pixel_mask(total, 6.0)
    assert int(cpu_mask.sum()) == 3
    same(gain.hot_pixel_mask(cp.asarray(total), 6.0), cpu_mask, atol=0)
    f32 = rng.poisson(2.0, (4, 512, 640)).astype(np.float32)
    a = gain.replace_pixels(f32.copy(), cpu_mask)
    b = gain.replace_pixels(cp.asarray(f32), cp.asarray(cpu_mask))
    same(b, a)
    a = gain.replace_pixels(f32.copy(), cpu_mask, rng=np.random.default_rng(5))
    b = gain.replace_pixels(cp.asarray(f32), cp.asarray(cpu_mask), rng=np.random.default_rng(5))
    same(b, a)


def test_motion():
    rng = np.random.default_rng(3)
    h, w, n = 256, 320, 10
    k = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    img = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((h, w))) * (k < 0.08), s=(h, w)).astype(np.float32) + 3.0
    true = np.cumsum(rng.normal(0.0, 1.5, (n, 2)), axis=0)
    frames = shift.fourier_shift(np.broadcast_to(img, (n, h, w)), true)
    est_cpu = motion.estimate_frame_shifts(frames, 1.0, 8.0, 100.0)
    movie = motion.bin_movie(cp.asarray(frames), 1.0, 8.0)
    est_gpu = motion.estimate_frame_shifts(movie, 1.0, 8.0, 100.0)
    assert isinstance(est_gpu, np.ndarray)
    np.testing.assert_allclose(est_gpu, est_cpu, atol=2e-3)
    img_g, f_g = motion.aligned_sum(movie, est_cpu)
    img_c, f_c = motion.aligned_sum(frames, est_cpu, apix=1.0)
    assert f_g == f_c
    same(img_g, img_c, atol=1e-3 * float(np.abs(img_c).max()))


def test_extract_and_normalize():
    rng = np.random.default_rng(4)
    n_f, h, w = 5, 120, 150
    frames = rng.standard_normal((n_f, h, w)).astype(np.float32)
    pos = np.array([[60.2, 50.7], [20.0, 60.0], [100.4, 100.9], [140.0, 10.0]])
    traj = np.cumsum(rng.normal(0.0, 0.8, (4, n_f, 2)), axis=1)
    centres = np.floor(pos[:, None] + traj + 0.5).astype(np.int64)
    same(
        extract.cut_patches(cp.asarray(frames), centres, 32, fill="mean"),
        extract.cut_patches(frames, centres, 32, fill="mean"),
    )
    dose = {"dose_per_frame": 3.0, "pre_exposure": 0.5, "kv": 200.0}
    for edge in ("skip", "pad"):
        pg, kg, sg = extract.extract_particles(
            cp.asarray(frames), pos, traj, 48, 32, 1.1, dose=dose, edge=edge, chunk=2
        )
        pc, kc, sc = extract.extract_particles(frames, pos, traj, 48, 32, 1.1, dose=dose, edge=edge, chunk=2)
        assert kg.tolist() == kc.tolist() and sg == sc
        same(pg, pc, atol=1e-4)
        for ramp in (False, True):
            same(
                normalize.normalize_background(pg, ramp=ramp), normalize.normalize_background(pc, ramp=ramp), atol=1e-4
            )
