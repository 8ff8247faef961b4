"""Frequency grids, radial frequency, B-factor envelopes and band masks.

Convention (gpu/__init__): frequencies are cycles/px from ``fftfreq`` (rows, and columns of a full
FFT) or ``rfftfreq`` (columns of an ``rfft2`` half-plane); divide by the pixel size for 1/Å.

Grids are returned *broadcastable*, ``ky`` as ``(h, 1)`` and ``kx`` as ``(1, wk)``, so a full
``(h, wk)`` array is only built when asked for (``radial_freq``, envelopes, masks).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

_SMOOTH_PRIMES = (2, 3, 5, 7)


def rfft_width(w: int) -> int:
    """Columns of the ``rfft2`` half-plane of a width-``w`` image: ``w // 2 + 1``."""
    return w // 2 + 1


def freq_grid(h: int, w: int, rfft: bool = True, xp: ModuleType = np) -> tuple[Any, Any]:
    """``(ky (h, 1), kx (1, wk))`` float32 in cycles/px; ``wk = w//2+1`` for ``rfft`` else ``w``.

    ``ky = fftfreq(h)``, ``kx = rfftfreq(w)`` (or ``fftfreq(w)``). For even sizes the Nyquist
    row is at ``-0.5`` (index ``h//2``); the rfft Nyquist column is at ``+0.5`` (index ``w//2``).
    """
    ky = np.fft.fftfreq(h).astype(np.float32)[:, None]
    kx = (np.fft.rfftfreq(w) if rfft else np.fft.fftfreq(w)).astype(np.float32)[None, :]
    return xp.asarray(ky), xp.asarray(kx)


def radial_freq(h: int, w: int, rfft: bool = True, apix: float | None = None, xp: ModuleType = np) -> Any:
    """``|k| (h, wk)`` float32: cycles/px, or 1/Å when ``apix`` (Å/px) is given (``|k| / apix``)."""
    ky, kx = freq_grid(h, w, rfft, xp)
    k = xp.sqrt(ky * ky + kx * kx)
    if apix is not None:
        k = k / np.float32(apix)
    return k.astype(xp.float32)


def bfactor_envelope(h: int, w: int, apix: float, bfactor: float, rfft: bool = True, xp: ModuleType = np) -> Any:
    """Amplitude envelope ``exp(-B k² / 4)`` ``(h, wk)`` float32, k in 1/Å, B in Å².

    This is the amplitude (not power) convention of MotionCor / alignparts: applying it to two
    images and correlating them weights the cross-power by ``exp(-B k² / 2)``.
    """
    k = radial_freq(h, w, rfft, apix, xp)
    return xp.exp(-np.float32(bfactor / 4.0) * k * k).astype(xp.float32)


def band_mask(
    h: int,
    w: int,
    apix: float,
    low_A: float | None = None,
    high_A: float | None = None,
    rfft: bool = True,
    xp: ModuleType = np,
) -> Any:
    """Bool ``(h, wk)``: True where ``1/low_A <= |k| <= 1/high_A`` (k in 1/Å; None = no limit).

    ``low_A`` is the lowest resolution kept (largest spacing, Å), ``high_A`` the highest.
    """
    k = radial_freq(h, w, rfft, apix, xp)
    mask = xp.ones(k.shape, dtype=bool)
    if low_A is not None:
        mask &= k >= np.float32(1.0 / low_A)
    if high_A is not None:
        mask &= k <= np.float32(1.0 / high_A)
    return mask


def rfft_multiplicity(w: int, xp: ModuleType = np) -> Any:
    """``(1, wk)`` float32: how often each rfft column occurs in the full spectrum.

    1 for ``kx = 0`` and (even ``w``) the Nyquist column, 2 otherwise, so that a sum over the full
    plane of a Hermitian quantity equals ``Σ multiplicity * value`` over the half-plane.
    """
    m = np.full(rfft_width(w), 2.0, dtype=np.float32)
    m[0] = 1.0
    if w % 2 == 0:
        m[-1] = 1.0
    return xp.asarray(m[None, :])


def is_smooth(n: int) -> bool:
    """True when ``n`` has no prime factor other than 2, 3, 5, 7 (fast for every FFT library)."""
    if n < 1:
        return False
    for p in _SMOOTH_PRIMES:
        while n % p == 0:
            n //= p
    return n == 1


def next_smooth_even(n: int) -> int:
    """Smallest even ``m >= n`` whose only prime factors are 2, 3, 5, 7."""
    m = max(2, int(np.ceil(n)))
    m += m % 2
    while not is_smooth(m):
        m += 2
    return m


def prev_smooth_even(n: int) -> int:
    """Largest even ``m <= n`` (``m >= 2``) whose only prime factors are 2, 3, 5, 7."""
    m = int(np.floor(n))
    m -= m % 2
    while m > 2 and not is_smooth(m):
        m -= 2
    if m < 2:
        raise ValueError(f"prev_smooth_even: no even FFT size <= {n}")
    return m
