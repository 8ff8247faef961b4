"""Fourier cropping (band-limited downsampling) and real-space binning.

Convention (gpu/__init__): unnormalised forward FFT, cycles/px frequencies, pixel centres at
integer indices; sample ``i`` of an ``(h2, w2)`` Fourier crop of an ``(h, w)`` image sits at input
position ``(i * h / h2, j * w / w2)``, so a box centre ``b // 2`` maps to ``b2 // 2`` (even sizes).

Definition: the crop keeps every frequency representable on the coarse grid — signed row
frequency indices ``|m| <= h2 // 2`` and column indices ``<= w2 // 2`` (a rectangle, not a disc)
— and resamples the trigonometric interpolant on the coarse grid. For an even output size the
two input frequencies ``+N`` and ``-N`` (N = new Nyquist) land in the same output bin and are
*summed* (that is what sampling does), which keeps the output Hermitian (real) and makes the crop
of any image band-limited to ``|k| <= N`` exactly equal to that image sampled on the coarse grid.
The result is scaled by ``h2 w2 / (h w)`` so that the real-space mean is preserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu.backend import array_module, fft, irfft2, is_gpu, map_chunks, rfft, rfft2
from gpu.fourier import next_smooth_even, prev_smooth_even


@dataclass(frozen=True)
class CropWindow:
    """Which input rfft bins feed an ``(h, w) -> (h2, w2)`` Fourier crop, before folding.

    ``m``: signed row frequency indices of the window rows (FFT order); ``src_rows``: the input
    rows they come from (``m mod h``); ``neg``: for each window row, the window row of ``-m``.
    The window has ``w2 // 2 + 1`` columns (input columns ``0..w2//2``). ``fold_rows`` /
    ``fold_cols``: an even, smaller output whose ±Nyquist bins are summed by :func:`fold_window`.
    ``nyquist_row`` / ``nyquist_col``: a window index that is already a single shared ±0.5 input
    Nyquist bin (no crop along that axis, even size), for phase ramps (gpu/shift.py) or None.
    """

    h: int
    w: int
    h2: int
    w2: int
    m: np.ndarray
    src_rows: np.ndarray
    neg: np.ndarray
    fold_rows: bool
    fold_cols: bool
    nyquist_row: int | None
    nyquist_col: int | None

    @property
    def n_cols(self) -> int:
        return self.w2 // 2 + 1

    @property
    def ky(self) -> np.ndarray:
        """(rows,) input-grid row frequencies of the window, cycles per input px."""
        return self.m / self.h

    @property
    def kx(self) -> np.ndarray:
        """(cols,) input-grid column frequencies of the window, cycles per input px."""
        return np.arange(self.n_cols) / self.w

    @property
    def scale(self) -> float:
        """Factor that preserves the real-space mean: ``h2 w2 / (h w)``."""
        return self.h2 * self.w2 / (self.h * self.w)


def crop_window(h: int, w: int, h2: int, w2: int) -> CropWindow:
    """The :class:`CropWindow` for cropping an ``(h, w)`` image's rfft to ``(h2, w2)``."""
    if not (1 <= h2 <= h and 1 <= w2 <= w):
        raise ValueError(f"crop_window: cannot Fourier-crop ({h}, {w}) to ({h2}, {w2}): output must not be larger")
    if h2 == h:
        m = np.fft.fftfreq(h, 1.0 / h).round().astype(np.int64)
        fold_rows = False
        nyquist_row = h // 2 if h % 2 == 0 else None
    else:
        half = h2 // 2
        n_neg = half if h2 % 2 == 0 else (h2 - 1) // 2
        m = np.concatenate([np.arange(0, half + 1), np.arange(-n_neg, 0)]).astype(np.int64)
        fold_rows = h2 % 2 == 0
        nyquist_row = None
    src_rows = m % h
    lookup = {int(r): i for i, r in enumerate(src_rows)}
    neg = np.array([lookup[int((-mm) % h)] for mm in m], dtype=np.int64)
    fold_cols = w2 < w and w2 % 2 == 0
    nyquist_col = w // 2 if (w2 == w and w % 2 == 0) else None
    return CropWindow(h, w, h2, w2, m, src_rows, neg, fold_rows, fold_cols, nyquist_row, nyquist_col)


def window_rfft(spectra: Any, win: CropWindow) -> Any:
    """Gather the window ``(..., rows, w2//2+1)`` from rfft ``spectra (..., h, w//2+1)`` (or any array
    on that grid, e.g. real weights). Rows in FFT order; two slices, no fancy indexing."""
    xp = array_module(spectra)
    if spectra.shape[-2] != win.h or spectra.shape[-1] != win.w // 2 + 1:
        raise ValueError(
            f"window_rfft: spectra of shape {tuple(spectra.shape[-2:])} do not match a ({win.h}, {win.w}) rfft grid"
        )
    n_pos = int(np.sum(win.m >= 0))
    n_neg = len(win.m) - n_pos
    c = win.n_cols
    if n_neg == 0 or win.h2 == win.h:
        return spectra[..., :, :c] if win.h2 == win.h else spectra[..., :n_pos, :c]
    return xp.concatenate([spectra[..., :n_pos, :c], spectra[..., win.h - n_neg :, :c]], axis=-2)


def window_row_segments(win: CropWindow) -> list[tuple[slice, slice]]:
    """``[(input rows, window rows)]``: the window's rows as at most two contiguous slices of the input
    grid (``m >= 0`` first, then ``m < 0``), so a pass over the window can read them in place."""
    if win.h2 == win.h:
        return [(slice(0, win.h), slice(0, win.h))]
    n_pos = int(np.sum(win.m >= 0))
    n_neg = len(win.m) - n_pos
    segs = [(slice(0, n_pos), slice(0, n_pos))]
    if n_neg:
        segs.append((slice(win.h - n_neg, win.h), slice(n_pos, n_pos + n_neg)))
    return segs


def _window_rows(spectra: Any, win: CropWindow) -> Any:
    """The window's rows ``(..., rows, c)`` of ``spectra (..., h, c)`` in FFT order (two slices)."""
    xp = array_module(spectra)
    segs = window_row_segments(win)
    if len(segs) == 1:
        return spectra if win.h2 == win.h else spectra[..., segs[0][0], :]
    return xp.concatenate([spectra[..., src, :] for src, _ in segs], axis=-2)


def window_rfft2(images: Any, win: CropWindow) -> Any:
    """``window_rfft(rfft2(images), win)`` for real ``images (..., h, w)``, about 25% cheaper.

    The row transforms (1-D rfft along x) are followed by column transforms of only the
    ``w2//2+1`` window columns instead of all ``w//2+1``; the window rows are then gathered.
    """
    if images.shape[-2] != win.h or images.shape[-1] != win.w:
        raise ValueError(f"window_rfft2: images of shape {tuple(images.shape[-2:])} do not match a ({win.h}, {win.w}) window")
    cols = rfft(images, axis=-1)[..., : win.n_cols]
    return _window_rows(fft(cols, axis=-2, overwrite_x=True), win)


def fold_window(g: Any, win: CropWindow) -> Any:
    """Fold windowed spectra ``(..., rows, w2//2+1)`` to the output rfft grid ``(..., h2, w2//2+1)``.

    Sums the ±Nyquist pairs (column first: ``G(ky, N) + conj(G(-ky, N))``, then rows) and applies
    the mean-preserving scale ``h2 w2 / (h w)``.
    """
    xp = array_module(g)
    g = g * np.float32(win.scale)
    if win.fold_cols:
        c = win.n_cols - 1
        g[..., :, c] = g[..., :, c] + xp.conj(g[..., xp.asarray(win.neg), c])
    if win.fold_rows:
        n = win.h2 // 2
        merged = (g[..., n, :] + g[..., n + 1, :])[..., None, :]
        g = xp.concatenate([g[..., :n, :], merged, g[..., n + 2 :, :]], axis=-2)
    return g


def fourier_crop_rfft(spectra: Any, out: tuple[int, int], w: int | None = None) -> Any:
    """Crop rfft ``spectra (..., h, w//2+1)`` to ``(..., h2, w2//2+1)`` for output ``out = (h2, w2)``.

    ``w``: the real width of the input (default ``2 * (cols - 1)``, i.e. even). Mean-preserving.
    """
    h = spectra.shape[-2]
    w = int(w) if w is not None else 2 * (spectra.shape[-1] - 1)
    win = crop_window(h, w, int(out[0]), int(out[1]))
    return fold_window(window_rfft(spectra, win), win)


def fourier_crop(images: Any, out_shape: tuple[int, int]) -> Any:
    """Band-limited downsampling of real ``images (..., h, w)`` to ``(..., h2, w2)`` float32."""
    xp = array_module(images)
    images = xp.asarray(images, dtype=xp.float32)
    h, w = images.shape[-2:]
    h2, w2 = int(out_shape[0]), int(out_shape[1])
    if (h2, w2) == (h, w):
        return images.copy()
    spec = fourier_crop_rfft(rfft2(images), (h2, w2), w)
    return irfft2(spec, s=(h2, w2)).astype(xp.float32, copy=False)


def bin_real(frames: Any, factor: int, reduce: str = "mean", chunk: int = 4) -> Any:
    """Integer real-space binning ``(..., h, w) -> (..., h // factor, w // factor)`` float32.

    Each output pixel pools a ``factor x factor`` block (trailing rows/columns that do not fill
    a block are dropped), so output pixel ``j`` is centred at input ``j * factor + (factor - 1)/2``.
    ``reduce``: "mean" or "sum". Leading dims are processed ``chunk`` images at a time, and on the
    CPU in blocks of rows (about 2 MiB of input each), so the temporaries stay in cache instead of
    being freshly mapped per image; pooling uses strided adds (much faster than a reshape-reduce
    on the CPU).
    """
    xp = array_module(frames)
    if int(factor) != factor or factor < 1:
        raise ValueError(f"bin_real needs a positive integer factor, got {factor}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"bin_real: reduce must be 'mean' or 'sum', got {reduce!r}")
    f = int(factor)
    lead = frames.shape[:-2]
    h, w = frames.shape[-2:]
    hb, wb = h // f, w // f
    if hb == 0 or wb == 0:
        raise ValueError(f"bin_real: cannot bin ({h}, {w}) by {f}")
    flat = frames.reshape((-1, h, w))
    out = xp.empty((flat.shape[0], hb, wb), dtype=xp.float32)
    scale = np.float32(1.0 / (f * f)) if reduce == "mean" else None
    rows = hb if is_gpu(xp) else max(1, (2 << 20) // (chunk * f * w * flat.itemsize))
    for i in range(0, flat.shape[0], chunk):
        for r in range(0, hb, rows):
            r1 = min(hb, r + rows)
            v = flat[i : i + chunk, r * f : r1 * f, : wb * f]
            dst = out[i : i + chunk, r:r1]
            _strided_sum(_strided_sum(v, f, -2, xp), f, -1, xp, out=dst)
            if scale is not None:
                dst *= scale
    return out.reshape((*lead, hb, wb))


def _strided_sum(v: Any, f: int, axis: int, xp: Any, out: Any = None) -> Any:
    """float32 sum of every ``f``-th slice along ``axis`` (-2 or -1), starting at 0..f-1; the first add
    writes the new array (or ``out``) directly (no cast copy of the first slice)."""

    def part(j: int) -> Any:
        return v[..., j::f, :] if axis == -2 else v[..., j::f]

    if f == 1:
        if out is None:
            return part(0).astype(xp.float32)
        out[...] = part(0)
        return out
    acc = xp.add(part(0), part(1), dtype=xp.float32, out=out)
    for j in range(2, f):
        acc += part(j)
    return acc


@dataclass(frozen=True)
class Downsampled:
    """Result of :func:`downsample_spectra`.

    ``spectra``: ``(..., hc, wc//2+1)`` complex64 rfft of the downsampled images; ``shape``:
    ``(hc, wc)``; ``scale``: ``(sy, sx)`` input px per output px; ``bin``: the integer real-space
    factor used first; ``offset``: input position of output pixel 0 (``(bin - 1) / 2``).
    """

    spectra: Any
    shape: tuple[int, int]
    scale: tuple[float, float]
    bin: int
    offset: float


def downsample_plan(h: int, w: int, factor: float) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """``(bin, (hb, wb), (hc, wc))`` for downsampling ``(h, w)`` by ``factor`` (>= 1).

    Integer real-space binning by ``bin = max(1, round(factor / 2))`` (cheap, and its box filter has
    zeros at the frequencies that would alias onto the kept band's centre), real crop to FFT-friendly
    ``(hb, wb)``, then a Fourier crop to FFT-friendly even ``(hc, wc)`` whose pixel is at most
    ``factor`` input px (Nyquist at least as fine as asked).
    """
    factor = max(1.0, float(factor))
    b = max(1, int(np.floor(factor / 2.0 + 0.5)))
    hb, wb = prev_smooth_even(h // b), prev_smooth_even(w // b)
    hc = min(hb, next_smooth_even(hb * b / factor - 1e-6))
    wc = min(wb, next_smooth_even(wb * b / factor - 1e-6))
    return b, (hb, wb), (hc, wc)


def edge_taper(h: int, w: int, fraction: float, xp: Any = np) -> Any:
    """``(h, w)`` float32 window: 1 inside, a raised-cosine fall to 0 over ``fraction`` of each size at every edge."""

    def ramp(n: int) -> np.ndarray:
        v = np.ones(n)
        e = min(n // 2, round(n * fraction))
        if e > 0:
            r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(e) + 0.5) / e)
            v[:e] = r
            v[n - e :] = r[::-1]
        return v

    return xp.asarray((ramp(h)[:, None] * ramp(w)[None, :]).astype(np.float32))


def downsample_spectra(frames: Any, factor: float, chunk: int = 1, taper: float = 0.0) -> Downsampled:
    """Bin ``frames (F, h, w)`` to a pixel of about ``factor`` input px and return their rfft spectra.

    Plan from :func:`downsample_plan`; work is done ``chunk`` frames at a time, so no full-size
    complex array of the movie is ever held (one frame at a time is also the fastest on the CPU:
    the temporaries stay small enough to be reused instead of page-faulted in again); on the CPU the
    chunks run on the worker's threads (:func:`gpu.backend.map_chunks`).
    ``taper`` > 0: each binned frame ``x`` becomes ``mean + (x - mean) * edge_taper(fraction=taper)``
    before the transform, so its edges fade to its mean (no wrap-around discontinuity).
    """
    xp = array_module(frames)
    if frames.ndim != 3:
        raise ValueError(f"downsample_spectra: frames must be (F, h, w), got shape {tuple(frames.shape)}")
    n, h, w = frames.shape
    b, (hb, wb), (hc, wc) = downsample_plan(h, w, factor)
    win = crop_window(hb, wb, hc, wc)
    out = xp.empty((n, hc, wc // 2 + 1), dtype=xp.complex64)
    window = edge_taper(hb, wb, taper, xp) if taper > 0 else None

    def run(sl: slice) -> None:
        part = frames[sl, : hb * b, : wb * b]
        binned = bin_real(part, b, chunk=chunk) if b > 1 else part.astype(xp.float32)
        if window is not None:
            # in place: the same arithmetic as mean + (x - mean) * window, without three temporaries
            mean = binned.mean(axis=(1, 2), keepdims=True)
            binned -= mean
            binned *= window
            binned += mean
        out[sl] = fold_window(window_rfft2(binned, win), win)

    map_chunks(run, n, chunk, xp)
    return Downsampled(out, (hc, wc), (b * hb / hc, b * wb / wc), b, (b - 1) / 2.0)


def downsample(frames: Any, factor: float) -> tuple[Any, tuple[float, float]]:
    """Real-space version of :func:`downsample_spectra`: ``(images (F, hc, wc) float32, (sy, sx))``."""
    d = downsample_spectra(frames, factor)
    return irfft2(d.spectra, s=d.shape).astype(array_module(frames).float32, copy=False), d.scale
