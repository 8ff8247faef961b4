"""Plain data passed between the stages: picks in, a movie's result out.

These are the contracts between modules (readers -> engine -> writer -> ledger); they hold
NumPy arrays only (never CuPy), so they cross process boundaries as JSON + raw buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Picks:
    """Particle picks for one movie, in movie pixels (already multiplied by ``picks.scale``).

    ``x``, ``y``: (n,) float64, 0-based pixel coordinates (column, row) of particle centres.
    ``columns``: every per-pick input column carried to the output, each (n,) float64, int64 or
    text (object): RELION labels (``rlnDefocusU``, ``rlnAngleRot``, ``rlnClassNumber``, ...) and
    cryoSPARC-only fields as ``cs:<field>`` / ``cs:<field>#k`` (see streamer/formats/picks.py).
    ``rejected``: picks dropped while reading, as (x, y, reason) with reason e.g. "NaN coordinate",
    "negative coordinate", "outside the 4096x4096 frame".
    ``source``: the pick file this came from. ``problems``: file-level warnings (e.g. "empty file").
    ``notes``: what reading did to the coordinates, for the log (scaled by the file's pixel size,
    re-centred on refined origins, non-finite carried values zeroed).
    """

    x: np.ndarray
    y: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    rejected: list[tuple[float, float, str]] = field(default_factory=list)
    source: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class MovieResult:
    """Everything one movie produced, ready for the single writer.

    Shapes: n = particles written, F = frames, b = output box (after Fourier crop).

    ``particles``: (n, b, b) float32 (the writer casts to float16 when asked).
    ``x``, ``y``: (n,) pick coordinates of the written particles in movie pixels (at EER
    upsampling 1 scale, i.e. the physical detector grid), the reference-frame position.
    ``columns``: carried-through per-particle columns (RELION labels), each (n,).
    ``skipped``: picks not written, as (x, y, reason) — reading rejects and edge skips together.
    ``frame_shifts``: (F, 2) full-frame trajectory (dx, dy) in Å (see gpu/__init__ conventions).
    ``traj_raw``, ``traj_smooth``: (n, F, 2) per-particle total trajectory in Å (full-frame +
    local); raw = noisy per-frame estimate, smooth = the one used for extraction.
    ``stats``: per-movie numbers (JSON-able): motion_total_A, motion_early_A, local_mean_A,
    local_max_A, quality_gain, n_picks, n_particles, n_skipped, frames, eer_leftover,
    seconds_* per stage, warnings (list of str).
    ``micrograph_shape``: (h, w) in movie pixels at upsampling 1.
    ``plot_png``: the diagnostic plot rendered by a worker, written by the session's writer (workers
    write no files), or None.
    """

    movie: str
    particles: np.ndarray
    x: np.ndarray
    y: np.ndarray
    columns: dict[str, np.ndarray]
    skipped: list[tuple[float, float, str]]
    frame_shifts: np.ndarray
    traj_raw: np.ndarray
    traj_smooth: np.ndarray
    micrograph_shape: tuple[int, int]
    apix: float
    stats: dict[str, Any] = field(default_factory=dict)
    plot_png: bytes | None = None

    @property
    def n(self) -> int:
        return int(self.particles.shape[0])
