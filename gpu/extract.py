"""Particle extraction from a movie with per-frame sub-pixel trajectories, dose weighting and Fourier cropping.

Convention (gpu/__init__): a box of size ``b`` has its centre at index ``b // 2``; positions are
``(x, y)`` px in reference-frame coordinates and a trajectory value ``s_t`` is where the specimen
is in frame ``t``, so in frame ``t`` the particle sits at ``c = position + s_t``.

For each particle and frame the box is cut with its centre pixel at ``round(c)`` (an integer
cut, :func:`cut_patches`), the patch is transformed, the remaining ``c - round(c)`` is removed
by a phase ramp (gpu/shift.py), each frequency is dose-weighted per frame (gpu/dose.py, k in 1/Å),
the frames are summed and the sum is Fourier-cropped to ``out_box`` (gpu/crop.py) — all in one
Fourier pass per chunk of particles ``(P_chunk, F, b, b//2+1)``, with the crop window applied
*before* the ramps and weights so that only the kept frequencies are multiplied.

Speed (CPU): the particle chunks run on the worker's threads (gpu/backend.py ``map_chunks``) and
are small (:func:`chunk_shape`; 4 MiB per step by default: one particle, its frames in steps of
about six at box 256), so that cut patches, their spectra and the window stay in cache between
the passes; on a K3 movie (40 frames, 300 particles, 256 -> 128) that took extraction from
3.2 s to about 1.5 s on 2 cores (benchmarks/engine_k3.py). A frame step adds its frame sum to
the particle's window sum, so the result differs from a one-pass sum only by float32 rounding.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from gpu.backend import array_module, fft, irfft2, map_chunks, rfft, to_numpy
from gpu.crop import CropWindow, crop_window, fold_window, window_rfft, window_row_segments
from gpu.dose import dose_weights
from gpu.shift import ramp_1d

EDGE_REASON = "box leaves the frame"
_CPU_BUDGET = 4 << 20
_GPU_BUDGET = 2 << 30


def _as_strided(xp: ModuleType, a: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    if xp.__name__ == "cupy":
        from cupy.lib.stride_tricks import as_strided

        return as_strided(a, shape=shape, strides=strides)
    return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)


def box_corners(centres_int: np.ndarray, box: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left ``(x0, y0)`` of boxes whose centre pixel (index ``box // 2``) is at ``centres_int (..., 2)``."""
    c = np.asarray(centres_int, dtype=np.int64)
    return c[..., 0] - box // 2, c[..., 1] - box // 2


def boxes_inside(centres_int: np.ndarray, box: int, shape: tuple[int, int]) -> np.ndarray:
    """Bool ``(...)``: the box at each of ``centres_int (..., 2)`` lies wholly inside an ``(h, w)`` frame."""
    h, w = shape
    x0, y0 = box_corners(centres_int, box)
    return (x0 >= 0) & (y0 >= 0) & (x0 + box <= w) & (y0 + box <= h)


def cut_patches(frames: Any, centres_int: Any, box: int, fill: Any = None) -> Any:
    """``(P, F, box, box)`` patches of ``frames (F, h, w)`` centred (pixel ``box//2``) at ``centres_int (P, F, 2)``.

    ``centres_int`` are integer ``(x, y)`` px per particle and frame (host array). Boxes inside
    the frame are gathered with one fancy index into an overlapping-window view of the movie (no
    Python loop, no index array per pixel). ``fill``: value for pixels outside the frame — None
    (then every box must be inside, else ValueError), a scalar, "mean" (each frame's mean) or an
    ``(F,)`` array of per-frame values.
    """
    xp = array_module(frames)
    if frames.ndim != 3:
        raise ValueError(f"cut_patches: frames must be (F, h, w), got shape {tuple(frames.shape)}")
    n_f, h, w = frames.shape
    ci = np.asarray(to_numpy(centres_int)).astype(np.int64)
    if ci.ndim != 3 or ci.shape[1:] != (n_f, 2):
        raise ValueError(f"cut_patches: centres must be (P, {n_f}, 2), got shape {ci.shape}")
    if box > h or box > w:
        raise ValueError(f"cut_patches: box {box} is larger than the ({h}, {w}) frame")
    frames = xp.ascontiguousarray(frames)
    n_p = ci.shape[0]
    if n_p == 0:
        return xp.empty((n_p, n_f, box, box), dtype=frames.dtype)
    inside = boxes_inside(ci, box, (h, w)).all(axis=1)
    x0, y0 = box_corners(ci, box)
    t = np.arange(n_f, dtype=np.int64)[None, :]
    view = None
    if inside.any():
        flat = frames.reshape(-1)
        isz = flat.itemsize
        n_win = flat.size - ((box - 1) * w + box) + 1
        view = _as_strided(xp, flat, (n_win, box, box), (isz, w * isz, isz))
    if inside.all():
        # the gather is the output: no second copy through a temporary (a third of extraction on the CPU)
        return view[xp.asarray(t * (h * w) + y0 * w + x0)]
    out = xp.empty((n_p, n_f, box, box), dtype=frames.dtype)
    if view is not None:
        base = (t * (h * w) + y0 * w + x0)[inside]
        out[xp.asarray(np.flatnonzero(inside))] = view[xp.asarray(base)]
    if not inside.all():
        if fill is None:
            raise ValueError(
                f"cut_patches: {int((~inside).sum())} boxes leave the ({h}, {w}) frame and no fill was given"
            )
        if isinstance(fill, str):
            if fill != "mean":
                raise ValueError(f"cut_patches: fill must be None, a number, 'mean' or (F,) values, got {fill!r}")
            fill_v = frames.mean(axis=(1, 2)).astype(frames.dtype)
        else:
            fill_v = xp.broadcast_to(xp.asarray(fill, dtype=frames.dtype), (n_f,))
        sel = np.flatnonzero(~inside)
        ar = np.arange(box)
        rows = y0[sel][..., None] + ar  # (Pn, F, b)
        cols = x0[sel][..., None] + ar
        ok = ((rows >= 0) & (rows < h))[..., :, None] & ((cols >= 0) & (cols < w))[..., None, :]
        rows_d = xp.asarray(np.clip(rows, 0, h - 1))
        cols_d = xp.asarray(np.clip(cols, 0, w - 1))
        tt = xp.asarray(np.broadcast_to(t, (sel.size, n_f)))[..., None, None]
        cut = frames[tt, rows_d[..., :, None], cols_d[..., None, :]]
        out[xp.asarray(sel)] = xp.where(xp.asarray(ok), cut, fill_v[None, :, None, None])
    return out


def _frame_weights(dose: Any, win: Any, n_f: int, box: int, apix: float, xp: ModuleType) -> Any:
    """Dose weights on the crop window ``(F, rows, cols)`` float32, or None."""
    if dose is None:
        return None
    if isinstance(dose, dict):
        if "dose_per_frame" not in dose:
            raise ValueError("extract_particles: dose dict needs 'dose_per_frame' (and optionally pre_exposure, kv, frame_bfactors)")
        k = np.sqrt(win.ky[:, None] ** 2 + win.kx[None, :] ** 2) / apix  # 1/Å
        return dose_weights(
            xp.asarray(k),
            n_f,
            float(dose["dose_per_frame"]),
            float(dose.get("pre_exposure", 0.0)),
            float(dose.get("kv", 300.0)),
            xp=xp,
            frame_bfactors=dose.get("frame_bfactors"),
        )
    wts = xp.asarray(dose, dtype=xp.float32)
    if tuple(wts.shape) != (n_f, box, box // 2 + 1):
        raise ValueError(
            f"extract_particles: dose weights must be (F, box, box//2+1) = ({n_f}, {box}, {box // 2 + 1}), got {tuple(wts.shape)}"
        )
    return window_rfft(wts, win)


def chunk_shape(
    n_frames: int, box: int, out_box: int, memory_budget: int, particles: int | None = None
) -> tuple[int, int]:
    """``(particles per chunk, frames per step)`` so that one step's working set (patches, their spectra,
    the cropped window) fits ``memory_budget`` bytes: all frames of several particles when one
    particle's fit, else ``particles`` (default 1) with the frames split into equal steps."""
    per = box * box * 4 + box * (box // 2 + 1) * 8 + 2 * (out_box + 1) * (out_box // 2 + 1) * 8
    fit = max(1, int(memory_budget // per))
    if particles is None:
        particles = max(1, fit // n_frames)
    steps = -(-n_frames * particles // fit)
    return particles, -(-n_frames // steps)


def window_ramps(frac: Any, win: CropWindow, xp: ModuleType) -> tuple[Any, Any]:
    """Phase ramps ``(ey (..., rows), ex (..., cols))`` complex64 on the crop window that remove the
    sub-pixel shifts ``frac (..., 2)`` (dx, dy) px (gpu/shift.py; Nyquist bins as there)."""
    fr = xp.asarray(frac, dtype=xp.float64)
    ey = ramp_1d(-fr[..., 1], xp.asarray(win.ky), win.nyquist_row, xp)
    ex = ramp_1d(-fr[..., 0], xp.asarray(win.kx), win.nyquist_col, xp)
    return ey, ex


def window_sum(patches: Any, ramps: tuple[Any, Any], win: CropWindow, weights: Any = None, out: Any = None) -> Any:
    """``Σ_f q_f · FFT(shift(patch_f, -frac_f))`` on the crop window, ``(P, rows, cols)`` complex64, unfolded
    (:func:`gpu.crop.fold_window` turns it into the Fourier crop).

    ``patches (P, F, b, b)`` float32, ``ramps`` = :func:`window_ramps` of their sub-pixel shifts
    ``(P, F, 2)``, ``weights (F, rows, cols)`` on the crop window (or None: a plain sum); ``out``: a
    window sum to add to (frames in steps). The window (``w2//2+1`` columns, then the window rows)
    is transformed as in :func:`gpu.crop.window_rfft2`; its rows are read in place, segment by
    segment, and each segment's ramps, weights and frame sum run while it is in cache (no gathered copy).
    """
    xp = array_module(patches)
    cols = rfft(patches, axis=-1)[..., : win.n_cols]
    g = fft(cols, axis=-2, overwrite_x=True)  # (P, F, b, cols), in place in cols
    ey, ex = ramps[0], ramps[1][..., None, :]
    if out is None:
        out = xp.zeros((patches.shape[0], len(win.m), win.n_cols), dtype=xp.complex64)
    for src, dst in window_row_segments(win):
        t = g[..., src, :] * ey[..., dst, None]
        t *= ex
        if weights is not None:
            t *= weights[:, dst]
        out[:, dst] += t.sum(axis=1)
    return out


def extract_particles(
    frames: Any,
    positions: Any,
    trajectories: Any,
    box: int,
    out_box: int,
    apix: float,
    dose: dict[str, float] | Any | None = None,
    edge: str = "skip",
    chunk: int | None = None,
    memory_budget: int | None = None,
) -> tuple[Any, np.ndarray, list[tuple[int, str]]]:
    """Motion-corrected, dose-weighted, Fourier-cropped particles.

    ``frames (F, h, w)`` float32; ``positions (P, 2)`` (x, y) px in reference-frame coordinates;
    ``trajectories (P, F, 2)`` or ``(F, 2)`` (dx, dy) px; ``box`` cut size and ``out_box`` output
    size (px, ``out_box <= box``; output pixel = ``apix * box / out_box``). ``dose``: None (plain
    sum of frames), a dict ``{dose_per_frame, pre_exposure=0, kv=300, frame_bfactors=None}`` (Grant &
    Grigorieff weights, optionally with per-frame alignment B-factors, normalised so ``Σ_f q_f(k)² = 1``,
    gpu/dose.py), or precomputed weights
    ``(F, box, box//2+1)``. ``edge``: "skip" drops a particle whose box leaves the frame in any
    frame (reason "box leaves the frame"), "pad" fills the outside with that frame's mean.
    ``chunk`` particles per Fourier pass (default from ``memory_budget`` bytes, :func:`chunk_shape`;
    default budget 4 MiB per step on the CPU, where small steps stay in cache and reuse freed
    memory — 64 MiB steps took 1.5x the CPU time, a 1 GiB chunk several times — and 2 GiB on the GPU).

    Returns ``(particles (P', out_box, out_box) float32 on the frames' device, kept (P',) int64
    indices into positions, skipped [(index, reason)])``.
    """
    xp = array_module(frames)
    if frames.ndim != 3:
        raise ValueError(f"extract_particles: frames must be (F, h, w), got shape {tuple(frames.shape)}")
    if edge not in ("skip", "pad"):
        raise ValueError(f"extract_particles: edge must be 'skip' or 'pad', got {edge!r}")
    if not (1 <= out_box <= box):
        raise ValueError(f"extract_particles: out_box must be between 1 and box={box}, got {out_box}")
    n_f, h, w = frames.shape
    pos = np.asarray(to_numpy(positions), dtype=np.float64).reshape(-1, 2)
    traj = np.asarray(to_numpy(trajectories), dtype=np.float64)
    if traj.shape == (n_f, 2):
        traj = np.broadcast_to(traj[None], (pos.shape[0], n_f, 2))
    if traj.shape != (pos.shape[0], n_f, 2):
        raise ValueError(
            f"extract_particles: trajectories must be ({n_f}, 2) or ({pos.shape[0]}, {n_f}, 2), got {traj.shape}"
        )
    centres = pos[:, None, :] + traj  # (P, F, 2)
    ci = np.floor(centres + 0.5).astype(np.int64)
    frac = centres - ci  # in [-0.5, 0.5): what the phase ramp removes
    inside = boxes_inside(ci, box, (h, w)).all(axis=1)
    if edge == "skip":
        kept = np.flatnonzero(inside)
        skipped = [(int(i), EDGE_REASON) for i in np.flatnonzero(~inside)]
    else:
        kept = np.arange(pos.shape[0])
        skipped = []
    out = xp.empty((kept.size, out_box, out_box), dtype=xp.float32)
    if kept.size == 0:
        return out, kept.astype(np.int64), skipped
    frames = xp.ascontiguousarray(frames, dtype=xp.float32)
    win = crop_window(box, box, out_box, out_box)
    wts = _frame_weights(dose, win, n_f, box, apix, xp)
    fill = frames.mean(axis=(1, 2)) if (edge == "pad" and not inside.all()) else None
    if memory_budget is None:
        memory_budget = _GPU_BUDGET if xp.__name__ == "cupy" else _CPU_BUDGET
    step, f_step = chunk_shape(n_f, box, out_box, memory_budget, chunk)

    def run(sl: slice) -> None:
        idx = kept[sl]
        ey, ex = window_ramps(frac[idx], win, xp)
        acc = None
        for f in range(0, n_f, f_step):
            fs = slice(f, f + f_step)
            patches = cut_patches(frames[fs], ci[idx, fs], box, fill=None if fill is None else fill[fs])
            acc = window_sum(patches, (ey[:, fs], ex[:, fs]), win, None if wts is None else wts[fs], acc)
        out[sl] = irfft2(fold_window(acc, win), s=(out_box, out_box))

    map_chunks(run, kept.size, step, xp)
    return out, kept.astype(np.int64), skipped
