"""``trajectories/<movie stem>.star``: one movie's full-frame and per-particle motion.

Layout (STAR, three blocks; every shift is in Å; lmc labels, so RELION tools do not mistake them for its pixel shifts):

``data_general`` (key/value pairs)
    ``_rlnImageSizeX``, ``_rlnImageSizeY``  movie frame width and height (px, EER upsampling 1)
    ``_rlnImageSizeZ``                      number of frames F
    ``_rlnMicrographMovieName``             the movie as given to lmc
    ``_rlnMicrographOriginalPixelSize``     movie pixel size (Å/px)
    ``_rlnMicrographDoseRate``              exposure per frame (e/Å²), when known
    ``_rlnMicrographPreExposure``           exposure before the first frame (e/Å²), when known
    ``_lmcPixelSizeSource``                 where the pixel size came from (--apix, an MRC header, a
                                            pick file's optics group: streamer/physical.py)
    ``_lmcDosePerFrameSource``              where the exposure per frame came from
    ``_lmc<Stat>``                          every numeric entry of ``MovieResult.stats``, the key in
                                            CamelCase: motion_total_A -> lmcMotionTotalA,
                                            quality_gain -> lmcQualityGain (booleans as 0/1;
                                            NaN/inf, text and lists such as warnings are not
                                            written)

``data_global_shift`` (loop, one row per frame)
    ``_rlnMicrographFrameNumber``  1-based frame number
    ``_lmcFrameShiftX``, ``_lmcFrameShiftY``  full-frame trajectory (Å)

``data_particles`` (loop, one row per particle and frame, particle-major: all F frames of
particle 0, then particle 1, ...)
    ``_lmcParticleIndex``          0-based, the order particles were written for this movie
    ``_rlnCoordinateX``, ``_rlnCoordinateY``  pick position (movie px, the reference-frame position)
    ``_rlnMicrographFrameNumber``  1-based frame number
    ``_lmcShiftRawX``, ``_lmcShiftRawY``        raw per-frame estimate of the total trajectory (Å)
    ``_lmcShiftSmoothX``, ``_lmcShiftSmoothY``  smoothed total trajectory used for extraction (Å)

Shifts follow gpu/__init__: a shift ``s_t`` is where the specimen *is* in frame ``t`` relative to
the reference frame, so a feature at ``p`` in the reference sits at ``p + s_t / apix`` (px) in
frame ``t``. Per-particle shifts are totals (full-frame + local).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from streamer.formats import atomic
from streamer.types import MovieResult


class TrajectoriesError(ValueError):
    """A trajectories STAR is unreadable or inconsistent; the message starts with its path."""


PARTICLE_COLUMNS = (
    "lmcParticleIndex",
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnMicrographFrameNumber",
    "lmcShiftRawX",
    "lmcShiftRawY",
    "lmcShiftSmoothX",
    "lmcShiftSmoothY",
)


def stat_label(key: str) -> str:
    """``motion_total_A`` -> ``lmcMotionTotalA``: the STAR label of a ``MovieResult.stats`` key."""
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", key) if p]
    return "lmc" + "".join(p[:1].upper() + p[1:] for p in parts)


def general_block(
    result: MovieResult, dose_per_frame: float | None = None, pre_exposure: float | None = None
) -> dict[str, Any]:
    """The ``data_general`` pairs for ``result`` (see the module docstring)."""
    h, w = (int(v) for v in result.micrograph_shape)
    general: dict[str, Any] = {
        "rlnImageSizeX": w,
        "rlnImageSizeY": h,
        "rlnImageSizeZ": int(np.asarray(result.frame_shifts).shape[0]),
        "rlnMicrographMovieName": str(result.movie),
        "rlnMicrographOriginalPixelSize": float(result.apix),
    }
    dose = dose_per_frame if dose_per_frame is not None else result.stats.get("dose_per_frame")
    pre = pre_exposure if pre_exposure is not None else result.stats.get("pre_exposure")
    if dose is not None:
        general["rlnMicrographDoseRate"] = float(dose)
    if pre is not None:
        general["rlnMicrographPreExposure"] = float(pre)
    if result.stats.get("apix_source"):
        general["lmcPixelSizeSource"] = str(result.stats["apix_source"])
    if dose is not None:
        general["lmcDosePerFrameSource"] = "--dose-per-frame / config.yaml"
    for key, value in result.stats.items():
        if key in ("dose_per_frame", "pre_exposure"):
            continue
        if isinstance(value, (bool, np.bool_)):
            general[stat_label(key)] = int(value)
        elif isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value):
            general[stat_label(key)] = value.item() if isinstance(value, np.generic) else value
    return general


def particle_table(result: MovieResult) -> pd.DataFrame:
    """The ``data_particles`` loop: n * F rows, particle-major."""
    raw = np.asarray(result.traj_raw, dtype=np.float64)
    smooth = np.asarray(result.traj_smooth, dtype=np.float64)
    n, nf = int(np.asarray(result.x).shape[0]), int(np.asarray(result.frame_shifts).shape[0])
    if raw.shape != (n, nf, 2) or smooth.shape != (n, nf, 2):
        raise ValueError(
            f"{result.movie}: trajectories must be ({n}, {nf}, 2); got raw {raw.shape}, smooth {smooth.shape}"
        )
    return pd.DataFrame(
        {
            "lmcParticleIndex": np.repeat(np.arange(n), nf),
            "rlnCoordinateX": np.repeat(np.asarray(result.x, np.float64), nf),
            "rlnCoordinateY": np.repeat(np.asarray(result.y, np.float64), nf),
            "rlnMicrographFrameNumber": np.tile(np.arange(1, nf + 1), n),
            "lmcShiftRawX": raw[..., 0].ravel(),
            "lmcShiftRawY": raw[..., 1].ravel(),
            "lmcShiftSmoothX": smooth[..., 0].ravel(),
            "lmcShiftSmoothY": smooth[..., 1].ravel(),
        }
    )


def write_trajectories(
    path: str | os.PathLike[str],
    result: MovieResult,
    dose_per_frame: float | None = None,
    pre_exposure: float | None = None,
) -> None:
    """Write ``result``'s trajectories STAR atomically (``streamer.formats.atomic``).

    ``dose_per_frame``/``pre_exposure`` (e/Å²) fill rlnMicrographDoseRate/PreExposure; when None
    they are taken from ``result.stats`` if present there.
    """
    shifts = np.asarray(result.frame_shifts, dtype=np.float64).reshape(-1, 2)
    nf = shifts.shape[0]
    blocks = {
        "general": general_block(result, dose_per_frame, pre_exposure),
        "global_shift": pd.DataFrame(
            {
                "rlnMicrographFrameNumber": np.arange(1, nf + 1),
                "lmcFrameShiftX": shifts[:, 0],
                "lmcFrameShiftY": shifts[:, 1],
            }
        ),
        "particles": particle_table(result),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, starfile.to_string(blocks, float_format="%.8g"))


def read_trajectories(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a trajectories STAR back.

    Returns ``general`` (dict), ``frame_shifts`` (F, 2), ``x``, ``y`` (n,), ``raw`` and ``smooth``
    (n, F, 2), all float64 Å / px as written. Raises ``TrajectoriesError`` on a malformed file.
    """
    path = str(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # starfile raises many types on malformed text
        raise TrajectoriesError(f"{path}: not a readable STAR file ({exc})") from None
    for name in ("general", "global_shift", "particles"):
        if name not in blocks:
            raise TrajectoriesError(f"{path}: missing data_{name} block")
    general = blocks["general"]
    if isinstance(general, pd.DataFrame):
        general = general.iloc[0].to_dict() if len(general) else {}
    gs = _loop(path, blocks["global_shift"], ("rlnMicrographFrameNumber", "lmcFrameShiftX", "lmcFrameShiftY"))
    order = np.argsort(gs["rlnMicrographFrameNumber"].to_numpy())
    frame_shifts = gs[["lmcFrameShiftX", "lmcFrameShiftY"]].to_numpy(np.float64)[order]
    nf = frame_shifts.shape[0]
    pt = _loop(path, blocks["particles"], PARTICLE_COLUMNS)
    idx = pt["lmcParticleIndex"].to_numpy(np.int64)
    fr = pt["rlnMicrographFrameNumber"].to_numpy(np.int64) - 1
    n = int(idx.max()) + 1 if idx.size else 0
    if idx.size != n * nf or (idx.size and (idx.min() < 0 or fr.min() < 0 or fr.max() >= nf)):
        raise TrajectoriesError(f"{path}: data_particles holds {idx.size} rows, expected {n} particles x {nf} frames")
    filled = np.zeros((n, nf), dtype=bool)
    filled[idx, fr] = True
    if not filled.all():
        raise TrajectoriesError(f"{path}: data_particles misses some (particle, frame) rows")
    raw = np.zeros((n, nf, 2))
    smooth = np.zeros((n, nf, 2))
    raw[idx, fr] = pt[["lmcShiftRawX", "lmcShiftRawY"]].to_numpy(np.float64)
    smooth[idx, fr] = pt[["lmcShiftSmoothX", "lmcShiftSmoothY"]].to_numpy(np.float64)
    x = np.zeros(n)
    y = np.zeros(n)
    x[idx] = pt["rlnCoordinateX"].to_numpy(np.float64)
    y[idx] = pt["rlnCoordinateY"].to_numpy(np.float64)
    return {"general": dict(general), "frame_shifts": frame_shifts, "x": x, "y": y, "raw": raw, "smooth": smooth}


def _loop(path: str, block: Any, columns: tuple[str, ...]) -> pd.DataFrame:
    if isinstance(block, dict):
        block = pd.DataFrame([block])
    missing = [c for c in columns if c not in block.columns]
    if missing:
        raise TrajectoriesError(f"{path}: loop lacks {', '.join(missing)}")
    return block
