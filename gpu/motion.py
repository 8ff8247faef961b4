"""Full-frame (rigid) motion estimation by iterative frame-versus-sum-of-others correlation.

Convention (gpu/__init__): trajectory ``s_t = (dx, dy)`` is where the specimen is in frame ``t``
relative to the reference frame (``s_ref = 0``); correcting frame ``t`` shifts it by ``-s_t``.

Method (as MotionCor2's global alignment): frames are binned to a pixel of about
``max_resolution / 2`` (integer real-space binning, then a Fourier crop; gpu/crop.py) and
transformed once. Each iteration shifts every frame by its current ``-s_t``, and correlates
it with the sum of all *other* frames (shot noise is independent between frames, so no
self-correlation peak at zero), weighted by ``exp(-B k² / 2)`` (the amplitude envelope
``exp(-B k² / 4)`` on both sides, k in 1/Å). Frame edges are the same in every raw frame, so
their wrap-around discontinuity correlates at zero raw shift and pulls every estimate towards
zero (about 1% of the drift on a 640 px frame, negligible on a K3 frame): the binned frames fade
to their mean over 10% of each side, and the ``kx = 0`` column and ``ky = 0`` row, where the
remaining edge energy concentrates, are left out of the correlation. The correction ``δ_t`` is the peak of the Fourier-interpolated correlation: a
global integer search (first iteration, or after a large update) and then Newton steps on the
exact trigonometric interpolant, whose value, gradient and Hessian at ``δ`` come from one
separable DFT (an elementwise product, one GEMM, a tiny contraction). The self term
``|A_t|²`` of ``A_t · conj(Σ_u A_u)`` is shift-invariant and precomputed, so the cross-power
of every frame against the sum of the others costs two passes. Frames are updated together (Jacobi);
iteration stops when no re-referenced shift changes by more than ``tolerance_px``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from gpu.backend import array_module, irfft2, to_numpy
from gpu.crop import downsample_spectra
from gpu.shift import ramp_factors

_NEWTON_STEPS = 6  # from the integer peak of a global search
_NEWTON_STEPS_LOCAL = 3  # from zero: the outer iterations refine further
_MAX_NEWTON_STEP = 1.0  # binned px; the peak's curvature radius is about a pixel after the B-factor
_GLOBAL_AGAIN = 0.5  # binned px; an update this large triggers a fresh global search
_TAPER = 0.1  # fraction of each side faded to the frame mean before correlation


@dataclass(frozen=True)
class BinnedMovie:
    """A movie binned for motion estimation.

    ``spectra``: ``(F, hc, wc//2+1)`` complex64 rfft of the binned frames (DC kept); ``shape``:
    ``(hc, wc)``; ``scale``: ``(sy, sx)`` movie px per binned px; ``apix``: movie Å/px;
    ``movie_shape``: ``(h, w)``.
    """

    spectra: Any
    shape: tuple[int, int]
    scale: tuple[float, float]
    apix: float
    movie_shape: tuple[int, int]

    @property
    def n_frames(self) -> int:
        return int(self.spectra.shape[0])

    @property
    def binned_apix(self) -> tuple[float, float]:
        """(y, x) pixel size of the binned frames, Å."""
        return self.apix * self.scale[0], self.apix * self.scale[1]


def bin_movie(
    frames: Any, apix: float, max_resolution_A: float = 8.0, chunk: int | None = None, taper: float = _TAPER
) -> BinnedMovie:
    """Bin ``frames (F, h, w)`` so that Nyquist ≈ ``max_resolution_A`` (never coarser) and FFT them.

    ``chunk``: frames per pass (default 1 on the CPU, where it is fastest, 8 on the GPU).
    ``taper``: fraction of each side over which the binned frames fade to their mean (module doc).
    """
    if frames.ndim != 3:
        raise ValueError(f"gpu/motion.py: frames must be (F, h, w), got shape {tuple(frames.shape)}")
    if apix <= 0 or max_resolution_A <= 0:
        raise ValueError(f"gpu/motion.py: apix and max_resolution_A must be > 0 (got {apix}, {max_resolution_A})")
    if chunk is None:
        chunk = 8 if array_module(frames).__name__ == "cupy" else 1
    d = downsample_spectra(frames, max_resolution_A / (2.0 * apix), chunk=chunk, taper=taper)
    return BinnedMovie(d.spectra, d.shape, d.scale, float(apix), (int(frames.shape[1]), int(frames.shape[2])))


def correlation_weights(movie: BinnedMovie, bfactor: float) -> Any:
    """``(hc, wc//2+1)`` float32: ``exp(-B k²/2)`` with the axes and Nyquist row/column set to 0."""
    xp = array_module(movie.spectra)
    hc, wc = movie.shape
    ay, ax = movie.binned_apix
    ky = np.fft.fftfreq(hc)[:, None] / ay
    kx = np.fft.rfftfreq(wc)[None, :] / ax
    wgt = np.exp(-0.5 * bfactor * (ky * ky + kx * kx))
    wgt[0, :] = 0.0
    wgt[:, 0] = 0.0
    if hc % 2 == 0:
        wgt[hc // 2, :] = 0.0
    if wc % 2 == 0:
        wgt[:, wc // 2] = 0.0
    return xp.asarray(wgt.astype(np.float32))


def _peak_newton(p: Any, start: Any, hc: int, wc: int, xp: ModuleType, steps: int, tol: float = 1e-3) -> Any:
    """Newton ascent on ``c(δ) = Σ_k m_k Re[p_k exp(+2πi k·δ)]`` per frame (``m``: rfft column
    multiplicity). ``p (F, hc, wc//2+1)``; ``start (F, 2)`` binned px -> ``(F, 2)`` float64.

    Value, gradient and Hessian at ``δ`` are ``M_ij = Σ_ky (2πi ky)^i e_y Σ_kx p (2πi kx)^j m e_x``:
    one elementwise product with ``e_x``, one GEMM against the frame-independent ``(wk, 3)``
    matrix (a single large GEMM: batched small ones hit slow BLAS paths), and a tiny contraction
    over ``ky``. Stops early once no step exceeds ``tol`` binned px.
    """
    n, _, wk = p.shape
    ky = np.fft.fftfreq(hc)
    kx = np.fft.rfftfreq(wc)
    mult = np.where(np.arange(wk) == 0, 1.0, 2.0)
    dx = xp.asarray(np.stack([mult * (2j * np.pi * kx) ** j for j in range(3)], axis=1).astype(np.complex64))
    iy = 2j * np.pi * ky
    kx_d, ky_d = xp.asarray(kx), xp.asarray(ky)
    dy = xp.asarray(np.stack([iy**0, iy, iy * iy], axis=0))  # (3, hc)
    d = xp.asarray(start, dtype=xp.float64).copy()
    q = xp.empty_like(p)
    for _ in range(steps):
        ex = xp.exp(2j * np.pi * d[:, 0:1] * kx_d[None, :]).astype(xp.complex64)  # (F, wk)
        ey = xp.exp(2j * np.pi * d[:, 1:2] * ky_d[None, :])  # (F, hc)
        xp.multiply(p, ex[:, None, :], out=q)
        t = (q.reshape(n * hc, wk) @ dx).reshape(n, hc, 3).astype(xp.complex128)
        m = xp.einsum("iy,fy,fyj->fij", dy, ey, t).real  # (F, 3, 3): [y order, x order]
        gx, gy = m[:, 0, 1], m[:, 1, 0]
        hxx, hyy, hxy = m[:, 0, 2], m[:, 2, 0], m[:, 1, 1]
        det = hxx * hyy - hxy * hxy
        concave = (hxx < 0) & (det > 0)
        safe = xp.where(concave, det, 1.0)
        nx = -(hyy * gx - hxy * gy) / safe
        ny = -(hxx * gy - hxy * gx) / safe
        gnorm = xp.sqrt(gx * gx + gy * gy)
        gsafe = xp.where(gnorm > 0, gnorm, 1.0)
        # not concave here: climb half a pixel along the gradient instead of a Newton step
        sx = xp.where(concave, nx, 0.5 * gx / gsafe)
        sy = xp.where(concave, ny, 0.5 * gy / gsafe)
        norm = xp.sqrt(sx * sx + sy * sy)
        shrink = xp.minimum(1.0, _MAX_NEWTON_STEP / xp.maximum(norm, 1e-30))
        d[:, 0] += sx * shrink
        d[:, 1] += sy * shrink
        if float(xp.max(norm * shrink)) < tol:
            break
    return d


def _peak_global(p: Any, hc: int, wc: int, max_shift: tuple[float, float], xp: ModuleType) -> Any:
    """Integer argmax ``(F, 2)`` (dx, dy) of the correlation maps ``irfft2(p)`` within ``|δ| <= max_shift``."""
    c = irfft2(p, s=(hc, wc))
    my = np.abs(np.fft.fftfreq(hc, 1.0 / hc))[:, None] <= max_shift[1]
    mx = np.abs(np.fft.fftfreq(wc, 1.0 / wc))[None, :] <= max_shift[0]
    allowed = xp.asarray(my & mx)
    c = xp.where(allowed[None], c, -xp.inf)
    flat = xp.argmax(c.reshape(c.shape[0], -1), axis=1)
    iy, ix = flat // wc, flat % wc
    iy = xp.where(iy > hc // 2, iy - hc, iy)
    ix = xp.where(ix > wc // 2, ix - wc, ix)
    return xp.stack([ix, iy], axis=1).astype(xp.float64)


def estimate_frame_shifts(
    frames: Any,
    apix: float,
    max_resolution_A: float = 8.0,
    bfactor: float = 500.0,
    iterations: int = 10,
    tolerance_px: float = 0.01,
    reference_frame: int = -1,
    max_shift_px: float | None = None,
) -> np.ndarray:
    """Full-frame trajectory ``(F, 2)`` float64 (dx, dy) in movie px, host NumPy.

    ``frames``: ``(F, h, w)`` float32 (NumPy or CuPy) or a :class:`BinnedMovie` from
    :func:`bin_movie` (reuse it for :func:`aligned_sum`; its binning then overrides ``apix`` and
    ``max_resolution_A``). ``reference_frame`` -1 = ``F // 2``.
    ``max_shift_px``: largest frame-vs-others offset searched globally (movie px; default a
    quarter of the frame). Converges to < 0.01 px on noise-free data; see the module doc.
    """
    movie = frames if isinstance(frames, BinnedMovie) else bin_movie(frames, apix, max_resolution_A)
    xp = array_module(movie.spectra)
    n = movie.n_frames
    ref = n // 2 if reference_frame == -1 else int(reference_frame)
    if not 0 <= ref < n:
        raise ValueError(f"gpu/motion.py: reference_frame {reference_frame} is outside 0..{n - 1}")
    if n < 2:
        return np.zeros((n, 2), dtype=np.float64)
    hc, wc = movie.shape
    sy, sx = movie.scale
    if max_shift_px is None:
        max_shift = (wc / 4.0, hc / 4.0)
    else:
        max_shift = (max_shift_px / sx, max_shift_px / sy)
    wgt = correlation_weights(movie, bfactor)
    # |A_t|² does not change with the shift: the self term of A_t · conj(Σ_u A_u) is fixed
    power = (movie.spectra.real**2 + movie.spectra.imag**2) * wgt
    scale = xp.asarray([sx, sy])
    s = xp.zeros((n, 2), dtype=xp.float64)
    search = True
    p = xp.empty_like(movie.spectra)
    for _ in range(max(1, iterations)):
        ey, ex = ramp_factors(-s, hc, wc, True, xp)
        xp.multiply(movie.spectra, ey, out=p)
        p *= ex
        total_w = xp.conj(p.sum(axis=0)) * wgt
        p *= total_w[None]
        p -= power  # = A_t conj(Σ_{u≠t} A_u) w: frame against the sum of the others
        if search:
            delta = _peak_newton(p, _peak_global(p, hc, wc, max_shift, xp), hc, wc, xp, _NEWTON_STEPS)
        else:
            delta = _peak_newton(p, xp.zeros((n, 2)), hc, wc, xp, _NEWTON_STEPS_LOCAL)
        s = s + delta
        s = s - s[ref]
        change = float(xp.max(xp.abs((delta - delta[ref]) * scale)))
        search = float(xp.max(xp.abs(delta - delta[ref]))) > _GLOBAL_AGAIN
        if change < tolerance_px:
            break
    return to_numpy(s * scale).astype(np.float64)


def aligned_sum(
    frames: Any,
    shifts: Any,
    apix: float | None = None,
    max_resolution_A: float = 8.0,
) -> tuple[Any, float]:
    """Motion-corrected sum at the binned scale: ``(image (hc, wc) float32, factor)``.

    ``frames``: a :class:`BinnedMovie` (preferred: no second binning) or ``(F, h, w)`` frames
    (then ``apix`` is required and they are binned as in :func:`bin_movie`). ``shifts (F, 2)``
    movie px (trajectory convention); frame ``t`` is shifted by ``-s_t``. ``factor`` is the mean
    of the (y, x) binning factors, movie px per image px (they differ by < 1%). The image is
    the sum of the frames (not the mean); its edges fade to the mean over the taper width of
    :func:`bin_movie` (10% of each side) and wrap around.
    """
    if isinstance(frames, BinnedMovie):
        movie = frames
    else:
        if apix is None:
            raise ValueError("gpu/motion.py: aligned_sum needs apix when given raw frames")
        movie = bin_movie(frames, apix, max_resolution_A)
    xp = array_module(movie.spectra)
    sh = xp.asarray(shifts, dtype=xp.float64)
    if tuple(sh.shape) != (movie.n_frames, 2):
        raise ValueError(f"gpu/motion.py: shifts must be ({movie.n_frames}, 2), got {tuple(sh.shape)}")
    sy, sx = movie.scale
    binned = sh / xp.asarray([sx, sy])
    hc, wc = movie.shape
    ey, ex = ramp_factors(-binned, hc, wc, True, xp)
    total = ((movie.spectra * ey) * ex).sum(axis=0)
    img = irfft2(total, s=(hc, wc)).astype(xp.float32, copy=False)
    return img, 0.5 * (sx + sy)
