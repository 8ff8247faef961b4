"""Full-frame (rigid) motion estimation: frame-versus-sum-of-others correlation with a temporal prior.

Convention (gpu/__init__): trajectory ``s_t = (dx, dy)`` is where the specimen is in frame ``t``
relative to the reference frame (``s_ref = 0``); correcting frame ``t`` shifts it by ``-s_t``.

Data term (as MotionCor2's global alignment): frames are binned to a pixel of about
``max_resolution / 2`` (integer real-space binning, then a Fourier crop; gpu/crop.py) and
transformed once. Each iteration shifts every frame by its current ``-s_t`` and correlates it with
the sum of all *other* frames ``R_t`` (shot noise is independent between frames, so no
self-correlation peak at zero), weighted by ``w = exp(-B k² / 2)`` (the amplitude envelope
``exp(-B k² / 4)`` on both sides, k in 1/Å): ``c_t(δ) = Σ_k m_k Re[A_t conj(R_t) w e^{2πik·δ}]``
(``m``: rfft column multiplicity). Frame edges are the same in every raw frame, so their
wrap-around discontinuity correlates at zero raw shift and pulls every estimate towards zero: the
binned frames fade to their mean over 10% of each side, and the ``kx = 0`` column and ``ky = 0``
row, where the remaining edge energy concentrates, are left out. The self term ``|A_t|²`` of
``A_t conj(Σ_u A_u)`` is shift-invariant and precomputed, so all cross-powers cost two passes.

Calibration: ``c_t`` becomes a log-likelihood ``ℓ_t = κ_t c_t``. For a template in Gaussian noise
the log-likelihood's noise variance equals its expected peak height (score variance = Fisher
information), so ``κ_t = h / σ_t²``: ``σ_t²`` is the noise variance of ``c_t``, estimated from the
data as ``½ Σ_k m_k² w² |R_t|² N_t`` with the noise power ``N_t = |A_t|² - Re(A_t conj R_t)/(F-1)``
(a frame's power minus the part it shares with the others; it matches the variance of the
correlation map of a pure-noise movie within a few %), and ``h`` is the signal height of the
peak, pooled over frames and estimated once without selection bias (:func:`_global_search`): a
trajectory fitted to noise collects 1.5-2σ of "height" from the noise maxima it follows, which
would feed back into an ever more confident fit. ``h`` is lowered by two standard errors, so a
movie without detectable signal gets ``κ = 0`` and no motion (pure Poisson noise: zero shifts in
29 of 30 movies of 256²-512² px, RMS < 0.2 Å in the last).
On weak data ``h / σ`` is small and the prior decides; on strong data the prior is negligible
(noise-free input: the same sub-pixel result as without it, < 0.01 px).

Prior, in Å and e/Å² so that it carries over between detectors, doses and pixel sizes
(docs/physics.md#motion-priors), and independent of how finely the exposure ``e`` is fractionated:
``-log p(s) = ½ smoothing ∫ (|ṡ|² / σ_v(e)² + |s̈|² / σ_a(e)²) de`` (dots: derivatives in exposure;
summed over frames, :func:`trajectory_prior`), RELION polishing's velocity prior (Zivanov et al.
2019, IUCrJ 6:5) extended by an acceleration term and made exposure-dependent. Beam-induced motion
is fastest in the first few e/Å² and then decays towards slow stage drift (Brilot et al. 2012, JSB
177:630; Zheng et al. 2017 MotionCor2, Nat Methods 14:331; Li et al. 2013, Nat Methods 10:584): a burst of amplitude
``A`` with time constant ``τ`` has velocity ``(A/τ) e^{-e/τ}`` and acceleration ``(A/τ²) e^{-e/τ}``.
Measured time constants range over ~1-6 e/Å² (up to 15 % of a 40 e/Å² exposure), so the prior's
burst term is the *envelope* of these over ``τ ∈ [τ₁, τ₂]`` rather than one exponential:
``σ_v(e) = σ_v,late + A max_τ e^{-e/τ}/τ`` (the maximum is ``1/(e·ℯ)`` at ``τ = e`` inside the
range) and ``σ_a(e) = σ_a,late + A max_τ e^{-e/τ}/τ²`` (``4/(ℯ² e²)`` at ``τ = e/2``), with ``A`` = 20 Å,
``τ ∈ [1, 6]`` e/Å², ``σ_v,late`` = 0.5 Å per e/Å², ``σ_a,late`` = 0.05 Å per (e/Å²)². A single
``exp(-e/2)`` burst term (the previous prior) held a slow fast start (τ = 6 e/Å²: 1.5 Å per e/Å² at
6 e/Å², where it allowed 1.0) back. The late terms suppress frame-to-frame noise where the motion
is slow stage drift and relaxation, whose velocity changes little from frame to frame: with
``σ_a,late`` = 0.2 the weak-signal trajectories wandered by ±0.3 Å around a smooth truth and the
full-frame error was 0.33-0.47 Å RMS on simulated ice-only sessions (fast starts with τ = 4-15 %
of the exposure), with 0.05 it was 0.28-0.39 Å. A drift planted with frame-to-frame jitter (e.g.
rounded to whole pixels) is smoothed by up to the jitter's size.
Edge frames: the prior is a sum over the steps and second differences that exist, so the first
and last frames are tied to their one neighbour only (by one step and one second difference), with
no boundary term pulling them towards zero or the mean: a smooth trajectory is extrapolated, not
damped, at both ends (tested against a fast start, tests/test_motion_lowsnr.py). ``smoothing``
scales the prior's precision (σ / sqrt(smoothing)); 0 turns it off.

Posterior curvature (:class:`FrameMotion`): around the estimate, the log-posterior is approximately
quadratic in a correction ``c`` of the trajectory: ``-½ Σ_axis cᵀ P c - ½ cᵀ L c`` with ``P`` the prior
precision and ``L`` the data term's curvature. Each ``ℓ_t`` is frame ``t``'s log-likelihood against
the others held fixed, so ``κ_t H_t`` (``H_t``: -Hessian of ``c_t``) is the diagonal block of the joint
Hessian; the pair couplings are taken rank-one, ``L = diag(K) - K (Σ K)⁻¹ Kᵀ`` (``K_t = κ_t H_t``), which
keeps the data blind to a common shift of all frames, as the correlations are. The per-particle
stage (:mod:`gpu.local`) uses both to fit a common correction jointly with the particles.

Search: the trajectory must first be found to within the peak's capture range (about a binned
pixel after the B-factor). First iteration (and once more after an update above half a binned
pixel): the correlation maps ``c_t`` on the integer grid of offsets ``|δ| <= max_shift`` (150 Å by
default: drift between a frame and the others is 5-30 Å, docs/physics.md#realistic-motion; at most a quarter of the
frame) and the exact MAP path of ``Σ ℓ_t`` under the velocity part of the prior by dynamic
programming (Viterbi; the quadratic transition cost is separable in x and y). Then Newton steps
on the full posterior ``Σ_t ℓ_t(s_t + δ_t) - prior(s + δ)`` with the others frozen (Jacobi): each
frame's value, gradient and Hessian come from the exact trigonometric interpolant of ``c_t`` (one
separable DFT: one real GEMM per frame on the stored cross-powers, a tiny contraction), and the ``2F`` coupled
unknowns from one small linear solve ``(P - κH) ε = κg - P(s + δ)``. Iteration stops when no
re-referenced shift changes by more than ``tolerance_px``.

Reference: ``s_ref = 0`` is imposed on the smooth MAP trajectory, where the reference frame's
value is informed by its neighbours, so its own noise offsets every frame less.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from gpu.backend import array_module, fft, irfft2, is_gpu, map_chunks, to_numpy
from gpu.crop import downsample_plan, downsample_spectra
from gpu.shift import ramp_factors

_NEWTON_STEPS = 6  # from the path of a global search
_NEWTON_STEPS_LOCAL = 3  # from zero: the outer iterations refine further
_MAX_NEWTON_STEP = 1.0  # binned px; the peak's curvature radius is about a pixel after the B-factor
_GLOBAL_AGAIN = 0.5  # binned px; an update this large triggers a fresh global search ...
_MAX_SEARCHES = 2  # ... but only once: on weak data, frames coupled mostly to each other flip back and forth
_TAPER = 0.1  # fraction of each side faded to the frame mean before correlation
_MAX_SHIFT_A = 150.0  # default search radius (module doc)
_HEIGHT_ROUNDS = 1  # split-half rounds estimating h (more change nothing measurable on the simulator)
_DENSE_MAX_PLUS = 1 << 22  # elements: _max_plus takes every j up to this size (32 MiB of float64)
_NOISE_FLOOR = 1e-3  # noise power never below this fraction of a frame's power (noise-free input)
# prior at smoothing = 1 (module doc): sigma(e) = late + A * envelope over tau of the burst's rate
_BURST_A = 20.0  # Å: largest beam-induced burst the prior leaves free
_BURST_TAUS = (1.0, 6.0)  # e/Å²: range of the burst's time constant
_VEL_LATE = 0.5  # Å per e/Å²
_ACC_LATE = 0.05  # Å per (e/Å²)²


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


@dataclass(frozen=True)
class FrameMotion:
    """The full-frame estimate and its posterior curvature (module doc), in movie px.

    ``shifts``: ``(F, 2)`` float64 trajectory (``s_ref = 0``); ``prior``: ``(F, F)`` prior precision
    ``P`` of one axis (1/px²; the same for x and y); ``curvature``: ``(F, 2, 2)`` ``K_t = κ_t H_t``, the
    data's curvature per frame against the others (1/px², (x, y) order; zeros without detectable
    signal or without a prior, when ``κ`` is not calibrated); ``frame_shape``: ``(h, w)`` movie px.
    """

    shifts: np.ndarray
    prior: np.ndarray
    curvature: np.ndarray
    frame_shape: tuple[int, int]

    def data_precision(self) -> np.ndarray:
        """``(2F, 2F)`` ``L = diag(K) - K (Σ_t K_t)⁻¹ Kᵀ`` over ``c`` packed as ``(x_0..x_{F-1}, y_0..y_{F-1})``."""
        n = self.curvature.shape[0]
        blk = np.zeros((2 * n, 2 * n))
        idx = np.arange(n)
        for i in range(2):
            for j in range(2):
                blk[i * n + idx, j * n + idx] = self.curvature[:, i, j]
        ones = np.zeros((2 * n, 2))
        ones[:n, 0] = 1.0
        ones[n:, 1] = 1.0
        kc = blk @ ones  # (2F, 2): K_t stacked per axis
        return blk - kc @ np.linalg.pinv(self.curvature.sum(axis=0)) @ kc.T


def bin_movie(
    frames: Any, apix: float, max_resolution_A: float = 8.0, chunk: int | None = None, taper: float = _TAPER,
    sums2: Any = None,
) -> BinnedMovie:
    """Bin ``frames (F, h, w)`` so that Nyquist ≈ ``max_resolution_A`` (never coarser) and FFT them.

    ``chunk``: frames per pass (default 1 on the CPU, where it is fastest, 8 on the GPU).
    ``taper``: fraction of each side over which the binned frames fade to their mean (module doc).
    ``sums2``: the frames' 2x2 sums ``(F, h//2, w//2)`` (:func:`gpu.local_model.binned_movie`), made
    anyway for the per-particle patches; when the plan bins by 2 they replace that binning (the
    same means, a quarter of the reading).
    """
    if frames.ndim != 3:
        raise ValueError(f"bin_movie: frames must be (F, h, w), got shape {tuple(frames.shape)}")
    if apix <= 0 or max_resolution_A <= 0:
        raise ValueError(f"bin_movie: apix and max_resolution_A must be > 0 (got {apix}, {max_resolution_A})")
    if chunk is None:
        chunk = 8 if array_module(frames).__name__ == "cupy" else 1
    factor = max_resolution_A / (2.0 * apix)
    h, w = int(frames.shape[1]), int(frames.shape[2])
    if sums2 is not None and downsample_plan(h, w, factor)[0] == 2 and tuple(sums2.shape) == (frames.shape[0], h // 2, w // 2):
        d = downsample_spectra(sums2, factor / 2.0, chunk=chunk, taper=taper)  # plan: no further binning
        spectra = d.spectra
        spectra *= np.float32(0.25)  # sums -> means (the transform and the taper are linear)
        return BinnedMovie(spectra, d.shape, (2.0 * d.scale[0], 2.0 * d.scale[1]), float(apix), (h, w))
    d = downsample_spectra(frames, factor, chunk=chunk, taper=taper)
    return BinnedMovie(d.spectra, d.shape, d.scale, float(apix), (h, w))


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


def burst_envelope(e: np.ndarray, order: int) -> np.ndarray:
    """``max_{τ ∈ [τ₁, τ₂]} e^{-e/τ} / τ^order`` (order 1: a burst's velocity per Å of amplitude,
    order 2: its acceleration), exposure ``e`` in e/Å² (module doc). The maximum over ``τ`` is at
    ``τ = e / order`` clipped to the range."""
    e = np.asarray(e, dtype=np.float64)
    tau = np.clip(e / order, *_BURST_TAUS)
    return np.exp(-e / tau) / tau**order


def trajectory_prior(
    n_frames: int, dose_per_frame: float = 1.0, pre_exposure: float = 0.0, smoothing: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Precisions ``(velocity (F-1,), acceleration (F-2,))`` in 1/Å² of a trajectory's first and
    second differences (Å): ``smoothing / (D σ_v(e)²)`` for the step from frame ``t`` to ``t+1``
    (``e`` the exposure at their boundary, ``pre + D (t + 1)``) and ``smoothing / (D³ σ_a(e_t)²)`` at
    frame ``t`` (``e_t = pre + D (t + ½)``), ``D`` = dose per frame; σ's in the module doc.

    These are the Riemann sums of ``smoothing · ∫ (|ṡ|² / σ_v² + |s̈|² / σ_a²) de`` (derivatives in
    exposure: ``ṡ ≈ Δs / D``, ``s̈ ≈ Δ²s / D²``, ``de = D``), so a trajectory costs the same however
    finely the exposure is fractionated (the data term's information per e/Å² does not depend on it
    either).
    """
    e = pre_exposure + dose_per_frame * (np.arange(n_frames) + 0.5)
    boundary = pre_exposure + dose_per_frame * np.arange(1, n_frames)
    sv = _VEL_LATE + _BURST_A * burst_envelope(boundary, 1)
    sa = _ACC_LATE + _BURST_A * burst_envelope(e[1:-1], 2)
    return smoothing / (dose_per_frame * sv**2), smoothing / (dose_per_frame**3 * sa**2)


def prior_matrix(velocity: np.ndarray, acceleration: np.ndarray, n_frames: int) -> np.ndarray:
    """``(F, F)`` precision ``P`` with ``sᵀ P s = Σ v_j (Δs)_j² + Σ a_j (Δ²s)_j²`` for one axis of ``s (F,)``."""
    d1 = np.diff(np.eye(n_frames), axis=0)
    d2 = np.diff(np.eye(n_frames), n=2, axis=0)
    return (d1.T * velocity) @ d1 + (d2.T * acceleration) @ d2


@dataclass(frozen=True)
class _Trig:
    """Frame-independent factors of the interpolant's value, gradient and Hessian (:func:`_peak_terms`)."""

    dx: np.ndarray  # (wk, 3) complex128, host: m_kx (2πi kx)^j
    dy: Any  # (3, hc) complex128: (2πi ky)^i
    kx: np.ndarray  # (wk,) host
    ky: Any  # (hc,)

    @classmethod
    def make(cls, hc: int, wc: int, xp: ModuleType) -> _Trig:
        ky = np.fft.fftfreq(hc)
        kx = np.fft.rfftfreq(wc)
        mult = np.where(np.arange(kx.size) == 0, 1.0, 2.0)
        dx = np.stack([mult * (2j * np.pi * kx) ** j for j in range(3)], axis=1)
        iy = 2j * np.pi * ky
        return cls(dx, xp.asarray(np.stack([iy**0, iy, iy * iy], axis=0)), kx, xp.asarray(ky))


def _real_gemm_factor(b: np.ndarray) -> np.ndarray:
    """``(..., 2k, 2j)`` float32 ``R`` with ``z.view(float32) @ R = (z @ b).view(float32)`` for complex ``z (..., k)``
    and ``b (..., k, j)``: rows ``2k`` (real parts of ``z``) get ``[Re b, Im b]``, rows ``2k+1`` ``[-Im b, Re b]``.

    One real GEMM reads the complex64 data once, in place (no complex GEMM, no product array)."""
    *lead, k, j = b.shape
    r = np.empty((*lead, k, 2, j, 2), dtype=np.float32)
    r[..., 0, :, 0] = b.real
    r[..., 0, :, 1] = b.imag
    r[..., 1, :, 0] = -b.imag
    r[..., 1, :, 1] = b.real
    return r.reshape(*lead, 2 * k, 2 * j)


def _peak_terms(p: Any, d: Any, trig: _Trig, xp: ModuleType) -> np.ndarray:
    """``(F, 3, 3)`` host float64 ``M_ij = Σ_ky (2πi ky)^i e_y Σ_kx p (2πi kx)^j m e_x`` (real part)
    at offsets ``d (F, 2)`` binned px: ``c = M_00``, gradient ``(M_01, M_10)``, Hessian
    ``[[M_02, M_11], [M_11, M_20]]`` of ``c(δ) = Σ_k m_k Re[p_k exp(+2πi k·δ)]``.

    ``e_x`` is folded into each frame's ``(wk, 3)`` factor, so the inner sums are one real GEMM per
    frame on ``p`` as stored (:func:`_real_gemm_factor`; frame chunks on the CPU threads), followed
    by a tiny contraction over ``ky``.
    """
    n, hc = p.shape[:2]
    d = np.asarray(to_numpy(d), dtype=np.float64)
    ex = np.exp(2j * np.pi * d[:, 0:1] * trig.kx[None, :])  # (F, wk)
    r = xp.asarray(_real_gemm_factor(ex[:, :, None] * trig.dx[None]))  # (F, 2wk, 6)
    pv = p.view(xp.float32)
    t = xp.empty((n, hc, 6), dtype=xp.float32)

    def run(sl: slice) -> None:
        t[sl] = xp.matmul(pv[sl], r[sl])

    map_chunks(run, n, 2, xp)
    tc = t[..., 0::2].astype(xp.complex128) + 1j * t[..., 1::2]  # (F, hc, 3)
    ey = xp.exp(2j * np.pi * xp.asarray(d[:, 1:2]) * trig.ky[None, :])  # (F, hc)
    return to_numpy(xp.einsum("iy,fy,fyj->fij", trig.dy, ey, tc).real)


def _row_chunk(n: int, wk: int, xp: ModuleType) -> int:
    """Rows ``ky`` per chunk of an ``(n, hc, wk)`` pass: ~2 MiB of complex64 per chunk on the CPU (it stays
    in cache through the chunk's several passes, and the chunks run on the worker's threads); all rows on the GPU."""
    return 1 << 30 if is_gpu(xp) else max(1, (2 << 20) // (8 * n * wk))


def _frame_power(spectra: Any, wgt: Any) -> tuple[Any, np.ndarray]:
    """``(w|A_t|² (F, hc, wk) float32, Σ_k (w|A_t|²)² (F,) host float64)`` for spectra ``A (F, hc, wk)``."""
    xp = array_module(spectra)
    n, hc, wk = spectra.shape
    power = xp.empty(spectra.shape, dtype=xp.float32)

    def rows(sl: slice) -> Any:
        a, pw = spectra[:, sl], power[:, sl]
        xp.multiply(a.real, a.real, out=pw)
        pw += a.imag * a.imag
        pw *= wgt[sl]
        v = pw.reshape(n, -1)
        return xp.einsum("ij,ij->i", v, v).astype(xp.float64)

    return power, to_numpy(sum(map_chunks(rows, hc, _row_chunk(n, wk, xp), xp)))


def _cross_spectra(movie: BinnedMovie, s: Any, wgt: Any, power: Any, power_sq: Any, p: Any) -> np.ndarray:
    """Fill ``p (F, hc, wk)`` with ``A_t conj(R_t) w`` (frames shifted by ``-s``, binned px) and
    return the noise variance ``σ_t² (F,)`` (host float64) of each ``c_t`` (module doc).

    With ``a = w|T|²`` (T the sum of all frames), ``b = w|A_t|²`` and ``r = Re p``:
    ``w|R_t|² = a - 2r - b`` and ``w N_t = b - r/(F-1)``, so ``σ_t² = ½ Σ m² (a - 2r - b)(b - r/(F-1))``,
    expanded into per-frame reductions (no full-size temporaries beyond ``r``); ``m = 2`` wherever
    ``w != 0``. Every frequency row is independent (the frame sum runs along the first axis), so
    the passes run fused on row chunks (:func:`_row_chunk`).
    """
    xp = array_module(movie.spectra)
    n = movie.n_frames
    hc, wc = movie.shape
    wk = movie.spectra.shape[-1]
    ey, ex = ramp_factors(-s, hc, wc, True, xp)

    def rows(sl: slice) -> Any:
        pc = p[:, sl]
        xp.multiply(movie.spectra[:, sl], ey[:, sl], out=pc)
        pc *= ex
        total = pc.sum(axis=0)
        w = wgt[sl]
        a = ((total.real**2 + total.imag**2) * w).reshape(-1)
        pc *= (xp.conj(total) * w)[None]
        pc -= power[:, sl]  # = A_t conj(Σ_{u≠t} A_u) w: frame against the sum of the others
        r = xp.ascontiguousarray(pc.real).reshape(n, -1)
        b = power[:, sl].reshape(n, -1)
        sums = (b @ a, r @ a, xp.einsum("ij,ij->i", r, b), xp.einsum("ij,ij->i", r, r))
        return xp.stack(sums).astype(xp.float64)

    sab, sar, srb, srr = to_numpy(sum(map_chunks(rows, hc, _row_chunk(n, wk, xp), xp)))
    q = max(n - 1, 1)
    var = 2.0 * (sab - sar / q - (2.0 - 1.0 / q) * srb + 2.0 * srr / q - power_sq)
    floor = 2.0 * _NOISE_FLOOR * (sab - 2.0 * srb - power_sq)
    return np.maximum(np.maximum(var, floor), 1e-30)


def _window_maps(
    p: Any, radius: tuple[int, int], hc: int, wc: int, split: bool, chunk: int | None = None
) -> list[np.ndarray]:
    """``[c]`` or, with ``split``, ``[c, c1]``: ``(F, 2ry+1, 2rx+1)`` host float64 correlation maps
    ``c_t(δ)`` at integer offsets ``|δx| <= rx``, ``|δy| <= ry`` (row ``i`` is ``δy = i - ry``), in the
    units of :func:`_peak_terms`; ``c1`` is the same from half of the frequencies (a checkerboard in
    the rfft half-plane, ``ky + kx`` odd (indices), whose stored coefficients with ``kx > 0`` are all
    independent; ``c - c1`` is the other half).

    Only the window of the inverse transform is formed: one 1-D FFT along ``ky`` (a forward one,
    whose row ``-δy`` holds the offset ``δy``), then the window rows against the
    ``(wk, 2rx+1)`` matrix ``m_kx e^{2πi kx δx / wc}`` (real part; one real GEMM). For even ``hc``
    the checkerboard needs no transform of its own: restricting ``ky`` to odd (even) indices is
    ``½(Z[-δy] ∓ Z[-δy + hc/2])``, used for even (odd) ``kx``. ``chunk``: frames per transform
    (default: about 8 MiB of them on the CPU, 8 frames on the GPU).
    """
    xp = array_module(p)
    rx, ry = radius
    wk = p.shape[-1]
    if chunk is None:
        chunk = 8 if is_gpu(xp) else max(1, (8 << 20) // (8 * hc * wk))
    rows = (-np.arange(-ry, ry + 1)) % hc
    kx = np.arange(wk)
    mult = np.where((kx == 0) | (2 * kx == wc), 1.0, 2.0)
    e = mult[:, None] * np.exp(2j * np.pi * kx[:, None] * np.arange(-rx, rx + 1)[None, :] / wc)  # (wk, 2rx+1)
    g = xp.asarray(_real_gemm_factor(e[None])[0][:, 0::2])  # (2wk, 2rx+1): real part only
    g1 = xp.asarray(_real_gemm_factor((e * np.where(kx % 2 == 0, -1.0, 1.0)[:, None])[None])[0][:, 0::2])
    half = None if hc % 2 == 0 else xp.asarray(((np.arange(hc)[:, None] + kx[None, :]) % 2).astype(np.float32))
    rows_d = xp.asarray(rows)
    n_r = rows.size

    def window(z: Any, m: Any) -> np.ndarray:
        zr = xp.ascontiguousarray(z).view(xp.float32).reshape(-1, 2 * wk)
        return to_numpy((zr @ m).reshape(-1, n_r, 2 * rx + 1))

    out: list[list[np.ndarray]] = [[], []] if split else [[]]
    for i in range(0, p.shape[0], chunk):
        z = fft(p[i : i + chunk], axis=-2)
        c = window(z[:, rows_d], g)
        out[0].append(c)
        if split and half is None:
            out[1].append(0.5 * (c + window(z[:, xp.asarray((rows + hc // 2) % hc)], g1)))
        elif split:
            out[1].append(window(fft(p[i : i + chunk] * half, axis=-2)[:, rows_d], g))
    return [np.concatenate(o).astype(np.float64) for o in out]


def _max_plus(score: np.ndarray, offset: float, precision: float) -> np.ndarray:
    """``out[y, i] = max_j score[y, j] - ½ precision (offset + i - j)²`` over the last axis.

    Only ``j`` within ``K`` of ``clip(i + round(offset))`` can win, where ``½ precision (K - 1)² >=
    max(score) - min(score)``: a farther ``j`` pays more than the whole range of ``score`` over the nearer one.
    """
    w = score.shape[-1]
    i = np.arange(w)
    spread = float(score.max() - score.min())
    band = w if precision <= 0 else int(np.ceil(np.sqrt(2.0 * spread / precision))) + 1
    if band >= w - 1 or score.size * w <= _DENSE_MAX_PLUS:
        # every j (the same maximum: the others cannot win): a broadcast is several times faster than
        # gathering score[:, j], most of all from the transposed scores of the second axis
        return (score[:, None, :] - (0.5 * precision) * (offset + i[:, None] - i[None, :]) ** 2).max(axis=-1)
    centre = np.clip(i + round(offset), 0, w - 1)
    j = np.clip(centre[:, None] + np.arange(-band, band + 1)[None, :], 0, w - 1)
    return (score[:, j] - (0.5 * precision) * (offset + i[:, None] - j) ** 2).max(axis=-1)


def _chain(loglik: np.ndarray, offsets: np.ndarray, precision: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Max-sum over a chain (see :func:`viterbi_path`) whose first frame scores ``score``: ``(F, 2)`` (ix, iy).

    The forward pass keeps each frame's best score only; the backtrack re-derives the best
    predecessor of the one chosen state per frame (one ``(wy, wx)`` evaluation) instead of storing
    an argmax for every state.
    """
    n, wy, wx = loglik.shape
    scores = [score]
    for t in range(1, n):
        tmp = _max_plus(scores[-1], offsets[t - 1, 0], precision[t - 1, 0])  # (jy, ix)
        scores.append(_max_plus(tmp.T, offsets[t - 1, 1], precision[t - 1, 1]).T + loglik[t])
    iy, ix = np.unravel_index(int(np.argmax(scores[-1])), (wy, wx))
    path = np.zeros((n, 2), dtype=np.int64)
    path[-1] = ix, iy
    jx, jy = np.arange(wx), np.arange(wy)
    for t in range(n - 1, 0, -1):
        (ox, oy), (px, py) = offsets[t - 1], precision[t - 1]
        cand = scores[t - 1] - 0.5 * px * (ox + ix - jx)[None, :] ** 2 - 0.5 * py * (oy + iy - jy)[:, None] ** 2
        iy, ix = np.unravel_index(int(np.argmax(cand)), (wy, wx))
        path[t - 1] = ix, iy
    return path


def viterbi_path(
    loglik: np.ndarray, offsets: np.ndarray, precision: np.ndarray, anchor: int | None = None
) -> np.ndarray:
    """MAP integer offsets ``(F, 2)`` (dx, dy) under a Gaussian prior on steps, by dynamic programming.

    ``loglik (F, 2ry+1, 2rx+1)``: log-likelihood of frame ``t`` at offset ``δ = (ix - rx, iy - ry)``
    from its current position; ``offsets (F-1, 2)``: current position of frame ``t+1`` minus that of
    frame ``t``; ``precision (F-1, 2)``: per-axis precision of the step between them, so the
    transition costs ``½ Σ_axis prec (offset + δ_{t+1} - δ_t)²``. Separable in x and y: each frame
    is two 1-D max-plus products, ``O(W³)`` at most. ``anchor``: a frame held at ``δ = 0`` (the
    chain then runs from it in both directions).
    """
    wy, wx = loglik.shape[1:]
    centre = np.array([wx // 2, wy // 2])
    if anchor is None:
        path = _chain(loglik, offsets, precision, loglik[0])
    else:
        pinned = np.full((wy, wx), -1e30)
        pinned[wy // 2, wx // 2] = 0.0
        after = _chain(loglik[anchor:], offsets[anchor:], precision[anchor:], pinned)
        before = _chain(loglik[anchor::-1], -offsets[:anchor][::-1], precision[:anchor][::-1], pinned)
        path = np.concatenate([before[::-1], after[1:]])
    return (path - centre).astype(np.float64)


def _independent_peaks(maps: np.ndarray) -> np.ndarray:
    """``(F, 2)`` integer offsets (binned px) of each map's own maximum (no prior)."""
    n, wy, wx = maps.shape
    flat = np.argmax(maps.reshape(n, -1), axis=1)
    return np.stack([flat % wx - wx // 2, flat // wx - wy // 2], axis=1).astype(np.float64)


def _global_search(
    maps: list[np.ndarray],
    noise_var: np.ndarray,
    offsets: np.ndarray,
    precision: np.ndarray,
    height: float | None,
    anchor: int,
) -> tuple[np.ndarray, float]:
    """``(offsets (F, 2) binned px, h)`` from the correlation maps of :func:`_window_maps`: the
    Viterbi path of ``κ_t c_t``, ``κ_t = h / σ_t²`` (module doc), the ``anchor`` frame held at 0
    (the prior sees only differences, and a path free to translate as a whole would pick the best
    noise maximum of ``Σ_t c_t``: each map is against the *frozen* others, so a common offset is
    not a no-op for them).

    ``height`` None (the first search, at ``s = 0``, maps ``[c, c1]``): ``h`` by sample splitting.
    The path found in one half of the frequencies is scored in the other half, whose noise it has
    not seen, so pure noise gives ``h ≈ 0`` instead of the 1.5-2σ that a path following the noise
    maxima collects (later searches, from a trajectory fitted to all the data, could not avoid
    that bias: ``h`` is estimated here only). Started from the map maxima (biased upwards) and
    refined over :data:`_HEIGHT_ROUNDS` rounds, then lowered by two standard errors,
    ``2 sqrt(2 mean(σ²) / F)`` (every pair of frames enters two ``c_t``), so that a movie without
    detectable signal gets ``h = 0``: zero offsets, and the prior alone (no motion). Slightly low
    (by up to ~20% on the simulator) because the others are not yet aligned: the prior is then a
    little stronger than calibrated. Otherwise the given ``h`` is used.
    """
    full = maps[0]
    n, wy, wx = full.shape
    ry, rx = wy // 2, wx // 2
    # a vanishing preference for zero motion settles ties (flat maps) at no motion
    tie = -1e-9 * ((np.arange(wx) - rx)[None, :] ** 2 + (np.arange(wy) - ry)[:, None] ** 2)
    frames = np.arange(n)

    def path_of(c: np.ndarray, h: float) -> np.ndarray:
        return viterbi_path((h / noise_var)[:, None, None] * c + tie, offsets, precision, anchor)

    def at(c: np.ndarray, path: np.ndarray) -> np.ndarray:
        idx = (path + np.array([rx, ry])).astype(np.int64)
        return c[frames, idx[:, 1], idx[:, 0]]

    h = height
    if h is None:
        c1 = maps[1]
        c2 = full - c1
        h = float(np.mean(full.reshape(n, -1).max(axis=1)))
        for _ in range(_HEIGHT_ROUNDS):
            if not h > 0:
                break
            h = float(np.mean(at(c2, path_of(c1, h)) + at(c1, path_of(c2, h))))
        h -= 2.0 * float(np.sqrt(2.0 * np.mean(noise_var) / n))
    if not h > 0:
        return np.zeros((n, 2)), 0.0
    return path_of(full, h), h


def _solve_update(
    m: np.ndarray, kappa: np.ndarray, prior: tuple[np.ndarray, np.ndarray], position: np.ndarray
) -> np.ndarray:
    """``(F, 2)`` Newton update ``ε`` of ``Σ_t κ_t c_t - ½ Σ_axis posᵀ P pos`` from the per-frame
    terms ``m (F, 3, 3)`` (:func:`_peak_terms`): ``(P - κH) ε = κg - P·position``.

    Frames whose Hessian is not concave (noise) get the pooled Hessian of the concave ones (none:
    no curvature, the step cap bounds the move); a vanishing ridge pins directions that neither
    data nor prior see.
    """
    n = m.shape[0]
    g = np.stack([m[:, 0, 1], m[:, 1, 0]], axis=1)
    hess = np.stack([np.stack([m[:, 0, 2], m[:, 1, 1]], -1), np.stack([m[:, 1, 1], m[:, 2, 0]], -1)], axis=1)
    det = hess[:, 0, 0] * hess[:, 1, 1] - hess[:, 0, 1] ** 2
    concave = (hess[:, 0, 0] < 0) & (det > 0)
    pooled = hess[concave].mean(axis=0) if concave.any() else np.zeros((2, 2))
    hess = np.where(concave[:, None, None], hess, pooled)
    kh = kappa[:, None, None] * hess
    a = np.zeros((2 * n, 2 * n))
    idx = np.arange(n)
    a[:n, :n] = prior[0]
    a[n:, n:] = prior[1]
    a[idx, idx] -= kh[:, 0, 0]
    a[n + idx, n + idx] -= kh[:, 1, 1]
    a[idx, n + idx] -= kh[:, 0, 1]
    a[n + idx, idx] -= kh[:, 1, 0]
    rhs = np.concatenate([kappa * g[:, 0] - prior[0] @ position[:, 0], kappa * g[:, 1] - prior[1] @ position[:, 1]])
    a[np.arange(2 * n), np.arange(2 * n)] += 1e-9 * max(float(np.abs(np.diag(a)).max()), 1e-30)
    step = np.linalg.solve(a, rhs)
    return np.stack([step[:n], step[n:]], axis=1)


def _refine(
    p: Any,
    s: np.ndarray,
    start: np.ndarray,
    kappa: np.ndarray,
    prior: tuple[np.ndarray, np.ndarray],
    trig: _Trig,
    steps: int,
    tol: float = 1e-3,
) -> np.ndarray:
    """Newton ascent of the posterior ``Σ_t κ_t c_t(δ_t) - prior(s + δ)`` over the offsets ``δ (F, 2)``
    (binned px) of every frame from its current position ``s``, starting at ``start``. Stops once
    no step exceeds ``tol`` binned px."""
    xp = array_module(p)
    d = np.array(start, dtype=np.float64)
    for _ in range(steps):
        step = _solve_update(_peak_terms(p, d, trig, xp), kappa, prior, s + d)
        norm = np.hypot(step[:, 0], step[:, 1])
        step *= min(1.0, _MAX_NEWTON_STEP / max(float(norm.max()), 1e-30))
        d += step
        if float(np.abs(step).max()) < tol:
            break
    return d


def estimate_frame_shifts(frames: Any, apix: float, *args: Any, **kwargs: Any) -> np.ndarray:
    """Full-frame trajectory ``(F, 2)`` float64 (dx, dy) in movie px: :func:`estimate_frame_motion`'s ``shifts``."""
    return estimate_frame_motion(frames, apix, *args, **kwargs).shifts


def estimate_frame_motion(
    frames: Any,
    apix: float,
    max_resolution_A: float = 8.0,
    bfactor: float = 500.0,
    iterations: int = 10,
    tolerance_px: float = 0.01,
    reference_frame: int = -1,
    max_shift_px: float | None = None,
    *,
    dose_per_frame: float = 1.0,
    pre_exposure: float = 0.0,
    smoothing: float = 1.0,
    max_shift_A: float = _MAX_SHIFT_A,
) -> FrameMotion:
    """Full-frame trajectory ``(F, 2)`` float64 (dx, dy) in movie px, host NumPy, with its prior and
    posterior curvature (:class:`FrameMotion`, module doc).

    ``frames``: ``(F, h, w)`` float32 (NumPy or CuPy) or a :class:`BinnedMovie` from
    :func:`bin_movie` (reuse it for :func:`aligned_sum`; its binning then overrides ``apix`` and
    ``max_resolution_A``). ``reference_frame`` -1 = ``F // 2``.
    ``dose_per_frame``, ``pre_exposure`` (e/Å²): place the frames in exposure for the prior.
    ``smoothing``: multiplier of the prior's precision (1 = the physical prior of the module doc,
    0 = none: independent frame-vs-others peaks). ``max_shift_A``: largest frame-vs-others offset
    searched (Å; at most a quarter of the frame); ``max_shift_px`` (movie px), when given, replaces
    it. Converges to < 0.01 px on noise-free data; a movie without detectable signal gives zeros.
    """
    movie = frames if isinstance(frames, BinnedMovie) else bin_movie(frames, apix, max_resolution_A)
    xp = array_module(movie.spectra)
    n = movie.n_frames
    ref = n // 2 if reference_frame == -1 else int(reference_frame)
    if not 0 <= ref < n:
        raise ValueError(f"estimate_frame_shifts: reference_frame {reference_frame} is outside 0..{n - 1}")
    if dose_per_frame <= 0 or pre_exposure < 0 or smoothing < 0:
        raise ValueError(
            f"estimate_frame_shifts: need dose_per_frame > 0, pre_exposure >= 0, smoothing >= 0 "
            f"(got {dose_per_frame}, {pre_exposure}, {smoothing})"
        )
    if n < 2:
        return FrameMotion(np.zeros((n, 2)), np.zeros((n, n)), np.zeros((n, 2, 2)), movie.movie_shape)
    hc, wc = movie.shape
    sy, sx = movie.scale
    ay, ax = movie.binned_apix
    limit = (max_shift_A / ax, max_shift_A / ay) if max_shift_px is None else (max_shift_px / sx, max_shift_px / sy)
    radius = (int(max(1, min(limit[0], wc / 4.0))), int(max(1, min(limit[1], hc / 4.0))))
    regularised = smoothing > 0
    vel, acc = trajectory_prior(n, dose_per_frame, pre_exposure, smoothing)
    # prior on positions in binned px: s_Å = s_px * (binned Å/px) per axis
    prior_a = prior_matrix(vel, acc, n)
    prior = (prior_a * ax * ax, prior_a * ay * ay)
    step_precision = np.stack([vel * ax * ax, vel * ay * ay], axis=1)
    wgt = correlation_weights(movie, bfactor)
    # |A_t|² does not change with the shift: the self term of A_t · conj(Σ_u A_u) is fixed
    power, power_sq = _frame_power(movie.spectra, wgt)
    trig = _Trig.make(hc, wc, xp)
    scale = np.array([sx, sy])
    s = np.zeros((n, 2), dtype=np.float64)
    search = True
    searches = 0
    height: float | None = None
    p = xp.empty_like(movie.spectra)
    for _ in range(max(1, iterations)):
        noise_var = _cross_spectra(movie, xp.asarray(s), wgt, power, power_sq, p)
        start = np.zeros((n, 2))
        if search:
            searches += 1
            maps = _window_maps(p, radius, hc, wc, split=regularised and height is None)
            if regularised:
                start, height = _global_search(maps, noise_var, np.diff(s, axis=0), step_precision, height, ref)
            else:
                start = _independent_peaks(maps[0])
        kappa = (height or 0.0) / noise_var if regularised else np.ones(n)
        delta = _refine(p, s, start, kappa, prior, trig, _NEWTON_STEPS if search else _NEWTON_STEPS_LOCAL)
        s = s + delta
        s = s - s[ref]
        change = float(np.max(np.abs((delta - delta[ref]) * scale)))
        search = searches < _MAX_SEARCHES and float(np.max(np.abs(delta - delta[ref]))) > _GLOBAL_AGAIN
        if change < tolerance_px:
            break
    prior_px = prior_a * movie.apix**2
    if not (regularised and height):
        return FrameMotion(s * scale, prior_px, np.zeros((n, 2, 2)), movie.movie_shape)
    noise_var = _cross_spectra(movie, xp.asarray(s), wgt, power, power_sq, p)
    curv = _data_curvature(_peak_terms(p, np.zeros((n, 2)), trig, xp), height / noise_var, scale)
    return FrameMotion(s * scale, prior_px, curv, movie.movie_shape)


def _data_curvature(m: np.ndarray, kappa: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(F, 2, 2)`` ``K_t = -κ_t ∇²c_t`` in 1/movie px² from :func:`_peak_terms` at the estimate, each
    made positive semi-definite (a frame whose peak is not concave there carries no curvature)."""
    hess = np.stack([np.stack([m[:, 0, 2], m[:, 1, 1]], -1), np.stack([m[:, 1, 1], m[:, 2, 0]], -1)], axis=1)
    k = -kappa[:, None, None] * hess / np.outer(scale, scale)[None]
    lam, vec = np.linalg.eigh(k)
    return np.einsum("tij,tj,tkj->tik", vec, np.maximum(lam, 0.0), vec)


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
            raise ValueError("aligned_sum needs apix when given raw frames")
        movie = bin_movie(frames, apix, max_resolution_A)
    xp = array_module(movie.spectra)
    sh = xp.asarray(shifts, dtype=xp.float64)
    if tuple(sh.shape) != (movie.n_frames, 2):
        raise ValueError(f"aligned_sum: shifts must be ({movie.n_frames}, 2), got {tuple(sh.shape)}")
    sy, sx = movie.scale
    binned = sh / xp.asarray([sx, sy])
    hc, wc = movie.shape
    ey, ex = ramp_factors(-binned, hc, wc, True, xp)
    spectra = movie.spectra
    total = xp.empty(spectra.shape[1:], dtype=spectra.dtype)
    rows = max(1, (1 << 21) // max(1, spectra.shape[0] * spectra.shape[2] * spectra.itemsize))

    def run(sl: slice) -> None:  # row blocks of all frames: the product stays in cache until summed
        block = spectra[:, sl] * ey[:, sl]
        block *= ex
        total[sl] = block.sum(axis=0)

    map_chunks(run, hc, rows, xp)
    img = irfft2(total, s=(hc, wc)).astype(xp.float32, copy=False)
    return img, 0.5 * (sx + sy)
