"""``plots/<movie stem>.png``: the aligned micrograph with every particle's trajectory drawn on it.

Each particle's trajectory *relative to the full-frame motion* (its local motion, what per-particle
correction adds; the full-frame path, tens of Å, would swamp it at this magnification and is given
in the title) is drawn from its pick position (movie px / binning) with offsets
``(s_t - S_t) / (apix * binning) * scale`` (Å -> binned px, magnified ``scale`` = 40x as in
cryoSPARC's diagnostic): raw estimates in grey, the smoothed trajectory used for extraction in red,
a dot at frame 0. Image rows run downwards as in the array (row 0 at the top), so positions read exactly
as the picks' (column, row) pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from streamer.formats import atomic
from streamer.types import MovieResult

TITLE_PX = 44
PLOT_SCALE = 40.0  # magnification of the drawn trajectories (cryoSPARC's diagnostic)
DPI = 100


def plot_size(micrograph_shape: tuple[int, int], width_px: int = 1000) -> tuple[int, int]:
    """(height, width) in pixels of the PNG ``plot_trajectories`` writes for a (h, w) micrograph."""
    h, w = micrograph_shape
    return round(width_px * h / w) + TITLE_PX, int(width_px)


def _title(result: MovieResult) -> str:
    s = result.stats

    def num(key: str, fmt: str) -> str | None:
        v = s.get(key)
        return fmt.format(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else None

    parts = [
        num("motion_total_A", "full-frame motion {:.1f} Å (not drawn)"),
        num("local_mean_A", "local mean {:.2f} Å"),
        num("local_max_A", "max {:.2f} Å"),
        num("quality_gain", "gain {:+.3f}"),
    ]
    parts.append(f"{result.n} particles; local motion x{PLOT_SCALE:g}: raw grey, smoothed red")
    return f"{Path(str(result.movie)).name}\n" + ", ".join(p for p in parts if p)


def plot_trajectories(
    path: str | os.PathLike[str],
    micrograph: np.ndarray,
    binning: float,
    result: MovieResult,
    scale: float = PLOT_SCALE,
    width_px: int = 1000,
) -> None:
    """Write the diagnostic PNG (atomically, ``streamer.formats.atomic``).

    ``micrograph``: (h, w) aligned sum binned by ``binning`` relative to the movie grid;
    ``result.x``, ``result.y`` (n,) in movie px; ``result.traj_raw``/``traj_smooth`` (n, F, 2) in Å.
    The PNG is ``plot_size(micrograph.shape, width_px)`` pixels.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as fh:
        _render(fh, micrograph, binning, result, scale, width_px)


def _render(fh: Any, micrograph: np.ndarray, binning: float, result: MovieResult, scale: float, width_px: int) -> None:
    img = np.asarray(micrograph, dtype=np.float32)
    h, w = img.shape
    out_h, out_w = plot_size((h, w), width_px)
    fig = Figure(figsize=(out_w / DPI, out_h / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - TITLE_PX / out_h))
    # a strided sample is plenty for robust contrast limits and keeps this cheap on 4K sums
    step = max(1, int(np.sqrt(img.size / 250_000)))
    sample = img[::step, ::step]
    sample = sample[np.isfinite(sample)]
    lo, hi = np.percentile(sample, [1.0, 99.0]) if sample.size else (0.0, 1.0)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="antialiased")

    if np.asarray(result.x).size:
        k = scale / (float(result.apix) * float(binning))
        origin = np.stack([np.asarray(result.x, np.float64), np.asarray(result.y, np.float64)], axis=-1) / binning
        full = np.asarray(result.frame_shifts, np.float64)[None]
        raw = origin[:, None, :] + k * (np.asarray(result.traj_raw, np.float64) - full)
        smooth = origin[:, None, :] + k * (np.asarray(result.traj_smooth, np.float64) - full)
        ax.add_collection(LineCollection(raw, colors=(0.75, 0.75, 0.75, 0.8), linewidths=0.6))
        ax.add_collection(LineCollection(smooth, colors=(1.0, 0.0, 0.0, 1.0), linewidths=1.0))
        ax.scatter(smooth[:, 0, 0], smooth[:, 0, 1], s=3, c=[(1.0, 0.85, 0.0)], linewidths=0)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("auto")
    ax.set_axis_off()
    fig.text(0.5, 1.0 - 0.5 * TITLE_PX / out_h, _title(result), ha="center", va="center", fontsize=9)
    # zlib level 1: a third of the time of the default for an image of noise, and no larger
    fig.savefig(fh, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})


def plot_png(micrograph: np.ndarray, binning: float, result: MovieResult, scale: float = PLOT_SCALE,
             width_px: int = 1000) -> bytes:
    """The same PNG as ``plot_trajectories``, as bytes (a worker sends it to the session's writer)."""
    import io

    class _Sink(io.BytesIO):
        def close(self) -> None:  # keep the bytes readable after savefig's close
            pass

    sink = _Sink()
    _render(sink, micrograph, binning, result, scale, width_px)
    return sink.getvalue()
