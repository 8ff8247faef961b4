from __future__ import annotations

import numpy as np
import pytest

from gpu.backend import irfft2, rfft2
from gpu.crop import (
    bin_real,
    crop_window,
    downsample,
    downsample_plan,
    downsample_spectra,
    edge_taper,
    fourier_crop,
    fourier_crop_rfft,
)

# (amplitude, cycles across the width, cycles across the height, phase): below every coarse Nyquist used
WAVES = [(1.0, 3, 2, 0.3), (0.5, -5, 7, 1.1), (0.2, 0, 9, -0.4), (0.7, 0, 0, 0.0)]


def waves(x, y, h, w, comps=WAVES):
    return sum(a * np.cos(2 * np.pi * (u * x / w + v * y / h) + p) for a, u, v, p in comps)


@pytest.mark.parametrize("out", [(32, 48), (24, 32), (22, 25), (23, 30), (64, 96)])
def test_crop_equals_function_sampled_on_coarse_grid(out):
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = waves(x, y, h, w).astype(np.float32)
    h2, w2 = out
    y2, x2 = np.mgrid[0:h2, 0:w2].astype(np.float64)
    ref = waves(x2 * w / w2, y2 * h / h2, h, w)  # coarse pixel i sits at fine position i * h / h2
    got = fourier_crop(img, out)
    assert got.shape == out and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_content_at_the_new_nyquist_is_sampled_exactly():
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    comps = [(1.0, 12, 8, 0.4), (0.5, 12, 0, 1.0), (0.3, -7, 8, 0.2)]  # on the (16, 24) Nyquist row/column
    img = waves(x, y, h, w, comps).astype(np.float32)
    y2, x2 = np.mgrid[0:16, 0:24].astype(np.float64)
    np.testing.assert_allclose(fourier_crop(img, (16, 24)), waves(4 * x2, 4 * y2, h, w, comps), atol=2e-6)


def test_mean_preserved_and_output_spectrum_is_hermitian():
    rng = np.random.default_rng(3)
    img = (rng.standard_normal((2, 50, 60)) + 7.0).astype(np.float32)
    for out in [(20, 30), (25, 31)]:
        spec = fourier_crop_rfft(rfft2(img), out)
        assert spec.shape == (2, out[0], out[1] // 2 + 1)
        small = irfft2(spec, s=out)
        np.testing.assert_allclose(small.mean(axis=(1, 2)), img.mean(axis=(1, 2)), rtol=1e-5)
        # a consistent real spectrum survives the round trip unchanged (Nyquist bins folded correctly)
        np.testing.assert_allclose(rfft2(small.astype(np.float32)), spec, atol=2e-3)


def test_odd_input_width_needs_w():
    img = np.random.default_rng(0).standard_normal((30, 41)).astype(np.float32)
    got = irfft2(fourier_crop_rfft(rfft2(img), (20, 26), w=41), s=(20, 26))
    np.testing.assert_allclose(got, fourier_crop(img, (20, 26)), atol=1e-6)
    with pytest.raises(ValueError, match=r"^crop_window: cannot Fourier-crop"):
        fourier_crop(img, (40, 20))


def test_crop_window_folds_only_even_smaller_outputs():
    win = crop_window(64, 64, 32, 32)
    assert win.fold_rows and win.fold_cols and win.nyquist_row is None
    assert list(win.m[:3]) == [0, 1, 2] and win.m[16] == 16 and win.m[17] == -16 and len(win.m) == 33
    same = crop_window(64, 64, 64, 64)
    assert not same.fold_rows and same.nyquist_row == 32 and same.nyquist_col == 32
    odd = crop_window(64, 64, 31, 31)
    assert not odd.fold_rows and not odd.fold_cols and len(odd.m) == 31


def test_bin_real_matches_block_mean_and_sum():
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 5, size=(5, 2, 23, 31)).astype(np.uint8)
    ref = frames[..., :21, :30].astype(np.float64).reshape(5, 2, 7, 3, 10, 3).mean(axis=(3, 5))
    got = bin_real(frames, 3, chunk=3)
    assert got.shape == (5, 2, 7, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(bin_real(frames, 3, reduce="sum"), ref * 9, rtol=1e-6)
    with pytest.raises(ValueError, match=r"^bin_real needs a positive integer"):
        bin_real(frames, 2.5)


def test_downsample_plan_for_a_k3_frame():
    b, binned, coarse = downsample_plan(4092, 5760, 8.0 / (2 * 0.83))
    assert b == 2 and binned == (2016, 2880) and coarse == (840, 1200)
    assert 2880 * b / 1200 <= 8.0 / (2 * 0.83)  # the coarse pixel is never larger than asked


def test_downsample_spectra_equals_box_filtered_function_on_coarse_grid():
    # binning by b averages b samples: a wave of k cycles/px is scaled by the Dirichlet kernel and
    # centred at (b-1)/2; the Fourier crop then samples it every `scale` input px
    h, w = 120, 180
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    comps = [(1.0, 4, 3, 0.3), (0.5, -6, 5, 1.1), (0.2, 0, 0, 0.0)]
    img = waves(x, y, h, w, comps).astype(np.float32)
    d = downsample_spectra(img[None], 5.0)
    assert d.bin == 3 and d.offset == 1.0
    hc, wc = d.shape
    sy, sx = d.scale
    yc, xc = np.mgrid[0:hc, 0:wc].astype(np.float64)

    def dirichlet(k):
        return 1.0 if k == 0 else np.sin(np.pi * k * 3) / (3 * np.sin(np.pi * k))

    ref = sum(
        a
        * dirichlet(u / w)
        * dirichlet(v / h)
        * np.cos(2 * np.pi * (u * (1 + xc * sx) / w + v * (1 + yc * sy) / h) + p)
        for a, u, v, p in comps
    )
    np.testing.assert_allclose(irfft2(d.spectra, s=d.shape)[0], ref, atol=2e-6)
    imgs, scale = downsample(img[None], 5.0)
    assert scale == d.scale and imgs.shape == (1, hc, wc)


def test_taper_fades_edges_to_the_frame_mean():
    win = edge_taper(40, 60, 0.1)
    assert win.shape == (40, 60) and win[20, 30] == 1.0 and win[10, 10] == 1.0
    assert 0 < win[0, 30] < 0.05 and win[0, 30] == win[-1, 30] and win[20, 0] == win[20, -1]
    np.testing.assert_allclose(win[20, :6], 0.5 - 0.5 * np.cos(np.pi * (np.arange(6) + 0.5) / 6), rtol=1e-6)
    rng = np.random.default_rng(5)
    img = (rng.standard_normal((1, 64, 64)) + 3.0).astype(np.float32)
    d = downsample_spectra(img, 1.0, taper=0.25)
    out = irfft2(d.spectra, s=d.shape)[0]
    mean = img.mean()
    np.testing.assert_allclose(out, mean + (img[0] - mean) * edge_taper(64, 64, 0.25), atol=1e-5)
    np.testing.assert_allclose(out[20:44, 20:44], img[0, 20:44, 20:44], atol=1e-5)  # untouched inside


def test_bin_real_in_many_row_blocks_and_threaded_frames_equal_one_frame_at_a_time():
    # ~2 MiB row blocks: a 1100-px wide frame binned by 2 takes several blocks and a partial last one
    rng = np.random.default_rng(6)
    frames = rng.random((3, 1003, 1100), dtype=np.float32) * 4
    ref = frames[:, :1002, :].astype(np.float64).reshape(3, 501, 2, 550, 2).mean(axis=(2, 4))
    got = bin_real(frames, 2, chunk=1)
    assert got.shape == (3, 501, 550)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_array_equal(bin_real(frames, 2, chunk=3), got)
    # frame chunks of downsample_spectra run on threads: each frame as if alone
    d = downsample_spectra(frames, 3.1, taper=0.1)
    for t in range(3):
        np.testing.assert_array_equal(d.spectra[t], downsample_spectra(frames[t : t + 1], 3.1, taper=0.1).spectra[0])
