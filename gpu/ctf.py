"""Contrast transfer function (CTF) in RELION's convention.

RELION (``src/ctf.h``, ``src/ctf.cpp``) computes, with defocus positive for underfocus,
``γ = -π λ Δf(θ) k² + (π/2) Cs λ³ k⁴ - φ - atan(A / sqrt(1 - A²))`` and ``CTF = -sin γ``.
Written with the aberration phase ``χ(k) = π λ Δf(θ) k² - (π/2) Cs λ³ k⁴ + φ`` this is::

    CTF(k) = sqrt(1 - A²) sin χ + A cos χ = sin(χ + atan(A / sqrt(1 - A²)))

so ``CTF(0) = +A`` and, underfocused, the CTF is positive at low frequency. (The brief's form
``-(sqrt(1-A²) sin χ' + A cos χ')`` with ``χ' = π λ Δf k² - π/2 Cs λ³ k⁴ - φ`` is this one with the
overall sign and the phase-shift sign flipped; we follow RELION's code.) In the weak-phase
approximation the image contrast of a specimen with projected phase ``φ_p(r)`` is
``-2 F⁻¹[φ̂_p · CTF]``: protein is dark in raw underfocused images, and RELION-style processing
inverts the contrast.

Astigmatism (RELION): ``Δf(θ) = (U + V)/2 + (U - V)/2 · cos(2 (θ - α))`` with ``θ = atan2(ky, kx)``
and ``α`` (rlnDefocusAngle) the angle from the x axis (image columns) to the U direction.
Electron wavelength (relativistic, Å): ``λ = 12.2643 / sqrt(V (1 + 0.978466e-6 V))``, V in volts.
Zeros of the CTF lie where ``χ = nπ - atan(A / sqrt(1 - A²))``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def electron_wavelength(kv: float) -> float:
    """Relativistic electron wavelength in Å at ``kv`` kilovolts (0.01969 Å at 300 kV)."""
    volts = kv * 1e3
    return float(12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts)))


def _chi(k2: Any, defocus: Any, kv: float, cs_mm: float, phase_shift_deg: Any, xp: ModuleType) -> Any:
    """Aberration phase χ (radians) for squared frequency ``k2`` (1/Å²) and defocus (Å, underfocus > 0)."""
    lam = electron_wavelength(kv)
    cs = cs_mm * 1e7
    return (
        xp.pi * lam * defocus * k2
        - 0.5 * xp.pi * cs * lam**3 * k2 * k2
        + xp.deg2rad(xp.asarray(phase_shift_deg, dtype=xp.float64))
    )


def _amplitude_phase(amplitude_contrast: float) -> float:
    if not 0.0 <= amplitude_contrast < 1.0:
        raise ValueError(f"ctf: amplitude_contrast must be in [0, 1) (got {amplitude_contrast})")
    return float(np.arctan2(amplitude_contrast, np.sqrt(1.0 - amplitude_contrast**2)))


def ctf_1d(
    k: Any,
    defocus_A: Any,
    kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    phase_shift_deg: Any = 0.0,
    xp: ModuleType = np,
) -> Any:
    """Radial (non-astigmatic) CTF at spatial frequencies ``k`` (1/Å, shape ``(...)``), float32.

    ``CTF = sin(χ + atan(A / sqrt(1 - A²)))``, ``χ = π λ Δf k² - π/2 Cs λ³ k⁴ + φ`` (RELION).
    ``defocus_A`` may be an array broadcasting against ``k``.
    """
    k = xp.asarray(k, dtype=xp.float64)
    chi = _chi(k * k, xp.asarray(defocus_A, dtype=xp.float64), kv, cs_mm, phase_shift_deg, xp)
    return xp.sin(chi + _amplitude_phase(amplitude_contrast)).astype(xp.float32)


def frequency_grid(h: int, w: int, apix: float, rfft: bool = True, xp: ModuleType = np) -> tuple[Any, Any]:
    """``(kx, ky)`` in 1/Å, each ``(h, w//2+1)`` (``rfft``) or ``(h, w)``, in FFT order."""
    fy = xp.fft.fftfreq(h).astype(xp.float64) / apix
    fx = (xp.fft.rfftfreq(w) if rfft else xp.fft.fftfreq(w)).astype(xp.float64) / apix
    ky, kx = xp.meshgrid(fy, fx, indexing="ij")
    return kx, ky


def ctf_2d(
    h: int,
    w: int,
    apix: float,
    defocus_u_A: Any,
    defocus_v_A: Any,
    angle_deg: Any,
    kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    phase_shift_deg: Any = 0.0,
    rfft: bool = True,
    xp: ModuleType = np,
) -> Any:
    """CTF on the FFT grid of an ``(h, w)`` image with pixel size ``apix`` (Å), float32.

    Defocus U/V (Å, underfocus > 0), angle (degrees) and phase shift may be scalars or arrays
    of one shape ``(...)``: the result is ``(..., h, w//2+1)`` (``rfft``) or ``(..., h, w)``,
    one CTF per entry, in unshifted FFT order (DC at ``[0, 0]``). Formula: module docstring.
    """
    kx, ky = frequency_grid(h, w, apix, rfft, xp)
    du = xp.asarray(defocus_u_A, dtype=xp.float64)
    dv = xp.asarray(defocus_v_A, dtype=xp.float64)
    ang = xp.deg2rad(xp.asarray(angle_deg, dtype=xp.float64))
    ps = xp.asarray(phase_shift_deg, dtype=xp.float64)
    lead = np.broadcast_shapes(du.shape, dv.shape, ang.shape, ps.shape)
    expand = (Ellipsis, None, None)
    du, dv, ang, ps = (xp.broadcast_to(a, lead)[expand] for a in (du, dv, ang, ps))
    theta = xp.arctan2(ky, kx)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * xp.cos(2.0 * (theta - ang))
    chi = _chi(kx * kx + ky * ky, defocus, kv, cs_mm, ps, xp)
    return xp.sin(chi + _amplitude_phase(amplitude_contrast)).astype(xp.float32)
