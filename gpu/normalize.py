"""Background normalisation of particle images (RELION convention).

Convention (gpu/__init__): the box centre is pixel ``b // 2``; the background is every pixel at
distance ``r > radius`` from it. RELION's default background radius is ``ROUND(0.375 * box)``
(a circle of 75% of the box diameter, ``relion_preprocess --bg_radius -1``), in pixels of the
box being normalised (after any Fourier cropping).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu.backend import array_module


def default_bg_radius(box: int) -> int:
    """RELION's default background radius: ``ROUND(0.375 * box)`` px (halves round up, as RELION's ROUND)."""
    return int(np.floor(0.375 * box + 0.5))


def background_mask(box: int, radius_px: float, xp: Any = np) -> Any:
    """Bool ``(box, box)``: True outside the circle of ``radius_px`` about pixel ``(box//2, box//2)``."""
    c = box // 2
    y = np.arange(box)[:, None] - c
    x = np.arange(box)[None, :] - c
    return xp.asarray((x * x + y * y) > radius_px * radius_px)


def normalize_background(
    particles: Any,
    radius_px: float | None = None,
    invert: bool = False,
    ramp: bool = False,
    normalize: bool = True,
) -> Any:
    """Zero mean, unit std of the background of ``particles (..., b, b)``; float32, new array.

    ``radius_px`` None -> :func:`default_bg_radius`. ``ramp``: subtract the least-squares plane
    ``a + b x + c y`` fitted to the background (RELION's default) instead of its mean; the std is
    then that of the residual. The std is the population std (ddof 0); a constant background
    (std 0) is only mean-subtracted. ``invert`` multiplies the result by -1 (dark protein -> white).
    ``normalize`` False: no normalisation at all, only the optional inversion.
    """
    xp = array_module(particles)
    p = xp.asarray(particles, dtype=xp.float32)
    if p.ndim < 2 or p.shape[-2] != p.shape[-1]:
        raise ValueError(f"normalize_background: particles must be (..., b, b), got shape {tuple(p.shape)}")
    b = p.shape[-1]
    if not normalize:
        return p * np.float32(-1.0 if invert else 1.0)
    radius = default_bg_radius(b) if radius_px is None else float(radius_px)
    idx = np.flatnonzero(background_mask(b, radius))
    if idx.size < 3:
        raise ValueError(f"normalize_background: background radius {radius} leaves {idx.size} pixels in a {b} px box")
    vals = p.reshape((*p.shape[:-2], b * b))[..., xp.asarray(idx)].astype(xp.float64)  # (..., n_bg)
    if ramp:
        c = b // 2
        gy, gx = np.divmod(np.arange(b * b), b)
        basis = np.stack([np.ones(b * b), gx - c, gy - c])  # (3, b*b): plane a + b x + c y
        pinv = np.linalg.pinv(basis[:, idx].T)  # (3, n_bg)
        coef = vals @ xp.asarray(pinv.T)  # (..., 3)
        std = (vals - coef @ xp.asarray(basis[:, idx])).std(axis=-1)
        level = (coef @ xp.asarray(basis)).reshape((*p.shape[:-2], b, b))
        out = p - level.astype(xp.float32)
    else:
        std = vals.std(axis=-1)
        out = p - vals.mean(axis=-1)[..., None, None].astype(xp.float32)
    std = xp.where(std > 0, std, 1.0).astype(xp.float32)
    out /= std[..., None, None]
    if invert:
        out *= np.float32(-1.0)
    return out
