"""Sub-pixel shifts by Fourier phase ramps.

Convention (gpu/__init__): shifting an image's content by ``+s = (dx, dy)`` multiplies its
(unnormalised, forward) transform by ``exp(-2πi (kx dx + ky dy))``, k in cycles/px.

Nyquist choice: for an even size the Nyquist frequency ±0.5 is a single bin shared by ``+0.5`` and
``-0.5``, whose phase factors ``exp(∓iπ d)`` disagree unless ``d`` is an integer. We use their
average, ``cos(π d)``, on the Nyquist row (even ``h``) and column (even ``w``). This keeps real
input real (the product stays Hermitian), is exact (= ``np.roll``) for integer shifts, and
equals the shift of the trigonometric interpolant whose Nyquist term is a cosine.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from gpu.backend import array_module, irfft2, rfft2


def ramp_1d(d: Any, k: Any, nyquist_index: int | None = None, xp: ModuleType | None = None) -> Any:
    """``exp(-2πi k d)`` as ``(..., n)`` complex64 for displacements ``d (...)`` and frequencies ``k (n,)``.

    ``nyquist_index``: position in ``k`` of a shared ±0.5 Nyquist bin, which gets ``cos(π d)``.
    Phases are formed in float64 (shifts of ~100 px times k ~ 0.5 lose digits in float32).
    """
    xp = xp or array_module(d)
    d = xp.asarray(d, dtype=xp.float64)[..., None]
    k = xp.asarray(k, dtype=xp.float64)
    phase = (-2.0 * np.pi) * d * k
    out = xp.cos(phase) + 1j * xp.sin(phase)
    if nyquist_index is not None:
        out[..., nyquist_index] = xp.cos(np.pi * d[..., 0])
    return out.astype(xp.complex64)


def ramp_factors(shifts: Any, h: int, w: int, rfft: bool = True, xp: ModuleType | None = None) -> tuple[Any, Any]:
    """Separable factors ``(ey (..., h, 1), ex (..., 1, wk))`` whose product is :func:`phase_ramp`.

    Multiplying a spectrum by ``ey`` and ``ex`` in turn avoids building the full ramp.
    """
    xp = xp or array_module(shifts)
    shifts = xp.asarray(shifts)
    if shifts.shape[-1:] != (2,):
        raise ValueError(f"ramp_factors: shifts must have shape (..., 2), got {tuple(shifts.shape)}")
    ky = np.fft.fftfreq(h)
    kx = np.fft.rfftfreq(w) if rfft else np.fft.fftfreq(w)
    ny = h // 2 if h % 2 == 0 else None
    nx = w // 2 if w % 2 == 0 else None
    ey = ramp_1d(shifts[..., 1], xp.asarray(ky), ny, xp)[..., :, None]
    ex = ramp_1d(shifts[..., 0], xp.asarray(kx), nx, xp)[..., None, :]
    return ey, ex


def phase_ramp(shifts: Any, h: int, w: int, rfft: bool = True, xp: ModuleType | None = None) -> Any:
    """``(..., h, wk)`` complex64 ``exp(-2πi (kx dx + ky dy))`` for ``shifts (..., 2) = (dx, dy)`` px.

    ``wk = w//2+1`` for the rfft layout, ``w`` for a full FFT. Nyquist terms: ``cos(π d)`` (module doc).
    """
    ey, ex = ramp_factors(shifts, h, w, rfft, xp)
    return ey * ex


def shift_spectrum(spectra: Any, shifts: Any, w: int) -> Any:
    """Shift the content of rfft spectra ``(..., h, w//2+1)`` by ``shifts (..., 2)`` px (new array)."""
    xp = array_module(spectra)
    h = spectra.shape[-2]
    if spectra.shape[-1] != w // 2 + 1:
        raise ValueError(f"shift_spectrum: spectra have {spectra.shape[-1]} columns, expected {w // 2 + 1} for w={w}")
    ey, ex = ramp_factors(xp.asarray(shifts), h, w, True, xp)
    out = spectra * ey
    out *= ex
    return out


def fourier_shift(images: Any, shifts: Any) -> Any:
    """Shift the content of real ``images (..., h, w)`` by ``shifts (..., 2) = (dx, dy)`` px (periodic).

    ``out(x) = images(x - s)``. Returns float32 ``(..., h, w)``; leading dims broadcast.
    """
    xp = array_module(images)
    images = xp.asarray(images, dtype=xp.float32)
    h, w = images.shape[-2:]
    spec = shift_spectrum(rfft2(images), xp.asarray(shifts), w)
    return irfft2(spec, s=(h, w)).astype(xp.float32, copy=False)
