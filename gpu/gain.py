"""Gain application, hot-pixel detection and pixel replacement on counting-mode movies.

Convention (gpu/__init__): the gain is oriented first (``rotate`` quarter turns CCW with
``rot90``, then ``flip_x`` reverses columns, then ``flip_y`` reverses rows) and then multiplies
(``multiply``) or divides (``divide``) the raw frames. The engine always multiplies: a gain is turned
into a float32 multiplier once (:func:`gain_multiplier`), 0 where the gain is not finite or (for
``divide``) 0, so a dead or undefined gain pixel gives 0 counts, never NaN or Inf (hot-pixel and
defect replacement then fill such pixels where asked). This is the one implementation;
``streamer.formats.gainref`` reads gain files and calls it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from scipy import stats

from gpu.backend import array_module, cpu_threads, map_chunks, to_numpy

_CPU_BLOCK_BYTES = 1 << 20  # output rows per cast+multiply step on the CPU: stays in L2
_BLOCK = 64  # px; local level for hot-pixel detection is estimated per block of this size


def orient_gain(gain: Any, rotate: int = 0, flip_x: bool = False, flip_y: bool = False) -> Any:
    """Orient a gain ``(h, w)``: ``rot90(gain, rotate)`` (CCW), then reverse columns, then rows."""
    xp = array_module(gain)
    g = xp.rot90(gain, int(rotate) % 4)
    if flip_x:
        g = g[:, ::-1]
    if flip_y:
        g = g[::-1, :]
    return xp.ascontiguousarray(g)


def gain_multiplier(gain: Any, mode: str) -> Any:
    """The ``(h, w)`` float32 multiplier for ``mode``: ``multiply`` -> gain, ``divide`` -> 1/gain;
    0 where the gain is not finite, and for ``divide`` where it is 0. A new C-contiguous array."""
    xp = array_module(gain)
    g = xp.asarray(gain, dtype=xp.float32)
    usable = xp.isfinite(g)
    if mode == "multiply":
        return xp.ascontiguousarray(xp.where(usable, g, np.float32(0.0)), dtype=xp.float32)
    if mode == "divide":
        usable &= g != 0
        safe = xp.where(usable, g, np.float32(1.0))
        return xp.ascontiguousarray(xp.where(usable, np.float32(1.0) / safe, np.float32(0.0)), dtype=xp.float32)
    raise ValueError(f"gain_multiplier: gain mode must be 'multiply' or 'divide', got {mode!r}")


def apply_gain(
    frames: Any,
    multiplier: Any | None,
    out_dtype: Any = np.float32,
    chunk: int = 4,
    out: Any | None = None,
    xp: ModuleType | None = None,
    sum_out: Any | None = None,
) -> Any:
    """``frames (F, h, w)`` of any dtype times ``multiplier (h, w)`` (or just cast when None).

    Returns ``(F, h, w)`` of ``out_dtype`` on ``xp``'s device (default: where ``frames`` are), into
    ``out`` when given (a C-contiguous array of that shape and dtype, e.g. a buffer reused between
    movies so its pages are not faulted in again). ``multiplier`` may be a host or device array.

    * CPU (``xp`` numpy): the cast and the product run one block of rows at a time, so the float32
      block is still in cache when it is multiplied (one pass over the output).
    * GPU (``xp`` cupy): ``chunk`` frames at a time; host ``frames`` are uploaded chunk by chunk,
      so the device holds the float32 output plus one raw chunk, never the whole raw movie
      (peak device bytes = F·h·w·4 + chunk·h·w·raw itemsize + h·w·4).

    Either way an 8-bit movie never has a second full-size temporary besides the output. When
    ``multiplier`` is None, ``out`` is None and the frames already have ``out_dtype`` on ``xp``,
    the input itself is returned (no copy). ``sum_out``: an ``(h, w)`` array of ``out_dtype`` that
    receives the sum of the corrected frames (for :func:`hot_pixel_mask`); on the CPU it is
    accumulated while each block is in cache (no second pass over the movie), and frames are
    split between the worker's threads (:func:`gpu.backend.map_chunks`).
    """
    src = array_module(frames)
    xp = xp or src
    if src is not np and xp is np:
        raise ValueError("apply_gain: frames are on the device but xp is numpy (download them first)")
    if frames.ndim != 3:
        raise ValueError(f"apply_gain: frames must be (F, h, w), got shape {tuple(frames.shape)}")
    if multiplier is not None and tuple(multiplier.shape) != tuple(frames.shape[-2:]):
        raise ValueError(
            f"apply_gain: gain of shape {tuple(multiplier.shape)} does not match frames of shape "
            f"{tuple(frames.shape[-2:])} (check gain rotation)"
        )
    dt = xp.dtype(out_dtype)
    if sum_out is not None and (tuple(sum_out.shape) != tuple(frames.shape[-2:]) or sum_out.dtype != dt):
        raise ValueError(f"apply_gain: sum_out is {tuple(sum_out.shape)} {sum_out.dtype}, need {tuple(frames.shape[-2:])} {dt}")
    if out is None:
        if multiplier is None and frames.dtype == dt and src is xp:
            if sum_out is not None:
                sum_out[...] = frames.sum(axis=0)
            return frames
        out = xp.empty(frames.shape, dtype=dt)
    elif tuple(out.shape) != tuple(frames.shape) or out.dtype != dt or array_module(out) is not xp:
        raise ValueError(
            f"apply_gain: out is {tuple(out.shape)} {out.dtype} ({array_module(out).__name__}), "
            f"need {tuple(frames.shape)} {dt} ({xp.__name__})"
        )
    m = None if multiplier is None else xp.asarray(multiplier, dtype=dt)
    if xp is np:
        _gain_cpu(frames, m, out, sum_out)
        return out
    out = _gain_by_frame_chunks(frames, m, out, chunk, xp)
    if sum_out is not None:
        sum_out[...] = out.sum(axis=0)
    return out


def _gain_cpu(frames: np.ndarray, m: np.ndarray | None, out: np.ndarray, sum_out: np.ndarray | None) -> None:
    """CPU body of :func:`apply_gain`: blocks of rows (all frames of a block while its gain and sum
    rows stay in cache); the blocks are split between the worker's threads (disjoint rows, no
    partial sums to allocate or merge)."""
    n_f, h, w = frames.shape
    rows = max(1, _CPU_BLOCK_BYTES // max(1, w * out.itemsize))

    def run(rs: slice) -> None:
        for r in range(rs.start, rs.stop, rows):
            r1 = min(rs.stop, r + rows)
            acc = None if sum_out is None else sum_out[r:r1]
            for f in range(n_f):
                o = out[f, r:r1]
                np.copyto(o, frames[f, r:r1], casting="unsafe")
                if m is not None:
                    o *= m[r:r1]
                if acc is not None:
                    if f == 0:
                        acc[...] = o
                    else:
                        acc += o

    n_blocks = -(-h // rows)
    per_thread = -(-n_blocks // max(1, cpu_threads()))
    map_chunks(run, h, per_thread * rows)


def _gain_by_frame_chunks(frames: Any, m: Any | None, out: Any, chunk: int, xp: ModuleType) -> Any:
    """``out[i:i+chunk] = frames[i:i+chunk] * m`` (cast to ``out.dtype``) for each chunk of frames.

    ``xp.asarray`` of a chunk uploads it when ``frames`` live on the host (a no-op for device
    frames), so only one raw chunk is on the device at a time. Runs as is with ``xp`` = numpy.
    """
    for i in range(0, frames.shape[0], max(1, chunk)):
        raw = xp.asarray(frames[i : i + chunk])
        if m is None:
            out[i : i + chunk] = raw
        else:
            xp.multiply(raw, m, out=out[i : i + chunk], dtype=out.dtype, casting="unsafe")
        del raw  # freed before the next upload, else two raw chunks are live at the assignment
    return out


def _block_index(n: int, nb: int, bs: int, xp: Any) -> Any:
    """Block of each pixel along one axis; the remainder beyond ``nb * bs`` joins the last block."""
    return xp.minimum(xp.arange(n) // bs, nb - 1)


def hot_pixel_mask(frame_sum: Any, sigma: float, block: int = _BLOCK, passes: int = 3) -> Any:
    """Bool ``(h, w)``: pixels whose summed count is far above their neighbourhood's.

    Model: the summed count of a good pixel is Poisson with a local mean ``λ`` (per
    ``block x block`` area) times a dispersion ``φ`` (1 for raw counts; >1 for gain-scaled data or
    texture; estimated as the median over blocks of var/mean, floored at 1). A pixel is hot when
    ``x > φ · Q(λ/φ)`` where ``Q`` is the Poisson quantile with the one-sided Gaussian tail
    probability of ``sigma`` (6σ -> 1e-9), so the false-positive rate is that of a ``sigma``-σ cut
    even at a fraction of a count per pixel, where ``λ + sigma √λ`` would flag hundreds per K3 frame.
    ``λ`` and ``φ`` are re-estimated ``passes`` times without the pixels flagged so far (robust level).
    ``sigma <= 0`` disables detection (all False). Values are assumed in counts (or scaled up).
    """
    xp = array_module(frame_sum)
    if frame_sum.ndim != 2:
        raise ValueError(f"hot_pixel_mask: frame_sum must be (h, w), got shape {tuple(frame_sum.shape)}")
    h, w = frame_sum.shape
    if sigma <= 0:
        return xp.zeros((h, w), dtype=bool)
    x = xp.asarray(frame_sum, dtype=xp.float32)
    bs_y, bs_x = min(block, h), min(block, w)
    nby, nbx = h // bs_y, w // bs_x
    by, bx = _block_index(h, nby, bs_y, xp), _block_index(w, nbx, bs_x, xp)
    core = x[: nby * bs_y, : nbx * bs_x]
    tail_p = float(stats.norm.sf(sigma))
    mask = xp.zeros((h, w), dtype=bool)
    for _ in range(max(1, passes)):
        good = ~mask[: nby * bs_y, : nbx * bs_x]
        xg = xp.where(good, core, np.float32(0.0)).astype(xp.float64)
        s0 = good.reshape(nby, bs_y, nbx, bs_x).sum(axis=(1, 3))
        s1 = xg.reshape(nby, bs_y, nbx, bs_x).sum(axis=(1, 3))
        s2 = (xg * xg).reshape(nby, bs_y, nbx, bs_x).sum(axis=(1, 3))
        # the block statistics are tiny (one value per block): the Poisson quantile runs on the host
        n = np.maximum(to_numpy(s0).astype(np.float64), 1.0)
        lam = to_numpy(s1) / n
        var = np.maximum(to_numpy(s2) / n - lam * lam, 0.0)
        ratio = var[lam > 0] / lam[lam > 0]
        phi = max(1.0, float(np.median(ratio))) if ratio.size else 1.0
        thr_blocks = phi * stats.poisson.isf(tail_p, lam / phi)
        thr = xp.asarray(thr_blocks.astype(np.float32))
        new = x > thr[by][:, bx]
        if bool((new == mask).all()):
            break
        mask = new
    return mask


def replace_pixels(frames: Any, mask: Any, rng: np.random.Generator | None = None, radius: int = 2) -> Any:
    """Replace the ``mask (h, w)`` pixels of every frame of ``frames (F, h, w)`` (float, in place).

    The local level is the mean of the unmasked pixels in the ``(2 radius + 1)²`` neighbourhood.
    ``rng`` None: each frame gets its own neighbourhood mean in that frame. ``rng`` given: each
    frame gets an independent Poisson draw with the neighbourhood mean over all frames (keeps
    counting statistics). Either way the value changes from frame to frame, so replaced pixels do
    not form a fixed pattern that would pull motion estimates towards zero. Pixels with no
    unmasked neighbour get the mean over all replaced pixels' neighbourhoods. Returns ``frames``.
    """
    xp = array_module(frames)
    if frames.ndim != 3 or tuple(mask.shape) != tuple(frames.shape[-2:]):
        raise ValueError(
            f"replace_pixels: frames (F, h, w) and mask (h, w) do not match: {tuple(frames.shape)} vs {tuple(mask.shape)}"
        )
    mask = xp.asarray(mask, dtype=bool)
    ys, xs = xp.nonzero(mask)
    if int(ys.shape[0]) == 0:
        return frames
    n_f, h, w = frames.shape
    d = xp.arange(-radius, radius + 1)
    dy, dx = xp.meshgrid(d, d, indexing="ij")
    ny = ys[:, None] + dy.reshape(1, -1)
    nx = xs[:, None] + dx.reshape(1, -1)
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    ny, nx = xp.clip(ny, 0, h - 1), xp.clip(nx, 0, w - 1)
    valid = inside & ~mask[ny, nx]
    vals = frames[:, ny, nx].astype(xp.float64)  # (F, n, K)
    cnt = valid.sum(axis=1)  # (n,)
    per_frame = (vals * valid[None]).sum(axis=2)  # (F, n)
    total_valid = int(cnt.sum())
    fallback = float(per_frame.sum()) / (n_f * total_valid) if total_valid else 0.0
    safe = xp.maximum(cnt, 1)[None, :]
    local = xp.where(cnt[None, :] > 0, per_frame / safe, fallback)  # (F, n)
    if rng is None:
        frames[:, ys, xs] = local.astype(frames.dtype)
    else:
        lam = np.clip(to_numpy(local.mean(axis=0)), 0.0, None)  # (n,) host: tiny
        draws = rng.poisson(lam[None, :], size=(n_f, lam.shape[0])).astype(np.float32)
        frames[:, ys, xs] = xp.asarray(draws).astype(frames.dtype)
    return frames
