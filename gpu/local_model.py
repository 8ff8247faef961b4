"""Per-particle alignment data term: band-limited patch spectra and the cross-frame likelihood.

A particle's patch in frame ``t`` is cut at the integer position ``round(c_t)`` of its full-frame
trajectory ``c_t``; its content sits at ``+r_t = c_t - round(c_t)`` from the box centre, plus the
unknown local residual ``d_t`` (px, :mod:`gpu` conventions). Shifting the patch by ``-(r_t + d_t)``
multiplies its transform by ``exp(+2πi k·(r_t + d_t))``.

Data model, per particle and per independent Fourier coefficient ``k`` (rfft half plane)::

    F_t(k) = q_t(k) S(k) exp(-2πi k·(r_t + d_t)) + N_t(k),   S ~ CN(0, τ²(k)),  N_t ~ CN(0, σ²(k))

with ``q_t(k)`` the Grant & Grigorieff exposure attenuation (:mod:`gpu.dose`, unnormalised). Writing
``X_t = q_t F_t exp(+2πi k·r_t)`` and ``G_t = X_t exp(+2πi k·d_t)``, the log-likelihood of the
shifts (``S`` integrated out) is, up to a constant (Sherman-Morrison on ``σ² I + τ² u uᴴ``)::

    log L(d) = Σ_k w(k) ( |Σ_t G_t(k)|² - Σ_t |G_t(k)|² ),   w = τ² / (σ² (σ² + τ² Σ_t q_t²))

i.e. alignparts_lbfgs' "every frame against the sum of the others" objective (Rubinstein &
Brubaker 2015; docs/physics.md#per-particle-alignment) with frequency weights that make it a calibrated log-likelihood in
nats, so priors in physical units (:mod:`gpu.local`) balance it without a free λ. ``σ²`` and
``τ²`` are estimated per Fourier shell from the data themselves (frame self-power and cross-frame
power after the full-frame alignment, pooled over all particles of the movie). The optional
B-factor ``B`` multiplies ``w`` by ``exp(-B k²/4)`` (k in 1/Å), tempering the high end of the
band where the full-frame-aligned ``τ²`` estimate is least reliable.
The soft mask of the patch correlates neighbouring Fourier coefficients, so summing them as
independent would overcount the evidence; ``w`` is scaled by the taper's efficiency ``ν = 0.56``
(:func:`taper_efficiency`), which keeps the log-likelihood calibrated against the priors of
:mod:`gpu.local` (on a simulated movie the scatter of the per-frame common shift around the truth was
1.25x ``1/sqrt(curvature)`` with it, 1.6x without).

Gradient (exact): with ``A = Σ_t G_t``, ``∂ log L / ∂d_{t,x} = -4π Σ_k w k_x Im(conj(A) G_t)``
(likewise y); the self terms do not depend on ``d``. Everything is batched over
``(particles, frames, ky, kx)`` and runs unchanged on NumPy or CuPy; complex128 input gives a
float64 path (used to check the gradient against finite differences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from gpu import backend
from gpu.dose import dose_weights

# particles per FFT chunk and elements per data-term chunk: bound the temporary memory
_FFT_CHUNK_BYTES = 256 * 2**20
_CPU_FFT_CHUNK_BYTES = 32 * 2**20  # per thread: chunks run concurrently on the CPU
_TERM_CHUNK_ELEMS = 8 * 2**20
_CPU_CHUNK_ELEMS = 2**18
MASK_EDGE = 0.15  # raised-cosine edge of the patch mask (:func:`soft_mask`), in box units


@dataclass
class BandSpectra:
    """Band-limited, exposure-weighted, remainder-corrected patch spectra of one movie.

    ``x``: (P, Fa, ny, nx) complex, ``X_t(k)`` for the alignment frames ``frames`` (Fa of them),
    on the rfft half plane cropped to ``ky = -n..n``, ``kx = 0..n`` (n = ``box·apix/band_high``).
    ``kx``: (nx,), ``ky``: (ny,) frequencies in cycles per pixel. ``weight``: (ny, nx) likelihood
    weight ``w(k)`` (0 outside the band; halved on the ``kx = 0`` column whose ±ky entries are
    conjugate twins). ``shell``: (ny, nx) integer ring index (Fourier pixels). ``noise``,
    ``signal``: per-shell ``σ²``, ``τ²`` estimates (host arrays). ``frames``: (Fa,) indices of the
    alignment frames in the movie; ``n_frames``: F, frames in the movie.
    """

    x: Any
    kx: Any
    ky: Any
    weight: Any
    shell: Any
    band: Any
    frames: np.ndarray
    n_frames: int
    box: int
    apix: float
    noise: np.ndarray = field(default_factory=lambda: np.zeros(0))
    signal: np.ndarray = field(default_factory=lambda: np.zeros(0))
    self_power: float | None = None

    @property
    def xp(self) -> ModuleType:
        return backend.array_module(self.x)

    @property
    def rdtype(self) -> Any:
        """The real dtype matching ``x`` (float32 for complex64, float64 for complex128)."""
        xp = self.xp
        return xp.float64 if self.x.dtype == xp.complex128 else xp.float32

    def subset(self, frame_positions: Any) -> BandSpectra:
        """The same spectra restricted to alignment frames ``frame_positions`` (indices into ``frames``)."""
        pos = np.asarray(frame_positions, dtype=np.int64)
        steps = np.diff(pos)
        if len(pos) and pos[0] >= 0 and (len(pos) == 1 or (steps[0] > 0 and np.all(steps == steps[0]))):
            # evenly spaced frames (the even/odd folds): a strided view, no copy of the spectra
            x = self.x[:, pos[0] : pos[-1] + 1 : int(steps[0]) if len(pos) > 1 else 1]
        else:
            x = self.x[:, self.xp.asarray(pos)]
        return BandSpectra(
            x=x,
            kx=self.kx,
            ky=self.ky,
            weight=self.weight,
            shell=self.shell,
            band=self.band,
            frames=self.frames[pos],
            n_frames=self.n_frames,
            box=self.box,
            apix=self.apix,
            noise=self.noise,
            signal=self.signal,
        )


def auto_binning(box: int, n: int) -> int:
    """2 when the band (Fourier index <= n) lies within half the Nyquist of 2x2-binned patches, else 1.

    Summing 2x2 pixels before the transform keeps the white counting noise per coefficient and
    attenuates the signal by ``cos(π kx) cos(π ky)`` (k in cycles per original pixel): at most
    ``cos(π/8)² = 0.85`` at the band edge when ``n <= box/8``; components above the binned Nyquist
    alias onto the band only from ``|k| >= 3/8``, where dose-weighted movie frames hold noise alone.
    The transforms are 4x smaller.
    """
    return 2 if box % 4 == 0 and n <= box // 8 else 1


def binned_movie(frames: Any, out: Any = None) -> Any:
    """(F, h, w) -> (F, h//2, w//2) float32 2x2 sums (:func:`gpu.crop.bin_real`), frame chunks on all threads.

    ``out``: a buffer of that shape to fill (reused between movies by a worker).
    """
    from gpu.crop import bin_real

    xp = backend.array_module(frames)
    n, h, w = frames.shape
    shape = (n, h // 2, w // 2)
    if out is None or tuple(out.shape) != shape:
        out = xp.empty(shape, dtype=xp.float32)

    def run(sl: slice) -> None:
        out[sl] = bin_real(frames[sl], 2, reduce="sum", chunk=1)

    backend.map_chunks(run, n, 1, xp)
    return out


def binned_boxes_inside(centres: np.ndarray, box: int, binned_shape: tuple[int, int]) -> np.ndarray:
    """Bool (...): the (box/2)² patch around ``rint((c - 0.5)/2)`` lies inside frames of ``binned_shape``.

    ``centres``: (..., 2) px on the original grid (see :func:`spectra_from_frames`).
    """
    from gpu.extract import boxes_inside

    return boxes_inside(np.rint((np.asarray(centres, dtype=np.float64) - 0.5) / 2.0), box // 2, binned_shape)


def band_size(box: int, apix: float, band_high: float) -> int:
    """Largest Fourier index n with ``n / (box·apix) <= 1 / band_high``, at most box//2 - 1."""
    return max(1, min(box // 2 - 1, math.floor(box * apix / band_high + 1e-9)))


def mask_profile(r: np.ndarray, edge: float = MASK_EDGE) -> np.ndarray:
    """The patch mask at distance ``r`` from the box centre, in box units: 1 up to ``0.5 - edge``, a
    raised cosine to 0 at 0.5, 0 beyond."""
    inner = 0.5 - edge
    return np.where(r <= inner, 1.0, np.where(r >= 0.5, 0.0, 0.5 + 0.5 * np.cos(np.pi * (r - inner) / edge)))


def soft_mask(box: int, xp: ModuleType = np, edge: float = MASK_EDGE) -> Any:
    """(box, box) float32 circular mask: 1 inside radius ``(0.5 - edge)·box``, raised-cosine to 0 at ``box/2``.

    Tapering the patch edges keeps the box border (which does not move with the specimen) out of
    the cross-frame correlations.
    """
    c = box // 2
    yy, xx = np.mgrid[0:box, 0:box]
    m = mask_profile(np.hypot(yy - c, xx - c) / box, edge)
    return xp.asarray(m.astype(np.float32))


def taper_efficiency(mask: np.ndarray) -> float:
    """``ν = (Σ m²)² / (N Σ m⁴)`` of a real-space taper ``m`` of N pixels (0.56 for :func:`soft_mask`).

    The Fourier coefficients of a tapered patch are correlated (neighbours share the transform of
    the mask), so a likelihood that sums them as independent overcounts the evidence by ``1/ν``: the
    variance of its score is ``1/ν`` times its curvature (the tapered periodogram's variance
    inflation, Percival & Walden 1993, Spectral Analysis for Physical Applications, §6.4). The
    weights are scaled by ``ν`` so the log-likelihood stays calibrated in nats.
    """
    m = np.asarray(mask, dtype=np.float64)
    return float((m**2).sum() ** 2 / (m.size * (m**4).sum()))


def _band_grid(box: int, n: int, xp: ModuleType) -> tuple[Any, Any, Any, Any]:
    """Row indices into the rfft output for ky = -n..n, and kx, ky (cycles/px), shell index."""
    iy = np.concatenate([np.arange(box - n, box), np.arange(0, n + 1)])
    ky = np.arange(-n, n + 1) / box
    kx = np.arange(0, n + 1) / box
    shell = np.rint(np.hypot(*np.meshgrid(np.arange(-n, n + 1), np.arange(0, n + 1), indexing="ij"))).astype(np.int64)
    return iy, xp.asarray(kx), xp.asarray(ky), shell


def _check_frames(n_frames: int, first_frame: int, last_frame: int) -> np.ndarray:
    last = n_frames - 1 if last_frame < 0 else min(last_frame, n_frames - 1)
    if not 0 <= first_frame < last:
        raise ValueError(f"local model: alignment frames {first_frame}..{last} leave fewer than 2 of {n_frames}")
    return np.arange(first_frame, last + 1)


class _BandTransform:
    """Patch chunk -> band spectra ``X_t(k)`` (see :func:`prepare_spectra`); holds the grids and weights."""

    def __init__(self, box: int, n_frames: int, frames: np.ndarray, apix: float, dose_per_frame: float,
                 pre_exposure: float, kv: float, band_low: float, band_high: float, xp: ModuleType, cdtype: Any,
                 binning: int | None = None) -> None:
        self.xp, self.box, self.frames = xp, box, frames
        self.cdtype = xp.dtype(cdtype or xp.complex64)
        self.rdtype = xp.float64 if self.cdtype == xp.complex128 else xp.float32
        self.n = n = band_size(box, apix, band_high)
        self.bin = auto_binning(box, n) if binning is None else int(binning)
        if self.bin not in (1, 2) or (self.bin == 2 and (box % 4 or n >= box // 4)):
            raise ValueError(f"local model: binning {binning} impossible for box {box} and band index {n}")
        fb = box // self.bin
        iy, kx, ky, self.shell = _band_grid(box, n, xp)
        iy = np.where(iy >= box - n, iy - box + fb, iy)  # negative ky rows of the (binned) transform
        self.iy = xp.asarray(iy)
        self.kx = kx.astype(self.rdtype)
        self.ky = ky.astype(self.rdtype)
        self.kmag_a = np.hypot(*np.meshgrid(np.arange(-n, n + 1), np.arange(0, n + 1), indexing="ij")) / (box * apix)
        self.band = (self.kmag_a >= 1.0 / band_low) & (self.kmag_a <= 1.0 / band_high)
        self.mask = soft_mask(fb, xp).astype(self.rdtype)
        self.msum = float(self.mask.sum())
        self.nu = taper_efficiency(backend.to_numpy(self.mask))
        q = dose_weights(xp.asarray(self.kmag_a), n_frames, dose_per_frame, pre_exposure, kv, normalize=False, xp=xp)
        self.q = q[frames].astype(self.rdtype)

    def __call__(self, patches: Any, remainders: Any, prebinned: bool = False) -> Any:
        """(Pc, Fa, a, a) patches of the alignment frames + (Pc, Fa, 2) remainders -> (Pc, Fa, ny, nx).

        ``prebinned``: the patches are already 2x2 sums (Pc, Fa, a/2, a/2) cut from a binned movie
        and the remainders are measured from their centre (in original px).
        """
        xp = self.xp
        pt = xp.asarray(patches, dtype=self.rdtype)
        if self.bin == 2 and not prebinned:  # pairs of rows (contiguous), then pairs of columns
            rows = pt[..., 0::2, :] + pt[..., 1::2, :]
            pairs = rows.reshape(*rows.shape[:-1], rows.shape[-1] // 2, 2)
            pt = pairs[..., 0] + pairs[..., 1]
        mean = xp.einsum("...ij,ij->...", pt, self.mask)[..., None, None] / self.msum
        # rows first, then column transforms of the n+1 band columns only (the rest is never used)
        cols = backend.rfft((pt - mean) * self.mask, axis=-1)[..., : self.n + 1]
        spec = backend.fft(cols, axis=-2, overwrite_x=True)[..., self.iy, :].astype(self.cdtype, copy=False)
        # the known sub-pixel remainder: shift content by -r; a binned pixel's centre sits half an
        # original pixel past its first pixel's, so the box centre moved by +0.5 px in x and y
        r = xp.asarray(remainders, dtype=self.rdtype) - (0.0 if prebinned else 0.5 * (self.bin - 1))
        spec *= xp.exp(2j * math.pi * self.ky[None, None, :, None] * r[..., 1, None, None]).astype(self.cdtype)
        spec *= xp.exp(2j * math.pi * self.kx[None, None, None, :] * r[..., 0, None, None]).astype(self.cdtype)
        spec *= self.q[None]
        return spec

    def finish(self, x: Any, n_frames: int, apix: float, bfactor: float) -> BandSpectra:
        noise, signal, weight = _likelihood_weights(x, self.q, self.shell, self.band, self.xp)
        weight = weight * self.nu
        if bfactor:
            weight = weight * np.exp(-bfactor * self.kmag_a**2 / 4.0)
        wdtype = np.float64 if self.rdtype == self.xp.float64 else np.float32
        return BandSpectra(
            x=x, kx=self.kx, ky=self.ky, weight=self.xp.asarray(weight.astype(wdtype)), shell=self.shell,
            band=self.band, frames=self.frames, n_frames=n_frames, box=self.box, apix=apix, noise=noise, signal=signal,
        )


def prepare_spectra(
    patches: Any,
    remainders: Any,
    apix: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    kv: float = 300.0,
    band_low: float = 500.0,
    band_high: float = 20.0,
    bfactor: float = 0.0,
    first_frame: int = 0,
    last_frame: int = -1,
    dtype: Any = None,
    binning: int | None = None,
) -> BandSpectra:
    """Patches (P, F, a, a) + remainders (P, F, 2) px -> :class:`BandSpectra` of the alignment band.

    Each patch is made zero-mean under a soft circular mask, Fourier transformed (in particle
    chunks, so only the band is ever kept), cropped to ``band_low >= 1/|k| >= band_high`` (Å),
    multiplied by ``q_t(k)`` and by ``exp(+2πi k·r)``. ``dtype``: complex64 (default) or
    complex128. Frames ``first_frame..last_frame`` (inclusive, -1 = last) are kept. ``binning``:
    1, 2 (2x2 sums before the transform) or None = :func:`auto_binning`.
    """
    xp = backend.array_module(patches)
    if patches.ndim != 4 or patches.shape[-1] != patches.shape[-2]:
        raise ValueError(f"prepare_spectra: patches must be (P, F, a, a), got shape {tuple(patches.shape)}")
    p_count, n_frames, box, _ = patches.shape
    if tuple(remainders.shape) != (p_count, n_frames, 2):
        raise ValueError(
            f"prepare_spectra: remainders must be (P, F, 2) = ({p_count}, {n_frames}, 2), got {tuple(remainders.shape)}"
        )

    def chunk_input(sl: slice, fsel: slice) -> tuple[Any, Any, bool]:
        return patches[sl, fsel], xp.asarray(remainders[sl, fsel]), False

    return _band_spectra(chunk_input, p_count, n_frames, box, apix, dose_per_frame, pre_exposure, kv, band_low,
                         band_high, bfactor, first_frame, last_frame, xp, dtype, binning)


def spectra_from_frames(
    frames: Any,
    centres: np.ndarray,
    box: int,
    apix: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    kv: float = 300.0,
    band_low: float = 500.0,
    band_high: float = 20.0,
    bfactor: float = 0.0,
    first_frame: int = 0,
    last_frame: int = -1,
    dtype: Any = None,
    binning: int | None = None,
    binned_frames: Any = None,
) -> BandSpectra:
    """Like :func:`prepare_spectra`, cutting the patches from ``frames`` (F, h, w) chunk by chunk.

    ``centres``: (P, F, 2) px, each particle's full-frame trajectory position ``c = position + s_t``
    (every box of size ``box`` around ``rint(c)`` must lie inside the frame). Only one chunk of
    patches exists at a time, so memory stays bounded for any number of particles.
    ``binned_frames``: the same frames summed 2x2, (F, h//2, w//2) (``gpu.crop.bin_real(frames, 2,
    "sum")``); when the band is binned (:func:`auto_binning`) the (box/2)² patches are cut from
    them around ``rint(c_b)``, ``c_b = (c - 0.5)/2`` (binned pixel j is centred at 2j + 0.5), with
    remainder ``2 (c_b - rint(c_b))`` px: a quarter of the gather, and no binning per patch.
    Every such box must lie inside the binned frames (:func:`binned_boxes_inside`).
    """
    from gpu.extract import cut_patches

    xp = backend.array_module(frames)
    centres = np.asarray(backend.to_numpy(centres), dtype=np.float64)
    n_frames = int(frames.shape[0])
    if centres.ndim != 3 or centres.shape[1:] != (n_frames, 2):
        raise ValueError(f"spectra_from_frames: centres must be (P, {n_frames}, 2), got shape {centres.shape}")
    b = auto_binning(box, band_size(box, apix, band_high)) if binning is None else int(binning)
    if binned_frames is not None and b == 2:
        cb = (centres - 0.5) / 2.0
        ci = np.rint(cb)
        rem = 2.0 * (cb - ci)
        if not binned_boxes_inside(centres, box, tuple(binned_frames.shape[1:])).all():
            raise ValueError(f"spectra_from_frames: a ({box // 2} px) box leaves the binned frames")

        def chunk_input(sl: slice, fsel: slice) -> tuple[Any, Any, bool]:
            patches = cut_patches(binned_frames[fsel], ci[sl, fsel].astype(np.int64), box // 2)
            return patches, xp.asarray(rem[sl, fsel]), True
    else:
        ci = np.rint(centres)
        rem = centres - ci

        def chunk_input(sl: slice, fsel: slice) -> tuple[Any, Any, bool]:
            return cut_patches(frames[fsel], ci[sl, fsel].astype(np.int64), box), xp.asarray(rem[sl, fsel]), False

    return _band_spectra(chunk_input, centres.shape[0], n_frames, box, apix, dose_per_frame, pre_exposure, kv,
                         band_low, band_high, bfactor, first_frame, last_frame, xp, dtype, binning)


def _band_spectra(
    chunk_input: Any,
    p_count: int,
    n_frames: int,
    box: int,
    apix: float,
    dose_per_frame: float,
    pre_exposure: float,
    kv: float,
    band_low: float,
    band_high: float,
    bfactor: float,
    first_frame: int,
    last_frame: int,
    xp: ModuleType,
    dtype: Any,
    binning: int | None = None,
) -> BandSpectra:
    """The shared body of :func:`prepare_spectra` and :func:`spectra_from_frames`: transform the
    patches particle chunk by particle chunk (``chunk_input(particles, frames) -> (patches, remainders)``)
    so only the band of each chunk is ever kept."""
    fidx = _check_frames(n_frames, first_frame, last_frame)
    tr = _BandTransform(box, n_frames, fidx, apix, dose_per_frame, pre_exposure, kv, band_low, band_high, xp, dtype,
                        binning)
    out = xp.empty((p_count, len(fidx), 2 * tr.n + 1, tr.n + 1), dtype=tr.cdtype)
    budget = _FFT_CHUNK_BYTES if backend.is_gpu(xp) else _CPU_FFT_CHUNK_BYTES
    chunk = max(1, budget // max(len(fidx) * box * box * 8, 1))
    fsel = slice(int(fidx[0]), int(fidx[-1]) + 1)

    def run(sl: slice) -> None:
        out[sl] = tr(*chunk_input(sl, fsel))

    backend.map_chunks(run, p_count, chunk, xp)
    return tr.finish(out, n_frames, apix, bfactor)


def _likelihood_weights(x: Any, q: Any, shell: np.ndarray, band: np.ndarray, xp: ModuleType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-shell ``σ²``, ``τ²`` from the data and the per-frequency weight ``w`` (module docstring).

    With ``Q2 = Σ q²``, ``Q4 = Σ q⁴``: E Σ_t|X_t|² = σ² Q2 + τ² Q4 and E(|Σ X_t|² - Σ|X_t|²) = τ²(Q2² - Q4)
    at the full-frame alignment (an underestimate of τ² where local motion blurs the signal).
    """
    p_count = x.shape[0]
    self_pow = backend.to_numpy((xp.abs(x) ** 2).sum(axis=1).sum(axis=0)).astype(np.float64)
    tot_pow = backend.to_numpy((xp.abs(x.sum(axis=1)) ** 2).sum(axis=0)).astype(np.float64)
    qn = backend.to_numpy(q).astype(np.float64)
    q2 = (qn**2).sum(axis=0)
    q4 = (qn**4).sum(axis=0)
    n_shell = int(shell.max()) + 1
    use = band.copy()
    cross_s = np.bincount(shell[use], (tot_pow - self_pow)[use], n_shell)
    cross_d = np.bincount(shell[use], (p_count * (q2**2 - q4))[use], n_shell)
    self_s = np.bincount(shell[use], self_pow[use], n_shell)
    q2_s = np.bincount(shell[use], (p_count * q2)[use], n_shell)
    q4_s = np.bincount(shell[use], (p_count * q4)[use], n_shell)
    has = cross_d > 0
    tau = np.zeros(n_shell)
    tau[has] = np.maximum(cross_s[has] / cross_d[has], 0.0)
    # per-frame SNR above ~10 does not occur in movie frames; the floor keeps w finite where the
    # subtraction below is ill-conditioned (strong low-resolution signal, few coefficients)
    sigma = np.full(n_shell, np.inf)
    sigma[has] = np.maximum((self_s[has] - tau[has] * q4_s[has]) / q2_s[has], 0.1 * self_s[has] / q2_s[has])
    t_k = tau[shell]
    s_k = sigma[shell]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(band, t_k / (s_k * (s_k + t_k * q2)), 0.0)
    w = np.nan_to_num(w, nan=0.0, posinf=0.0)
    w[:, 0] *= 0.5
    return sigma, tau, w


def shift_phases(spec: BandSpectra, d: Any) -> tuple[Any, Any]:
    """(P, Fa, ny), (P, Fa, nx): ``exp(+2πi ky dy)``, ``exp(+2πi kx dx)`` for shifts d (P, Fa, 2) px.

    On the CPU built from real cos/sin of the phase (vectorised for float32; NumPy's complex
    ``exp`` is 5x slower), in the precision of ``spec.x``.
    """
    xp = spec.xp
    two_pi = 2.0 * math.pi
    rdtype = spec.rdtype
    d = xp.asarray(d, dtype=rdtype)

    def unit(theta: Any) -> Any:
        if backend.is_gpu(xp):
            return xp.exp(1j * theta).astype(spec.x.dtype, copy=False)
        out = xp.empty(theta.shape, dtype=spec.x.dtype)
        out.real = xp.cos(theta)
        out.imag = xp.sin(theta)
        return out

    return unit(d[..., 1, None] * (two_pi * spec.ky)), unit(d[..., 0, None] * (two_pi * spec.kx))


def _chunk(spec: BandSpectra) -> int:
    """Particles per pass: small enough for the CPU cache (~2 MB per temporary), large on the GPU."""
    p_count, fa, ny, nx = spec.x.shape
    budget = _TERM_CHUNK_ELEMS if backend.is_gpu(spec.xp) else _CPU_CHUNK_ELEMS
    return max(1, min(p_count, budget // max(fa * ny * nx, 1)))


def self_term(spec: BandSpectra) -> float:
    """``Σ_p Σ_k w Σ_t |X_t|²``: the shift-independent self terms (cached on ``spec``; set
    ``spec.self_power = None`` after changing ``spec.weight``)."""
    if spec.self_power is None:
        xp = spec.xp

        def run(sl: slice) -> float:
            x = spec.x[sl]
            return float(((x.real**2 + x.imag**2).sum(axis=1) * spec.weight).sum())

        spec.self_power = sum(backend.map_chunks(run, spec.x.shape[0], _chunk(spec), xp))
    return spec.self_power


def _aligned_chunk(spec: BandSpectra, d: Any, sl: slice) -> Any:
    """(Pc, Fa, ny, nx) ``G_t`` of the particles ``sl`` (two in-place passes over one chunk)."""
    ey, ex = shift_phases(spec, d[sl])
    g = spec.x[sl] * ey[..., :, None]
    g *= ex[..., None, :]
    return g


def _as_pairs(g: Any) -> Any:
    """(..., ny, nx) complex -> (..., 2·ny·nx) real view, interleaved (re, im) per coefficient (no copy)."""
    return g.reshape(*g.shape[:-2], -1).view(g.real.dtype)


def data_term(spec: BandSpectra, d: Any, gradient: bool = True) -> tuple[float, Any]:
    """Log-likelihood ``Σ_p Σ_k w (|Σ_t G|² - Σ_t |G|²)`` and its gradient (P, Fa, 2) w.r.t. d (px).

    ``d``: (P, Fa, 2) local shifts for the frames of ``spec`` (array of ``spec.xp``). Computed in
    particle chunks (:func:`_chunk`, on all CPU threads via :func:`gpu.backend.map_chunks`). The
    gradient ``-4π Σ_k w k Im(conj(A) G_t)`` with ``Im(conj(A) G) = Re A·Im G - Im A·Re G`` is one
    batched matrix product of the (re, im)-interleaved view of ``G`` (P, Fa, 2K) with the
    per-particle columns ``(-Im A·w k, Re A·w k)`` (P, 2K, 2): no product spectrum is formed.
    Returns (value: float, grad or None).
    """
    xp = spec.xp
    p_count, fa, ny, nx = spec.x.shape
    rdtype = spec.rdtype
    d = xp.asarray(d, dtype=rdtype)
    w = spec.weight.astype(rdtype)
    wk = xp.stack([(w * spec.kx[None, :]).ravel(), (w * spec.ky[:, None]).ravel()], axis=1).astype(rdtype)  # (K, 2)
    grad = xp.empty((p_count, fa, 2), dtype=rdtype) if gradient else None

    def run(sl: slice) -> float:
        g = _aligned_chunk(spec, d, sl)
        a = g.sum(axis=1)
        value = float(((a.real**2 + a.imag**2) * w).sum())
        if gradient:
            ar = a.real.reshape(-1, ny * nx, 1)
            ai = a.imag.reshape(-1, ny * nx, 1)
            cols = xp.empty((ar.shape[0], ny * nx, 2, 2), dtype=rdtype)  # (Pc, K, re|im slot, x|y)
            cols[:, :, 0] = -ai * wk
            cols[:, :, 1] = ar * wk
            grad[sl] = xp.matmul(_as_pairs(g), cols.reshape(ar.shape[0], 2 * ny * nx, 2)) * (-4.0 * math.pi)
        return value

    value = sum(backend.map_chunks(run, p_count, _chunk(spec), xp))
    return value - self_term(spec), grad


def per_particle_term(spec: BandSpectra, d: Any) -> Any:
    """(P,) per-particle cross-frame log-likelihood ``Σ_k w (|Σ_t G|² - Σ_t |G|²)`` at shifts d (P, Fa, 2)."""
    xp = spec.xp
    p_count = spec.x.shape[0]
    rdtype = spec.rdtype
    d = xp.asarray(d, dtype=rdtype)
    out = xp.empty((p_count,), dtype=xp.float64)

    def run(sl: slice) -> None:
        g = _aligned_chunk(spec, d, sl)
        a = g.sum(axis=1)
        # |G_t|² = |X_t|²: the self term does not depend on the shifts
        self_p = (g.real**2 + g.imag**2).sum(axis=1)
        out[sl] = ((a.real**2 + a.imag**2 - self_p) * spec.weight).sum(axis=(-2, -1))

    backend.map_chunks(run, p_count, _chunk(spec), xp)
    return out


def curvature(spec: BandSpectra) -> Any:
    """(P, Fa) ``h_t = -∂² log L / ∂d_t²`` (x and y averaged) at d = 0, clipped at 0.

    With ``R_t = A - G_t`` (the sum of the other frames): ``∂² log L/∂d_{t,x}² = -8π² Σ_k w kx²
    Re(conj(R_t) G_t)``, so ``h_t = 4π² Σ_k w (kx² + ky²) Re(conj(R_t) X_t)``: how sharply frame t
    of a particle is pinned by the others. Used to precondition the fit (:mod:`gpu.local`).
    """
    xp = spec.xp
    p_count = spec.x.shape[0]
    rdtype = spec.rdtype
    wk2 = (spec.weight * (spec.kx[None, :] ** 2 + spec.ky[:, None] ** 2)).astype(rdtype)
    out = xp.empty(spec.x.shape[:2], dtype=rdtype)

    def run(sl: slice) -> None:
        g = spec.x[sl]
        a = g.sum(axis=1, keepdims=True)
        cross = (a.real * g.real + a.imag * g.imag) - (g.real**2 + g.imag**2)
        out[sl] = (cross * wk2).sum(axis=(-2, -1)) * (4.0 * math.pi**2)

    backend.map_chunks(run, p_count, _chunk(spec), xp)
    return xp.maximum(out, 0)


def aligned_sums(spec: BandSpectra, d: Any, groups: list[Any]) -> list[Any]:
    """``[Σ_{t in group} G_t]``: (P, ny, nx) sums of the aligned spectra over each group of frame positions.

    ``d``: (P, Fa, 2) shifts; ``groups``: index arrays into ``spec.frames``. Chunked over particles
    (never the whole aligned (P, Fa, ny, nx) array at once).
    """
    xp = spec.xp
    p_count, _, ny, nx = spec.x.shape
    rdtype = spec.rdtype
    d = xp.asarray(d, dtype=rdtype)
    idx = [xp.asarray(np.asarray(g, dtype=np.int64)) for g in groups]
    out = [xp.empty((p_count, ny, nx), dtype=spec.x.dtype) for _ in groups]

    def run(sl: slice) -> None:
        g = _aligned_chunk(spec, d, sl)
        for o, i in zip(out, idx, strict=True):
            o[sl] = g[:, i].sum(axis=1)

    backend.map_chunks(run, p_count, _chunk(spec), xp)
    return out


def aligned_spectra(spec: BandSpectra, d: Any) -> Any:
    """(P, Fa, ny, nx) ``G_t = X_t exp(+2πi k·d_t)``: the band spectra aligned by local shifts d (P, Fa, 2)."""
    return _aligned_chunk(spec, d, slice(None))
