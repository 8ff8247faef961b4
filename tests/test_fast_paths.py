"""The speed-motivated code paths equal their plain reference computations."""

from __future__ import annotations

import numpy as np
import pytest

from gpu import backend
from gpu.crop import crop_window, window_rfft, window_rfft2
from gpu.gain import apply_gain


@pytest.mark.parametrize(("h", "w", "h2", "w2"), [(64, 64, 32, 32), (60, 90, 30, 44), (64, 48, 64, 48), (65, 63, 33, 31)])
def test_window_rfft2_equals_window_of_full_rfft2(h: int, w: int, h2: int, w2: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, h, w)).astype(np.float32)
    win = crop_window(h, w, h2, w2)
    ref = window_rfft(np.fft.rfft2(images.astype(np.float64)), win)
    got = window_rfft2(images, win)
    assert got.shape == ref.shape
    assert np.allclose(got, ref, atol=2e-3 * np.abs(ref).max())


def test_backend_1d_ffts_match_numpy() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 30, 40)).astype(np.float32)
    assert np.allclose(backend.rfft(a, axis=-1), np.fft.rfft(a, axis=-1), atol=1e-4)
    c = (a + 1j * a[:, ::-1]).astype(np.complex64)
    assert np.allclose(backend.fft(c, axis=-2), np.fft.fft(c, axis=-2), atol=1e-3)
    assert backend.rfft(a).dtype == np.complex64  # float32 stays single precision


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.float16, np.float32])
def test_apply_gain_into_a_reused_buffer(dtype: type) -> None:
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 5, size=(5, 37, 53)).astype(dtype)
    gain = (1 + 0.1 * rng.standard_normal((37, 53))).astype(np.float32)
    expected = frames.astype(np.float64) * gain
    buf = np.full((5, 37, 53), np.nan, np.float32)
    got = apply_gain(frames, gain, out=buf)
    assert got is buf  # written in place, no new movie-sized allocation
    assert np.allclose(got, expected, rtol=1e-6)
    again = apply_gain(frames[::-1].copy(), gain, out=buf)  # a second movie through the same buffer
    assert np.allclose(again, expected[::-1], rtol=1e-6)
    assert np.array_equal(apply_gain(frames, None), frames.astype(np.float32))
