"""One movie + its picks -> motion-corrected, exposure-weighted particles (a MovieResult).

The pipeline is a sequence of stage functions, each public, with explicit parameters, and each
timed by :func:`process_movie` (``stats["seconds_<stage>"]``):

============  ==============================  ===============================================
stage         function                        gives
============  ==============================  ===============================================
decode        :func:`decode`                  the raw movie (file dtype), or the one decoded ahead
gain          :func:`correct_gain`            :class:`Frames`: float32 frames, gain applied, hot/defect pixels replaced
motion        :func:`full_frame_motion`       :class:`FullFrame`: the full-frame trajectory (frame px)
picks         :func:`locate_picks`            :class:`Located`: the picks and their positions on the frames
local         :func:`local_trajectories`      :class:`LocalTrajectories`: per-particle residuals on top of full-frame
extract       :func:`extract`                 :class:`Extracted`: particles along the trajectories (dose weighted,
                                              Fourier-cropped, normalised)
micrograph    :func:`micrograph`              the aligned sum (for the plot)
sidecars      :func:`write_sidecar_files`     trajectories/<stem>.star, plots/<stem>.png
============  ==============================  ===============================================

:func:`estimate` runs decode .. local and returns an :class:`Estimate`, whose ``trajectories_px()``
is the one definition of the trajectories extracted (benchmarks/quality.py scores exactly these);
:func:`movie_result` assembles the :class:`~streamer.types.MovieResult` and its statistics.
Buffers kept between movies are held by a :class:`Workspace` that the caller owns (a worker keeps
one; a one-off call gets a fresh one).

Coordinates: picks and outputs are in *movie pixels* at EER upsampling 1 (the physical detector
grid, pixel size ``cfg.apix``). With EER upsampling ``u`` the frames have pixel size
``apix / u`` and physical pixel ``i`` covers frame pixels ``u*i .. u*i + u - 1``, whose centre is
``u*i + (u - 1)/2``; ``box`` and ``fcrop_box`` stay in physical pixels (the extraction box on
the frames is ``u * box``, Fourier-cropped to ``fcrop_box or box``).
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from gpu import backend
from gpu.motion import FrameMotion
from streamer.config import Config, GainConfig
from streamer.formats.movies import Movie
from streamer.types import MovieResult, Picks

EARLY_EXPOSURE = 4.0  # e/Å²: "early" motion as in RELION's motion statistics


# -- buffers kept between movies ------------------------------------------------------------------


@dataclass
class Workspace:
    """Host buffers one caller keeps between movies (one movie at a time per workspace).

    ``frames``: the float32 movie. Faulting in 3.6 GB of fresh pages for a K3 movie costs 0.3-8 s of
    kernel time per movie (more the first time on a VM); a worker reuses the buffer instead.
    ``binned``: the 2x2-binned movie the per-particle stage cuts its patches from (a quarter of it).
    Only CPU buffers are kept (device memory is better returned to CuPy's pool).
    """

    frames: np.ndarray | None = None
    binned: np.ndarray | None = None

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The kept buffer ``name`` ("frames" or "binned") if it has ``shape``; it leaves the workspace."""
        buf = getattr(self, name)
        setattr(self, name, None)
        return buf if buf is not None and buf.shape == tuple(shape) else None

    def keep(self, name: str, buf: np.ndarray | None) -> None:
        """Keep ``buf`` as ``name`` for the next movie (replacing any older one)."""
        setattr(self, name, buf)

    def clear(self) -> None:
        self.frames = self.binned = None


class StageClock:
    """Seconds per stage (``seconds_<name>``); on a GPU each lap waits for the device first.

    ``on_stage(name)`` is called as each stage ends (e.g. to read memory per stage,
    benchmarks/device_memory.py); its own time is not charged to the next stage.
    """

    def __init__(self, xp: ModuleType, on_stage: Callable[[str], None] | None = None) -> None:
        self.xp = xp
        self.on_stage = on_stage
        self.timings: dict[str, float] = {}
        self.tick = time.perf_counter()

    def lap(self, name: str) -> None:
        if backend.is_gpu(self.xp):
            self.xp.cuda.Stream.null.synchronize()
        self.timings[f"seconds_{name}"] = round(time.perf_counter() - self.tick, 4)
        if self.on_stage is not None:
            self.on_stage(name)
        self.tick = time.perf_counter()


# -- decode and gain ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _gain_multiplier(
    path: str, mtime: float, gcfg: GainConfig, shape: tuple[int, int], upsampling: int
) -> np.ndarray:
    from streamer.formats.gainref import read_gain

    return read_gain(path, gcfg, shape, upsampling=upsampling)


@functools.lru_cache(maxsize=4)
def _defect_mask(path: str, mtime: float, shape: tuple[int, int]) -> np.ndarray:
    from streamer.formats.gainref import read_defects

    return read_defects(path, shape)


def load_gain(cfg: Config, frame_shape: tuple[int, int], upsampling: int = 1) -> np.ndarray | None:
    """The oriented float32 gain multiplier for frames of ``frame_shape`` (cached per process)."""
    if not cfg.gain.file:
        return None
    path = str(cfg.gain.file)
    return _gain_multiplier(path, os.path.getmtime(path), cfg.gain, tuple(frame_shape), upsampling)


def decode(cfg: Config, movie: str, preloaded: Movie | None = None) -> Movie:
    """Stage "decode": read and decode ``movie`` (``cfg.eer``, ``cfg.threads``), unless ``preloaded``
    (the same movie already read by :func:`streamer.formats.movies.read_movie`, e.g. decoded ahead)."""
    from streamer.formats.movies import read_movie

    return preloaded if preloaded is not None else read_movie(movie, cfg.eer, threads=cfg.threads)


@dataclass
class Frames:
    """The gain-corrected movie. ``data``: (F, h, w) float32 (xp array) at EER upsampling ``upsampling``
    (None once released); ``shape``: its (F, h, w); ``apix``: its pixel size (Å); ``n_bad``: hot + defect
    pixels replaced; ``reusable``: ``data`` is a host buffer of this pipeline that a :class:`Workspace`
    may keep for the next movie."""

    data: Any
    shape: tuple[int, int, int]
    upsampling: int
    apix: float
    n_bad: int
    reusable: bool

    @property
    def phys_shape(self) -> tuple[int, int]:
        """(h, w) of the physical detector grid (EER upsampling 1)."""
        _, h, w = self.shape
        return (h // self.upsampling, w // self.upsampling)


def correct_gain(
    cfg: Config, mov: Movie, *, xp: ModuleType, gain: np.ndarray | None, workspace: Workspace
) -> Frames:
    """Stage "gain": float32 frames with the gain applied (``gain``, else ``cfg.gain.file``), hot pixels
    (``cfg.gain.hot_pixel_sigma``) and defects (``cfg.gain.defects``) replaced.

    The raw frames of ``mov`` are released (replaced by an empty array) once the gain is applied, so
    a caller's reference to ``mov`` (a movie decoded ahead) does not keep the raw movie alive through
    the later stages. On the GPU the raw frames stay on the host and are uploaded a few at a time
    into the float32 device movie, so the raw movie never sits on the device next to it.
    """
    from gpu.gain import apply_gain, hot_pixel_mask, replace_pixels

    u = int(mov.upsampling)
    n_frames, h, w = mov.frames.shape
    multiplier = gain if gain is not None else load_gain(cfg, (h, w), u)
    on_host = not backend.is_gpu(xp)
    buffer = workspace.take("frames", mov.frames.shape) if on_host else None
    frame_sum = xp.empty((h, w), dtype=xp.float32) if cfg.gain.hot_pixel_sigma > 0 else None
    frames = apply_gain(mov.frames, multiplier, out=buffer, xp=xp, sum_out=frame_sum)
    reusable = on_host and frames is not mov.frames
    if frames is not mov.frames:
        mov.frames = np.empty((0, h, w), mov.frames.dtype)
    bad = None
    if cfg.gain.hot_pixel_sigma > 0:
        bad = hot_pixel_mask(frame_sum, cfg.gain.hot_pixel_sigma)
    if cfg.gain.defects:
        defects = xp.asarray(_defect_mask(cfg.gain.defects, os.path.getmtime(cfg.gain.defects), (h, w)))
        bad = defects if bad is None else (bad | defects)
    n_bad = int(bad.sum()) if bad is not None else 0
    if n_bad:
        frames = replace_pixels(frames, bad)
    return Frames(frames, (int(n_frames), int(h), int(w)), u, cfg.apix / u, n_bad, reusable)


# -- full-frame motion ----------------------------------------------------------------------------


@dataclass
class FullFrame:
    """``shifts_px``: (F, 2) float64 full-frame trajectory in frame pixels (gpu/__init__ conventions),
    the motion stage's estimate (the local stage corrects it by a common term, :class:`Estimate`);
    ``posterior``: the same with its prior and curvature (``gpu.motion.FrameMotion``), for that
    correction; ``binned``: the motion stage's binned movie (reused for the micrograph); ``sums2``:
    the frames' 2x2 sums when the per-particle patches are cut from them, else None."""

    shifts_px: np.ndarray
    posterior: FrameMotion
    binned: Any
    sums2: Any = None


def use_binned_patches(cfg: Config, frames: Frames, xp: ModuleType, binned_patches: bool | None) -> bool:
    """Whether the frames' 2x2 sums are made for the per-particle patches: when the band allows it
    and (``binned_patches`` None) on the CPU only (on a GPU the gather is cheap and device memory is
    not: EER at upsampling 2 would need 2.7 GB more). The motion stage reuses them as its first
    binning; the local stage cuts its patches from them only on a movie with enough particles
    (:func:`local_spectra`)."""
    if not cfg.local.enabled or not (not backend.is_gpu(xp) if binned_patches is None else binned_patches):
        return False
    return binned_alignment_box(cfg, frames) is not None


def alignment_box(cfg: Config, frames: Frames) -> int:
    """The per-particle alignment box on the frames (px): ``local.align_box`` or ``box``, times the upsampling."""
    return (cfg.local.align_box or cfg.box) * frames.upsampling


def binned_alignment_box(cfg: Config, frames: Frames) -> int | None:
    """The alignment box for 2x2-binned patches, or None where the band does not allow binning
    (``gpu.local_model.auto_binning``). A box that is not a multiple of 4 is rounded down to one (at
    most 3 px, inside the soft mask's edge of 15 % of the box): binning halves it, and without this a
    box of e.g. 254 px cost 2.5x the CPU time of 256 px on a 300-particle movie (BENCHMARKS.md)."""
    from gpu.local_model import auto_binning, band_size

    a = alignment_box(cfg, frames)
    a4 = a - a % 4
    return a4 if a4 >= 16 and auto_binning(a4, band_size(a4, frames.apix, cfg.local.band_high)) == 2 else None


def full_frame_motion(cfg: Config, frames: Frames, *, sums2: Any = None) -> FullFrame:
    """Stage "motion": the full-frame trajectory (``cfg.motion``, dose from ``cfg``), in frame pixels.

    ``sums2``: the frames' 2x2 sums (:func:`binned_sums`) when made for the per-particle patches: the
    motion stage's own first binning, when it is by 2, is the same mean.
    """
    from gpu.motion import bin_movie, estimate_frame_motion

    binned = bin_movie(frames.data, frames.apix, cfg.motion.max_resolution, sums2=sums2)
    posterior = estimate_frame_motion(
        binned,
        frames.apix,
        max_resolution_A=cfg.motion.max_resolution,
        bfactor=cfg.motion.bfactor,
        iterations=cfg.motion.iterations,
        tolerance_px=cfg.motion.tolerance * frames.upsampling,
        reference_frame=cfg.motion.reference_frame,
        dose_per_frame=cfg.dose_per_frame,
        pre_exposure=cfg.pre_exposure,
        smoothing=cfg.motion.smoothing,
        max_shift_A=cfg.motion.max_shift,
        burst_basis=cfg.motion.burst_basis,
    )
    return FullFrame(np.asarray(posterior.shifts, dtype=np.float64), posterior, binned, sums2)


def binned_sums(frames: Frames, workspace: Workspace) -> Any:
    """The frames' 2x2 sums (into the workspace's kept buffer when it fits)."""
    from gpu.local_model import binned_movie

    n, h, w = frames.shape
    return binned_movie(frames.data, workspace.take("binned", (n, h // 2, w // 2)))


# -- picks ----------------------------------------------------------------------------------------


def resolve_picks(cfg: Config, movie: str, picks: Any, frame_shape_phys: tuple[int, int]) -> Picks:
    """Read the picks for ``movie`` from a PickSource, a pick file/folder path or ``cfg.picks.dir``."""
    from streamer.formats.picks import PickIndex, PicksError, read_picks

    source = picks
    if source is None or isinstance(source, (str, Path)):
        where = source if source is not None else cfg.picks.dir
        if where is None:
            raise PicksError(f"{movie}: no picks given (--picks DIR)")
        source = PickIndex(where, format=cfg.picks.format).lookup(movie)
        if source is None:
            raise PicksError(f"{movie}: no pick file matches this movie in {where}")
    return read_picks(source, cfg.picks, frame_shape_phys, apix=cfg.apix)


@dataclass
class Located:
    """The picks (physical pixels) and ``positions``: (n, 2) their centres on the frames (frame px)."""

    picks: Picks
    positions: np.ndarray

    @property
    def n_picks(self) -> int:
        """All picks read, rejected ones included."""
        return len(self.picks) + len(self.picks.rejected)


def locate_picks(cfg: Config, movie: str, picks: Any, frames: Frames) -> Located:
    """Stage "picks": the picks of ``movie`` (:func:`resolve_picks`) and their centres on the frames."""
    pk = resolve_picks(cfg, movie, picks, frames.phys_shape)
    u = frames.upsampling
    positions = np.stack([pk.x * u + (u - 1) / 2.0, pk.y * u + (u - 1) / 2.0], axis=-1) if len(pk) else np.zeros((0, 2))
    return Located(pk, positions)


# -- per-particle trajectories ---------------------------------------------------------------------


@dataclass
class LocalTrajectories:
    """Per-particle trajectories, frame px: ``common`` (F, 2) the correction of the full-frame
    trajectory fitted jointly from all particles (zero-mean over frames; zeros when local is off or
    no particle could be aligned); ``raw``, ``smooth`` (n, F, 2) on top of the corrected full-frame
    trajectory (zeros for particles not estimated); ``info``: the fit's diagnostics (``gpu.local``);
    ``n_outside``: particles too close to the edge for the alignment box (corrected full-frame only);
    ``common_sd``: (F,) posterior standard deviation of the corrected full-frame trajectory per frame
    (``gpu.local.common_uncertainty``; empty when local is off)."""

    common: np.ndarray
    raw: np.ndarray
    smooth: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    n_outside: int = 0
    common_sd: np.ndarray = field(default_factory=lambda: np.zeros(0))


def local_spectra(cfg: Config, frames: Frames, positions: np.ndarray, motion: FullFrame) -> tuple[Any, np.ndarray]:
    """(band spectra, inside): ``gpu.local_model.BandSpectra`` of the particles whose alignment box stays
    inside every frame along the full-frame track (``inside`` (n,) bool; spectra None when none does).

    Band-limited patch spectra are cut chunk by chunk around each particle's full-frame track, never
    all patches of a movie at once. With at least ``cfg.local.bin_min_particles`` such particles the
    patches are summed 2x2 where the band allows (``gpu.local_model.auto_binning``; cut from
    ``motion.sums2`` when set: a quarter of the gather); with fewer, the full-resolution patches are
    used: binning loses up to 15 % of the signal power at the band edge, and on a sparse movie the
    common term and the field need all of it (BENCHMARKS.md), while the stage's cost there is small.
    Binned patches use :func:`binned_alignment_box` (the box rounded down to a multiple of 4).
    """
    from gpu.extract import boxes_inside
    from gpu.local_model import binned_boxes_inside, spectra_from_frames

    _, h, w = frames.shape
    a = alignment_box(cfg, frames)
    centres = positions[:, None, :] + motion.shifts_px[None, :, :]
    inside = boxes_inside(np.rint(centres), a, (h, w)).all(axis=1)
    a_binned = binned_alignment_box(cfg, frames)
    binned = a_binned is not None and int(inside.sum()) >= cfg.local.bin_min_particles
    if binned:
        a = a_binned
        inside = boxes_inside(np.rint(centres), a, (h, w)).all(axis=1)
        if motion.sums2 is not None:
            inside &= binned_boxes_inside(centres, a, (h // 2, w // 2)).all(axis=1)
    if not inside.any():
        return None, inside
    spectra = spectra_from_frames(
        frames.data,
        centres[inside],
        a,
        apix=frames.apix,
        dose_per_frame=cfg.dose_per_frame,
        pre_exposure=cfg.pre_exposure,
        kv=cfg.kv,
        band_low=cfg.local.band_low,
        band_high=cfg.local.band_high,
        bfactor=cfg.local.bfactor,
        first_frame=cfg.local.first_frame,
        last_frame=cfg.local.last_frame,
        binning=2 if binned else 1,
        binned_frames=motion.sums2 if binned else None,
    )
    return spectra, inside


def local_trajectories(cfg: Config, frames: Frames, positions: np.ndarray, motion: FullFrame) -> LocalTrajectories:
    """Stage "local": per-particle trajectories (``cfg.local``; zeros when disabled), from :func:`local_spectra`."""
    n_frames = frames.shape[0]
    out = LocalTrajectories(np.zeros((n_frames, 2)), np.zeros((len(positions), n_frames, 2)),
                            np.zeros((len(positions), n_frames, 2)))
    if not cfg.local.enabled or len(positions) == 0:
        return out
    from gpu.local import estimate_local

    spectra, inside = local_spectra(cfg, frames, positions, motion)
    out.n_outside = int((~inside).sum())
    if spectra is None:
        return out
    res = estimate_local(
        None,
        None,
        positions[inside],
        apix=frames.apix,
        dose_per_frame=cfg.dose_per_frame,
        pre_exposure=cfg.pre_exposure,
        kv=cfg.kv,
        params=cfg.local.params(),
        motion=motion.posterior,
        spectra=spectra,
    )
    out.common = np.asarray(backend.to_numpy(res.common), dtype=np.float64)
    out.common_sd = np.asarray(res.common_sd, dtype=np.float64)
    out.raw[inside] = backend.to_numpy(res.raw)
    out.smooth[inside] = backend.to_numpy(res.smooth)
    out.info = dict(res.info)
    return out


# -- extraction, micrograph, statistics -------------------------------------------------------------


@dataclass
class Extracted:
    """``particles``: (n_kept, b, b) float32 host array; ``kept``: (n_kept,) int64 indices into the
    positions; ``reasons``: [(index, reason)] of the positions not kept (``gpu.extract``)."""

    particles: np.ndarray
    kept: np.ndarray
    reasons: list[tuple[int, str]]


def extract(cfg: Config, frames: Frames, positions: np.ndarray, traj_px: np.ndarray,
            sd_px: np.ndarray | None) -> Extracted:
    """Stage "extract": particles at ``positions`` (frame px) along ``traj_px`` ((n, F, 2) or (F, 2),
    frame px) with Fourier sub-pixel shifts, exposure weighting (``cfg.dose_weighting``), Fourier
    cropping to ``cfg.out_box``, then background normalisation / contrast inversion (``cfg``).

    ``sd_px``: (F,) the trajectory's posterior standard deviation per frame (frame px, both axes;
    :meth:`Estimate.trajectory_sd_px`), or None for a trajectory taken as exact. With
    ``cfg.uncertainty_weighting`` each frame's exposure weight is multiplied by the expected
    attenuation of that alignment error, a per-frame B-factor (gpu/dose.py)."""
    from gpu.dose import alignment_bfactor
    from gpu.extract import extract_particles
    from gpu.normalize import normalize_background

    dose: dict[str, Any] | None = None
    if cfg.dose_weighting:
        dose = {"dose_per_frame": cfg.dose_per_frame, "pre_exposure": cfg.pre_exposure, "kv": cfg.kv}
        if cfg.uncertainty_weighting and sd_px is not None:
            dose["frame_bfactors"] = alignment_bfactor(np.asarray(sd_px, dtype=np.float64) * frames.apix)
    particles, kept, reasons = extract_particles(
        frames.data,
        positions,
        traj_px,
        box=cfg.box * frames.upsampling,
        out_box=cfg.out_box,
        apix=frames.apix,
        dose=dose,
        edge=cfg.edge,
    )
    if cfg.normalize or cfg.invert_contrast:
        particles = normalize_background(
            particles, radius_px=0.75 * cfg.out_box / 2, invert=cfg.invert_contrast, normalize=cfg.normalize
        )
    return Extracted(
        backend.to_numpy(particles).astype(np.float32, copy=False),
        np.asarray(backend.to_numpy(kept), dtype=np.int64),
        list(reasons),
    )


def micrograph(motion: FullFrame) -> tuple[np.ndarray, float]:
    """Stage "micrograph": the aligned sum of the motion stage's binned movie (host array) and its
    binning relative to the frames."""
    from gpu.motion import aligned_sum

    aligned, binning = aligned_sum(motion.binned, motion.shifts_px)
    return backend.to_numpy(aligned), binning


def path_length(traj: np.ndarray) -> float:
    """Total path length of a (F, 2) trajectory."""
    if len(traj) < 2:
        return 0.0
    return float(np.sum(np.linalg.norm(np.diff(traj, axis=0), axis=-1)))


@dataclass
class Estimate:
    """Everything known about one movie before extraction: the frames, the picks, the full-frame
    motion and the per-particle trajectories; ``notes``: ``warnings``, ``eer_leftover`` and the
    ``seconds_*`` of the stages so far. The two methods below are the ONE definition of which
    trajectories the product extracts (benchmarks/quality.py scores exactly these)."""

    frames: Frames
    located: Located
    motion: FullFrame
    local: LocalTrajectories
    notes: dict[str, Any]
    cfg: Config | None = None  # the configuration with this movie's pixel size settled (streamer.physical)

    def fullframe_px(self) -> np.ndarray:
        """(F, 2) the movie's full-frame trajectory (frame px): the motion stage's estimate corrected by
        the common term the local stage fitted from all particles (what the guard falls back to)."""
        return self.motion.shifts_px + self.local.common

    def trajectories_px(self) -> np.ndarray:
        """(n, F, 2) the trajectory each particle is extracted along (frame px): full-frame + local."""
        return self.fullframe_px()[None] + self.local.smooth

    def trajectory_sd_px(self) -> np.ndarray | None:
        """(F,) the posterior standard deviation of :meth:`fullframe_px` per frame (frame px, both axes;
        ``LocalTrajectories.common_sd``), the part of the extracted trajectories' error shared by every
        particle; None where the local stage did not run (no estimate of it)."""
        sd = self.local.common_sd
        return sd if len(sd) == self.frames.shape[0] else None

    def raw_trajectories_px(self) -> np.ndarray:
        """(n, F, 2) the noisy per-frame estimate behind :meth:`trajectories_px` (frame px)."""
        return self.fullframe_px()[None] + self.local.raw


def estimate(
    cfg: Config,
    movie: str,
    picks: Any,
    *,
    xp: ModuleType,
    workspace: Workspace,
    clock: StageClock,
    preloaded: Movie | None = None,
    gain: np.ndarray | None = None,
    binned_patches: bool | None = None,
) -> Estimate:
    """Stages decode, gain, motion, picks and local in order, each lapped on ``clock``."""
    from streamer.physical import for_movie

    mov = decode(cfg, movie, preloaded)
    cfg = for_movie(cfg, movie, mov.apix)
    notes: dict[str, Any] = {"warnings": list(mov.warnings), "eer_leftover": int(mov.leftover_raw_frames),
                             "eer_raw_frames": int(mov.n_raw_frames)}
    clock.lap("decode")
    frames = correct_gain(cfg, mov, xp=xp, gain=gain, workspace=workspace)
    del mov, preloaded
    clock.lap("gain")
    sums2 = binned_sums(frames, workspace) if use_binned_patches(cfg, frames, xp, binned_patches) else None
    motion = full_frame_motion(cfg, frames, sums2=sums2)
    del sums2
    clock.lap("motion")
    located = locate_picks(cfg, movie, picks, frames)
    clock.lap("picks")
    local = local_trajectories(cfg, frames, located.positions, motion)
    if motion.sums2 is not None:
        workspace.keep("binned", motion.sums2)  # for the next movie (its pages stay mapped)
        motion.sums2 = None
    clock.lap("local")
    return Estimate(frames, located, motion, local, notes, cfg)


def movie_result(cfg: Config, movie: str, est: Estimate, extracted: Extracted, timings: dict[str, float]) -> MovieResult:
    """The :class:`MovieResult` of one movie with its statistics (``stats``)."""
    frames, located, local = est.frames, est.located, est.local
    pk, kept, apix = located.picks, extracted.kept, frames.apix
    skipped: list[tuple[float, float, str]] = list(pk.rejected)
    kept_set = set(kept.tolist())
    for i, reason in extracted.reasons:
        if i not in kept_set:
            skipped.append((float(pk.x[i]), float(pk.y[i]), reason))
    shifts_px = est.fullframe_px()
    n_frames = len(shifts_px)
    warnings = list(est.notes.get("warnings", []))
    if local.n_outside:
        warnings.append(f"{local.n_outside} particles too close to the edge for the alignment box: full-frame motion only")
    frame_shifts_A = shifts_px * apix
    ls = local.smooth[kept]
    local_mag = np.linalg.norm(ls - ls.mean(axis=1, keepdims=True), axis=-1) * apix
    per_particle = np.sqrt((local_mag**2).mean(axis=1)) if len(kept) else np.zeros(0)
    cumulative = cfg.pre_exposure + cfg.dose_per_frame * np.arange(1, n_frames + 1)
    n_early = int(np.searchsorted(cumulative, EARLY_EXPOSURE + cfg.pre_exposure, side="right")) + 1
    # reference-free quality signal: held-out relative gain in coherent signal between unseen frames (gpu/quality.py)
    quality_gain = float(local.info.get("quality_gain", float("nan")))
    stats: dict[str, Any] = {
        "motion_total_A": round(path_length(frame_shifts_A), 3),
        "motion_early_A": round(path_length(frame_shifts_A[: max(n_early, 1)]), 3),
        "local_mean_A": round(float(per_particle.mean()), 3) if len(per_particle) else 0.0,
        "local_max_A": round(float(per_particle.max()), 3) if len(per_particle) else 0.0,
        "quality_gain": None if np.isnan(quality_gain) else round(quality_gain, 5),
        "n_picks": located.n_picks,
        "n_particles": len(kept),
        "n_skipped": len(skipped),
        "skip_reasons": skip_reasons(skipped),
        "frames": int(n_frames),
        "dose_per_frame": cfg.dose_per_frame,
        "pre_exposure": cfg.pre_exposure,
        "apix_source": cfg.apix_source or "--apix / config.yaml",
        "hot_pixels": frames.n_bad,
        "eer_leftover": int(est.notes.get("eer_leftover", 0)),
        "eer_raw_frames": int(est.notes.get("eer_raw_frames", 0)),
        "local_fallback": bool(local.info.get("fallback", False)),
        "warnings": [f"{pk.source}: {p}" for p in pk.problems] + warnings,
        "notes": [f"{pk.source}: {n}" for n in pk.notes],
        **timings,
    }
    return MovieResult(
        movie=str(movie),
        particles=extracted.particles,
        x=np.asarray(pk.x)[kept],
        y=np.asarray(pk.y)[kept],
        columns={k: np.asarray(v)[kept] for k, v in pk.columns.items()},
        skipped=skipped,
        frame_shifts=frame_shifts_A,
        traj_raw=est.raw_trajectories_px()[kept] * apix,
        traj_smooth=est.trajectories_px()[kept] * apix,
        micrograph_shape=frames.phys_shape,
        apix=cfg.apix,
        stats=stats,
    )


def skip_reasons(skipped: list[tuple[float, float, str]]) -> dict[str, int]:
    """``{reason: count}`` of the picks not written, most frequent first (every pick is accounted
    for: n_picks = n_particles + sum of these counts)."""
    counts = Counter(reason for _, _, reason in skipped)
    return dict(counts.most_common())


def write_sidecar_files(cfg: Config, result: MovieResult, micrograph: np.ndarray, binning_phys: float) -> None:
    """Stage "sidecars": trajectories/<stem>.star and plots/<stem>.png (idempotent, atomic replace)."""
    from streamer.formats.atomic import side_name
    from streamer.formats.picks import movie_stem
    from streamer.formats.relion_motion import write_motion_star
    from streamer.formats.trajectories import write_trajectories

    out = Path(cfg.out)
    stem = movie_stem(result.movie)
    (out / "trajectories").mkdir(parents=True, exist_ok=True)
    write_trajectories(out / "trajectories" / side_name(out / "trajectories", stem, ".star"), result)
    write_motion_star(cfg, result, out)
    if cfg.plots:
        from streamer.formats.plot import plot_trajectories

        (out / "plots").mkdir(parents=True, exist_ok=True)
        plot_trajectories(out / "plots" / side_name(out / "plots", stem, ".png"), micrograph, binning_phys, result)


# -- the composition ---------------------------------------------------------------------------------


def process_movie(
    cfg: Config,
    movie: str,
    picks: Any = None,
    *,
    xp: ModuleType | None = None,
    workspace: Workspace | None = None,
    preloaded: Movie | None = None,
    gain: np.ndarray | None = None,
    write_sidecars: bool = True,
    on_stage: Callable[[str], None] | None = None,
    binned_patches: bool | None = None,
    render_plot: bool = False,
) -> MovieResult:
    """Process one movie end to end: the stages of the module docstring in order, each timed.
    Raises MovieError/PicksError/GainError.

    ``picks``: a PickSource, a pick file or folder, or None (``cfg.picks.dir``). ``workspace``: buffers
    kept between movies (a worker passes its own; None = a fresh one). ``preloaded``: the movie already
    decoded (its raw frames are released once the gain is applied). ``gain``: the gain multiplier
    (None = ``cfg.gain.file``). ``binned_patches``: see :func:`use_binned_patches`. ``on_stage(name)``:
    see :class:`StageClock`. ``render_plot``: without ``write_sidecars``, render the diagnostic PNG
    into ``result.plot_png`` (a worker writes no files; the session's writer writes it).
    """
    xp = xp or backend.get_xp(cfg.device)
    workspace = workspace if workspace is not None else Workspace()
    if cfg.threads:
        backend.set_threads(cfg.threads)
    clock = StageClock(xp, on_stage)
    est = estimate(cfg, movie, picks, xp=xp, workspace=workspace, clock=clock, preloaded=preloaded, gain=gain,
                   binned_patches=binned_patches)
    del preloaded
    cfg = est.cfg or cfg
    extracted = extract(cfg, est.frames, est.located.positions, est.trajectories_px(), est.trajectory_sd_px())
    clock.lap("extract")
    image, binning = micrograph(est.motion)
    est.motion.binned = None
    if est.frames.reusable:
        workspace.keep("frames", est.frames.data)
    est.frames.data = None
    clock.lap("micrograph")

    result = movie_result(cfg, movie, est, extracted, clock.timings)
    if write_sidecars and cfg.out:
        write_sidecar_files(cfg, result, image, binning * est.frames.upsampling)
        result.stats["seconds_sidecars"] = round(time.perf_counter() - clock.tick, 4)
    elif render_plot and cfg.plots:  # a worker: the PNG goes to the session's writer with the result
        from streamer.formats.plot import plot_png

        result.plot_png = plot_png(image, binning * est.frames.upsampling, result)
        result.stats["seconds_sidecars"] = round(time.perf_counter() - clock.tick, 4)
    return result
