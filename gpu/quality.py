"""Reference-free quality signal for local motion correction, per movie.

Idea: frames of the same particle carry the same signal and independent noise, so anything that
aligns them better raises their correlation. Two pitfalls, and how they are avoided:

* In-sample bias: trajectories fitted to some frames also align those frames' *noise*, so the
  correlation of the very frames they were fitted to rises even where there is no motion at all
  (``tests/test_quality_signal.py`` shows it). The signal is therefore computed on held-out
  frames: trajectories fitted to the even alignment frames are scored on the odd ones and vice
  versa (:func:`gpu.local.cross_validate`); no scored frame took part in the fit it scores.
* Insensitivity of a plain band-averaged FRC: at low resolution the FRC of two half-sums is close
  to 1 and barely moves, at 8-10 Å it is dominated by noise, so sub-Å improvements hardly show
  (on simulated sessions it missed clear gains). :func:`heldout_signal` instead uses the
  SNR-weighted cross-frame correlation of the alignment likelihood (:mod:`gpu.local_model`):
  ``gain = Σ_p ΔL_p / Σ_p L0_p``, the relative increase of the weighted correlation between
  held-out frames (0.01 = 1 % more coherent signal), with a z-score from the spread of the
  per-particle gains. Positive = local correction helped; it agreed in sign with the
  ground-truth score in the benchmarks (BENCHMARKS.md).

:func:`evenodd_frc` / :func:`evenodd_gain` (in-sample, biased) and :func:`heldout_frc` (held-out
FRC between interleaved quarters of the frames) are kept for comparison and diagnostics.

The pooled Fourier ring correlation itself (Saxton & Baumeister 1982; van Heel 1987), summed over
all particles before the ratio is taken, is implemented once here: :func:`pooled_ring_sums`,
:func:`ring_frc`, :func:`band_frc`; :func:`image_ring_sums` scores image stacks against references
(``lmc demo`` and ``benchmarks/quality.py`` against the simulation's truth).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu import backend
from gpu.local_model import BandSpectra, aligned_sums


def pooled_ring_sums(a: Any, b: Any, ring: np.ndarray, inside: np.ndarray, weight: np.ndarray, n_rings: int) -> np.ndarray:
    """The pooled Fourier ring correlation's three sums per ring, over all particles:
    ``(3, n_rings)`` float64 = ``Σ w Re(a b*)``, ``Σ w |a|²``, ``Σ w |b|²``.

    ``a``, ``b``: (P, ny, nx) spectra (numpy or cupy) on any rfft half plane; ``ring``: (ny, nx)
    ring index of each coefficient; ``inside``: (ny, nx) bool, the coefficients counted;
    ``weight``: (nx,) or (ny, nx), how many full-plane coefficients each half-plane one stands for
    (itself and its conjugate twin), or any multiple of that. Sums of several movies add up, so
    a pooled FRC over a whole data set is the FRC of the summed sums (:func:`ring_frc`).
    """
    xp = backend.array_module(a)
    planes = ((a * xp.conj(b)).real.sum(axis=0), (xp.abs(a) ** 2).sum(axis=0), (xp.abs(b) ** 2).sum(axis=0))
    w = np.broadcast_to(np.asarray(weight, np.float64), ring.shape)
    return np.stack([
        np.bincount(ring[inside], (backend.to_numpy(p).astype(np.float64) * w)[inside], n_rings)[:n_rings]
        for p in planes
    ])


def ring_frc(sums: np.ndarray) -> np.ndarray:
    """Per-ring FRC ``Σ Re(a b*) / sqrt(Σ|a|² Σ|b|²)`` from :func:`pooled_ring_sums`; NaN where a
    ring has no coefficient (or no power)."""
    num, pa, pb = sums
    den = pa * pb
    out = np.full(num.shape, np.nan)
    np.divide(num, np.sqrt(den, where=den > 0, out=np.zeros_like(den)), out=out, where=den > 0)
    return out


def band_frc(sums: np.ndarray) -> float:
    """The FRC averaged over the rings of :func:`pooled_ring_sums` that hold a coefficient (NaN if none)."""
    frc = ring_frc(sums)
    ok = np.isfinite(frc)
    return float(np.mean(frc[ok])) if ok.any() else float("nan")


def image_ring_sums(images: Any, refs: Any, apix: float, band_A: tuple[float, float]) -> np.ndarray:
    """:func:`pooled_ring_sums` of two image stacks ``(n, b, b)`` (e.g. extracted particles against
    noise-free references), over the rings of the resolution band ``band_A`` = (low, high) Å.

    Ring ``r`` holds the frequencies with ``round(|k| b) = r`` (k in cycles/px, resolution
    ``b·apix/r`` Å); returns ``(3, b // 2 + 2)``, zero outside the band.
    """
    b = images.shape[-1]
    x = backend.rfft2(backend.array_module(images).asarray(images, np.float32))
    y = backend.rfft2(backend.array_module(refs).asarray(refs, np.float32))
    ring = np.rint(np.hypot(np.fft.fftfreq(b)[:, None], np.fft.rfftfreq(b)[None, :]) * b).astype(np.int64)
    res = np.divide(b * apix, ring.astype(np.float64), out=np.full(ring.shape, np.inf), where=ring > 0)
    n = b // 2 + 2
    inside = (res <= band_A[0]) & (res >= band_A[1]) & (ring < n)
    # each rfft column other than 0 and b/2 stands for itself and its conjugate twin
    twin = np.full(x.shape[-1], 2.0)
    twin[0] = 1.0
    if b % 2 == 0:
        twin[-1] = 1.0
    return pooled_ring_sums(x, y, ring, inside, twin, n)


def shell_frc(a: Any, b: Any, shell: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Per-shell FRC pooled over particles: ``Σ Re(a b*) / sqrt(Σ|a|² Σ|b|²)``.

    ``a``, ``b``: (P, ny, nx) spectra on the cropped rfft half plane of :class:`BandSpectra`
    (``ky = -n..n``, ``kx = 0..n``); ``shell``, ``band``: (ny, nx). The ``kx = 0`` column holds
    both members of each conjugate pair and is weighted ½, so the result equals the full-plane
    FRC. Returns (n_shell,) float64, NaN where a shell has no in-band coefficient.
    """
    half = np.ones(shell.shape[-1])
    half[0] = 0.5
    return ring_frc(pooled_ring_sums(a, b, shell, band, half, int(shell.max()) + 1))


def split_frc(spec: BandSpectra, d: np.ndarray, set_a: Any, set_b: Any) -> float:
    """Band-averaged FRC between the sums of frames ``set_a`` and ``set_b`` (positions in
    ``spec.frames``) after aligning by local shifts d (P, F, 2) px (movie frames)."""
    a, b = aligned_sums(spec, spec.xp.asarray(d[:, spec.frames]), [set_a, set_b])
    return float(np.nanmean(shell_frc(a, b, spec.shell, spec.band)))


def evenodd_frc(spec: BandSpectra, d: np.ndarray) -> float:
    """In-sample band-averaged FRC between even- and odd-frame sums under local shifts d (P, F, 2)."""
    idx = np.arange(len(spec.frames))
    return split_frc(spec, d, idx[0::2], idx[1::2])


def evenodd_gain(spec: BandSpectra, d: np.ndarray) -> float:
    """In-sample even/odd FRC under d minus under d = 0 (biased upwards when d was fitted to these frames)."""
    return evenodd_frc(spec, d) - evenodd_frc(spec, np.zeros_like(d))


def heldout_signal(gain: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """The per-movie quality signal from held-out per-particle scores (:func:`gpu.local.cross_validate`).

    ``gain``: (P,) held-out log-likelihood gain of the local trajectories over full-frame;
    ``base``: (P,) held-out cross-frame term at full-frame. Returns ``{"gain": Σ gain / Σ base,
    "z": Σ gain / (sqrt(P)·std(gain))}``: the relative increase of the SNR-weighted correlation
    between frames that the fit never saw (0.05 = 5 % more coherent signal), and its significance.
    """
    total = float(np.sum(gain))
    ref = float(np.sum(base))
    se = float(np.sqrt(len(gain)) * np.std(gain, ddof=1)) if len(gain) > 1 else 0.0
    return {
        "gain": round(total / ref, 6) if ref > 0 else 0.0,
        "z": round(total / se, 3) if se > 0 else 0.0,
    }


def heldout_frc(spec: BandSpectra, d_even_fit: np.ndarray, d_odd_fit: np.ndarray, even: Any, odd: Any) -> dict[str, float]:
    """Held-out even/odd FRC gain (module docstring).

    ``d_even_fit``: (P, F, 2) shifts fitted on alignment-frame positions ``even`` only, scored on
    ``odd`` (halves ``odd[0::2]`` vs ``odd[1::2]``); ``d_odd_fit`` vice versa. Returns
    ``{"frc_fullframe", "frc_local", "frc_gain"}`` averaged over the two folds.
    """
    even = np.asarray(even)
    odd = np.asarray(odd)
    zero = np.zeros_like(d_even_fit)
    ff = loc = 0.0
    for d, test in ((d_even_fit, odd), (d_odd_fit, even)):
        a, b = test[0::2], test[1::2]
        ff += split_frc(spec, zero, a, b) / 2.0
        loc += split_frc(spec, d, a, b) / 2.0
    return {"frc_fullframe": round(ff, 6), "frc_local": round(loc, 6), "frc_gain": round(loc - ff, 6)}
