"""Full-frame motion in RELION's own files: one motion STAR per movie and a micrographs STAR.

RELION's programs (Bayesian polishing's starting point, ``relion_motion_refine``; CTF refinement's
micrograph handling) read a movie's global motion from the STAR that RELION's motion correction
writes beside each micrograph (``Micrograph::write`` in RELION's src/micrograph_model.cpp), found
through ``rlnMicrographMetadata`` in the micrographs STAR (``corrected_micrographs.star``,
src/motioncorr_runner.cpp). lmc writes both, with the same blocks and labels:

``motion/<movie stem>.star``
    ``data_general`` (key/value pairs): ``rlnImageSizeX``, ``rlnImageSizeY``, ``rlnImageSizeZ``
    (frame width, height, count), ``rlnMicrographMovieName``, ``rlnMicrographGainName`` (only when
    lmc used the gain as RELION would: multiplied, no rotation or flip), ``rlnMicrographBinning``
    (1), ``rlnMicrographOriginalPixelSize``, ``rlnMicrographDoseRate``, ``rlnMicrographPreExposure``,
    ``rlnVoltage``, ``rlnMicrographStartFrame`` (1), for EER ``rlnEERUpsampling`` (1: the physical
    grid lmc's coordinates use) and ``rlnEERGrouping``, and ``rlnMotionModelVersion`` 0 (no local
    polynomial model: lmc's local motion is per particle, in its own trajectories STAR).
    ``data_global_shift`` (loop): ``rlnMicrographFrameNumber`` (1-based), ``rlnMicrographShiftX``,
    ``rlnMicrographShiftY`` in unbinned movie pixels.

``micrographs.star``
    ``data_optics`` as RELION's motion correction writes it (name, group, original pixel size,
    voltage, Cs, amplitude contrast, rlnMicrographPixelSize) and ``data_micrographs``:
    ``rlnMicrographName`` (the movie, exactly as ``rlnMicrographName`` in particles.star, so
    RELION pairs particles with their motion), ``rlnMicrographMetadata`` (absolute path of the
    motion STAR), ``rlnOpticsGroup``, ``rlnAccumMotionTotal/Early/Late`` (Å, lmc's path lengths;
    early = the first 4 e/Å²).

Sign: RELION's shift is the one *applied* to a frame to align it — its own motion correction
finds the cross-correlation peak of reference x conj(frame) (at minus the drift) and shifts the
frame by it, and polishing takes a particle's track as minus the shift
(src/jaz/single_particle/micrograph_handler.cpp). lmc's trajectory ``s_t`` is where the specimen
*is* (gpu/__init__), so ``rlnMicrographShiftX/Y = -s_t / apix``. The zero is lmc's reference frame,
the frame particles.star's coordinates refer to (MotionCor2's convention; RELION's own motion
correction zeroes frame 1 instead, and polishing only uses differences along the track).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from streamer.config import Config
from streamer.formats import atomic
from streamer.formats.relion_star import OPTICS_GROUP, VERSION_LINE, acquisition_optics, quote_value
from streamer.types import MovieResult

MOTION_DIR = "motion"
MICROGRAPHS_NAME = "micrographs.star"
MOTION_MODEL_NULL = 0  # RELION's MotionModelVersion for "global shifts only"


def gain_for_relion(cfg: Config) -> str | None:
    """The gain file when RELION would apply it exactly as lmc did (multiply, no rotation/flip)."""
    g = cfg.gain
    if not g.file or g.rotate or g.flip_x or g.flip_y:
        return None
    mode = g.mode if g.mode != "auto" else ("divide" if str(g.file).lower().endswith(".gain") else "multiply")
    if mode != "multiply" and not str(g.file).lower().endswith(".gain"):
        return None
    return os.path.abspath(g.file)


def motion_star_text(cfg: Config, result: MovieResult) -> str:
    """RELION's per-movie motion STAR for ``result`` (see the module docstring)."""
    h, w = (int(v) for v in result.micrograph_shape)
    shifts = np.asarray(result.frame_shifts, dtype=np.float64).reshape(-1, 2)
    nf = shifts.shape[0]
    apix = float(result.apix)
    general: list[tuple[str, Any]] = [
        ("rlnImageSizeX", w),
        ("rlnImageSizeY", h),
        ("rlnImageSizeZ", nf),
        ("rlnMicrographMovieName", str(result.movie)),
    ]
    gain = gain_for_relion(cfg)
    if gain:
        general.append(("rlnMicrographGainName", gain))
    general += [
        ("rlnMicrographBinning", 1.0),
        ("rlnMicrographOriginalPixelSize", apix),
        ("rlnMicrographDoseRate", float(cfg.dose_per_frame)),
        ("rlnMicrographPreExposure", float(cfg.pre_exposure)),
        ("rlnVoltage", float(cfg.kv)),
        ("rlnMicrographStartFrame", 1),
    ]
    if str(result.movie).lower().endswith(".eer"):
        raw = int(result.stats.get("eer_raw_frames") or 0)
        left = int(result.stats.get("eer_leftover") or 0)
        general.append(("rlnEERUpsampling", 1))
        if raw and nf:
            general.append(("rlnEERGrouping", (raw - left) // nf))
    general.append(("rlnMotionModelVersion", MOTION_MODEL_NULL))
    lines = ["", VERSION_LINE, "", "data_general", ""]
    lines += [f"_{k:<40} {_fmt(v)}" for k, v in general]
    lines += ["", "", VERSION_LINE, "", "data_global_shift", "", "loop_",
              "_rlnMicrographFrameNumber #1", "_rlnMicrographShiftX #2", "_rlnMicrographShiftY #3"]
    relion = -shifts / apix  # applied shift, unbinned movie pixels
    lines += [f"{i + 1:>12d} {sx:12.6f} {sy:12.6f}" for i, (sx, sy) in enumerate(relion.tolist())]
    return "\n".join(lines) + "\n\n"


def _fmt(v: Any) -> str:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.9g}"
    return quote_value(str(v))


def motion_star_path(out: str | os.PathLike[str], movie: str) -> Path:
    from streamer.formats.picks import movie_stem

    folder = Path(out) / MOTION_DIR
    return folder / atomic.side_name(folder if folder.exists() else out, movie_stem(movie), ".star")


def write_motion_star(cfg: Config, result: MovieResult, out: str | os.PathLike[str]) -> Path:
    """Write ``motion/<stem>.star`` under ``out`` atomically; returns its path."""
    path = motion_star_path(out, result.movie)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, motion_star_text(cfg, result))
    return path


def micrographs_text(cfg: Config, movies: Iterable[tuple[str, dict[str, Any]]], out: str | os.PathLike[str]) -> str:
    """RELION's micrographs STAR for ``movies`` = ``[(movie, stats), ...]`` (done movies, commit order)."""
    optics = [*acquisition_optics(cfg), ("rlnMicrographPixelSize", f"{cfg.pixel_size:.9g}")]
    lines = ["", VERSION_LINE, "", "data_optics", "", "loop_"]
    lines += [f"_{k} #{i}" for i, (k, _) in enumerate(optics, 1)]
    lines += [" ".join(v for _, v in optics), "", "", VERSION_LINE, "", "data_micrographs", "", "loop_"]
    labels = ("rlnMicrographName", "rlnMicrographMetadata", "rlnOpticsGroup", "rlnAccumMotionTotal",
              "rlnAccumMotionEarly", "rlnAccumMotionLate")
    lines += [f"_{k} #{i}" for i, k in enumerate(labels, 1)]
    root = Path(out).resolve()
    for movie, stats in movies:
        total = float(stats.get("motion_total_A") or 0.0)
        early = float(stats.get("motion_early_A") or 0.0)
        meta = motion_star_path(root, movie)
        lines.append(" ".join([quote_value(movie), quote_value(str(meta)), str(OPTICS_GROUP),
                               f"{total:.6f}", f"{early:.6f}", f"{max(total - early, 0.0):.6f}"]))
    return "\n".join(lines) + "\n\n"
