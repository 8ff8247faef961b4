"""Electron wavelength and the recommended particle box (Rosenthal & Henderson, JMB 333:721, 2003).

Convention: sizes in Å, pixel sizes in Å/px, defocus in Å (positive = underfocus magnitude).
"""

from __future__ import annotations

import math
from typing import Any

from gpu.fourier import next_smooth_even


def electron_wavelength(kv: float) -> float:
    """Relativistic electron wavelength (Å): ``12.2643 / sqrt(V (1 + 0.978466e-6 V))``, V in volts.

    0.03701 Å at 100 kV, 0.02508 Å at 200 kV, 0.01969 Å at 300 kV.
    """
    if kv <= 0:
        raise ValueError(f"electron_wavelength: voltage must be > 0 kV, got {kv}")
    v = kv * 1e3
    return 12.2643 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


def good_box_size(n: float) -> int:
    """Smallest even box >= ``n`` px whose only prime factors are 2, 3, 5, 7 (FFT-friendly)."""
    return next_smooth_even(math.ceil(n - 1e-9))


def recommended_box(diameter_A: float, defocus_A: float, resolution_A: float, kv: float, apix: float) -> dict[str, Any]:
    """Box that keeps the CTF-delocalised signal of a particle up to ``resolution_A``.

    ``box >= d + 2 λ Δf / r`` (Rosenthal & Henderson 2003): the signal at resolution r is spread
    by ``λ Δf / r`` on each side. Returns wavelength_A, delocalisation_A (= 2 λ Δf / r), box_A
    (the minimum), box_px_min (ceil of box_A / apix), box_px (FFT-friendly even size >= that)
    and box_px_A (box_px * apix). Example: 300 kV, r = 3 Å, Δf = 2 µm -> 2 λ Δf / r ≈ 262 Å.
    """
    for name, val in (("diameter_A", diameter_A), ("resolution_A", resolution_A), ("apix", apix)):
        if not val > 0:
            raise ValueError(f"recommended_box: {name} must be > 0, got {val}")
    if defocus_A < 0:
        raise ValueError(f"recommended_box: defocus_A must be >= 0 (magnitude), got {defocus_A}")
    lam = electron_wavelength(kv)
    deloc = 2.0 * lam * defocus_A / resolution_A
    box_a = diameter_A + deloc
    px_min = math.ceil(box_a / apix - 1e-9)
    px = good_box_size(px_min)
    return {
        "wavelength_A": lam,
        "delocalisation_A": deloc,
        "box_A": box_a,
        "box_px_min": int(px_min),
        "box_px": int(px),
        "box_px_A": px * apix,
    }
