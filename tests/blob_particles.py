"""Synthetic particle patches for the per-particle tests: compact random blobs (contrast ~0.3) seen
as Poisson counts (~2 counts/px/frame) after a known sub-pixel motion per particle and frame."""

from __future__ import annotations

import numpy as np

from gpu.shift import fourier_shift


def compact_blobs(rng: np.random.Generator, p: int, box: int) -> np.ndarray:
    """(p, box, box) smooth random blobs under a 7 px Gaussian window, scaled to contrast 0.3."""
    k2 = np.fft.fftfreq(box)[:, None] ** 2 + np.fft.rfftfreq(box)[None, :] ** 2
    blobs = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((p, box, box))) * np.exp(-k2 / (2 * 0.08**2)), s=(box, box))
    yy, xx = np.mgrid[0:box, 0:box] - box // 2
    blobs *= np.exp(-(xx**2 + yy**2) / (2 * 7.0**2))
    return blobs * (0.3 / blobs.std())


def counted_moving(rng: np.random.Generator, blobs: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """(p, F, box, box) float32 Poisson counts of ``blobs`` (p, box, box) moved by ``shifts_px`` (p, F, 2)."""
    f = shifts_px.shape[1]
    moved = fourier_shift(np.repeat(blobs[:, None], f, axis=1).astype(np.float32), shifts_px.astype(np.float32))
    return rng.poisson(2.0 * np.clip(1.0 + moved, 0, None)).astype(np.float32)
