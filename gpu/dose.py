"""Exposure (dose) weighting after Grant & Grigorieff, eLife 4:e06980 (2015).

Critical exposure at spatial frequency k (1/Å), 300 kV::

    Ne(k) = 0.24499 * k**-1.6649 + 2.8141          (e/Å²)

Voltage: we follow cisTEM and scale Ne itself, ``Ne(k, V) = Ne300(k) * v(V)`` with v = 1.0 at
300 kV, 0.8 at 200 kV and 0.532 at 100 kV, linear between those points and held constant
outside them (lower voltage -> more damage per e/Å² -> smaller critical exposure).

Frame ``f`` (0-based) has received ``N_f = pre_exposure + dose_per_frame * (f + 1)`` e/Å² at its
end (RELION, MotionCor3). Its weight is ``q_f(k) = exp(-N_f / (2 Ne(k)))`` and the weights are
normalised per frequency so that ``Σ_f q_f(k)² = 1`` (the weighted sum keeps the noise power per
frequency). DC (k = 0) has Ne = ∞, so it gets equal weights ``1/sqrt(F)``.

Alignment uncertainty (optional, ``frame_bfactors``): a frame whose position is known only to a
random error ``u`` (2-D, per-axis variance ``σ²``) reaches the aligned sum with its signal multiplied,
in expectation, by the characteristic function of that error, ``E[e^{-2πi k·u}] = exp(-2π²σ²k²)`` —
a temperature factor ``exp(-B k²/4)`` with ``B = 8π²σ²`` (the Debye–Waller relation; per-frame
B-factors as in Scheres, eLife 3:e03665, 2014). The optimal (matched-filter) weight of a frame is its
expected signal amplitude over its noise, so each frame's weight is multiplied by that factor before
the normalisation: ``q_f(k) = exp(-N_f / (2 Ne(k))) · exp(-B_f k² / 4)``. :func:`alignment_bfactor`
turns a trajectory's posterior standard deviation (both axes, ``sqrt(var_x + var_y)``) into ``B_f``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from gpu.backend import array_module

_A, _B, _C = 0.24499, -1.6649, 2.8141
_KV = (100.0, 200.0, 300.0)
_KV_FACTOR = (0.532, 0.8, 1.0)


def voltage_factor(kv: float) -> float:
    """Multiplier of the 300 kV critical exposure at ``kv`` (cisTEM's 0.8 / 0.532 points)."""
    return float(np.interp(kv, _KV, _KV_FACTOR))


def critical_exposure(k: Any, kv: float = 300.0) -> Any:
    """Ne(k) in e/Å² for spatial frequency ``k`` (1/Å, any shape); ``inf`` at k = 0."""
    xp = array_module(k)
    k = xp.asarray(k, dtype=xp.float64)
    with np.errstate(divide="ignore"):
        ne = xp.where(k > 0, _A * xp.power(xp.maximum(k, 1e-30), _B) + _C, xp.inf)
    return ne * voltage_factor(kv)


def cumulative_exposure(n_frames: int, dose_per_frame: float, pre_exposure: float = 0.0) -> np.ndarray:
    """(F,) exposure at the end of each frame: ``pre + dose * (f + 1)``."""
    return pre_exposure + dose_per_frame * (np.arange(n_frames, dtype=np.float64) + 1.0)


def alignment_bfactor(sd: Any) -> np.ndarray:
    """Per-frame B-factor (Å²) of an alignment error with standard deviation ``sd`` (Å, both axes:
    ``sd² = var_x + var_y``, isotropic): ``B = 8π² σ²`` with the per-axis ``σ² = sd² / 2``."""
    return 4.0 * np.pi**2 * np.square(np.asarray(sd, dtype=np.float64))


def dose_weights(
    k: Any,
    n_frames: int,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    kv: float = 300.0,
    normalize: bool = True,
    xp: ModuleType = np,
    frame_bfactors: Any = None,
) -> Any:
    """Weights ``(F, ...)`` for frequency magnitudes ``k`` (1/Å, shape ``(...)``), float32.

    ``q_f(k) = exp(-N_f / (2 Ne(k)))``, times ``exp(-B_f k² / 4)`` with ``frame_bfactors`` ``(F,)`` Å²
    (the alignment uncertainty, module doc), normalised so ``Σ_f q_f(k)² = 1`` when ``normalize``.
    """
    k = xp.asarray(k, dtype=xp.float64)
    ne = critical_exposure(k, kv)
    n = xp.asarray(cumulative_exposure(n_frames, dose_per_frame, pre_exposure))
    n = n.reshape((n_frames,) + (1,) * k.ndim)
    q = xp.exp(-n / (2.0 * ne[None]))
    if frame_bfactors is not None:
        b = np.asarray(frame_bfactors, dtype=np.float64)
        if b.shape != (n_frames,) or not np.all(np.isfinite(b)) or np.any(b < 0):
            raise ValueError(f"dose_weights: frame_bfactors must be ({n_frames},) finite and >= 0, got {b.shape}")
        q = q * xp.exp(-xp.asarray(b).reshape(n.shape) * (k * k)[None] / 4.0)
    if normalize:
        q = q / xp.sqrt(xp.sum(q * q, axis=0, keepdims=True))
    return q.astype(xp.float32)


def optimal_exposure(k: Any, kv: float = 300.0) -> Any:
    """Exposure maximising SNR at ``k``: 2.51284 * Ne(k) (Grant & Grigorieff)."""
    return 2.51284 * critical_exposure(k, kv)
