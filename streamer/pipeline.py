"""One movie + its picks -> motion-corrected, exposure-weighted particles (a MovieResult).

Stages: read + decode -> gain (and hot/defect pixels) -> full-frame motion -> picks ->
per-particle trajectories (``cfg.local``) -> extraction along the trajectories with Fourier
sub-pixel shifts, exposure weighting and Fourier cropping -> normalisation -> statistics,
trajectories STAR and diagnostic plot.

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
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from gpu import backend
from streamer.config import Config, GainConfig
from streamer.types import MovieResult, Picks

EARLY_EXPOSURE = 4.0  # e/Å²: "early" motion as in RELION's motion statistics

# One float32 movie buffer kept between movies on the CPU: faulting in 3.6 GB of fresh pages for a
# K3 movie costs 0.3-8 s of kernel time per movie (more the first time on a VM); a worker reuses it.
_FRAME_BUFFERS: list[np.ndarray] = []
# and the 2x2-binned movie the per-particle stage cuts its patches from (a quarter of the size)
_BINNED_BUFFERS: list[np.ndarray] = []


def _take_buffer(pool: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray | None:
    """A kept buffer of ``shape`` from ``pool`` (``_FRAME_BUFFERS`` / ``_BINNED_BUFFERS``), else None."""
    while pool:
        buf = pool.pop()  # atomic: a concurrent caller gets None and allocates its own
        if buf.shape == tuple(shape):
            return buf
    return None


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
    return read_picks(source, cfg.picks, frame_shape_phys)


def path_length(traj: np.ndarray) -> float:
    """Total path length of a (F, 2) trajectory."""
    if len(traj) < 2:
        return 0.0
    return float(np.sum(np.linalg.norm(np.diff(traj, axis=0), axis=-1)))


def process_movie(
    cfg: Config,
    movie: str,
    picks: Any = None,
    xp: ModuleType | None = None,
    gain: np.ndarray | None = None,
    write_sidecars: bool = True,
    preloaded: Any = None,
    on_stage: Callable[[str], None] | None = None,
    binned_patches: bool | None = None,
    render_plot: bool = False,
) -> MovieResult:
    """Process one movie end to end (see module docstring). Raises MovieError/PicksError/GainError.

    ``preloaded``: the movie already read by ``streamer.formats.movies.read_movie`` (a worker decodes the
    next movie ahead while the current one is processed). Its raw frames are released (replaced
    by an empty array) once the gain is applied, so the caller's reference does not keep the raw
    movie alive through the later stages next to the float32 one and the next movie's decode.
    ``binned_patches``: cut the per-particle alignment patches from a 2x2-binned copy of the movie
    when the band allows it (None = on the CPU only; the GPU keeps device memory for the movie).
    ``render_plot``: without ``write_sidecars``, render the diagnostic PNG into ``result.plot_png``
    (workers write no files; the session's writer writes it with the trajectories STAR).
    ``on_stage(name)`` is called as each stage ends (decode, gain, motion, picks, local, extract,
    micrograph), e.g. to read memory per stage (benchmarks/device_memory.py).
    """
    from gpu.extract import boxes_inside, extract_particles
    from gpu.gain import apply_gain, hot_pixel_mask, replace_pixels
    from gpu.motion import aligned_sum, bin_movie, estimate_frame_shifts
    from gpu.normalize import normalize_background
    from streamer.formats.movies import read_movie

    xp = xp or backend.get_xp(cfg.device)
    if cfg.threads:
        backend.set_threads(cfg.threads)
    timings: dict[str, float] = {}
    warnings: list[str] = []
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        if backend.is_gpu(xp):
            xp.cuda.Stream.null.synchronize()
        now = time.perf_counter()
        timings[f"seconds_{name}"] = round(now - tick, 4)
        if on_stage is not None:
            on_stage(name)
        tick = time.perf_counter()  # the callback's own time is not charged to the next stage

    mov = preloaded if preloaded is not None else read_movie(movie, cfg.eer, threads=cfg.threads)
    warnings.extend(mov.warnings)  # includes the EER leftover-frames note from the reader
    u = int(mov.upsampling)
    eer_leftover = int(mov.leftover_raw_frames)
    n_frames, h, w = mov.frames.shape
    phys_shape = (h // u, w // u)
    apix = cfg.apix / u
    lap("decode")

    multiplier = gain if gain is not None else load_gain(cfg, (h, w), u)
    buffer = None if backend.is_gpu(xp) else _take_buffer(_FRAME_BUFFERS, mov.frames.shape)
    # host frames in: on the GPU apply_gain uploads a few raw frames at a time into the float32
    # device movie, so the raw movie never sits on the device next to it
    frame_sum = xp.empty((h, w), dtype=xp.float32) if cfg.gain.hot_pixel_sigma > 0 else None
    frames = apply_gain(mov.frames, multiplier, out=buffer, xp=xp, sum_out=frame_sum)
    reusable = not backend.is_gpu(xp) and frames is not mov.frames
    if preloaded is not None and frames is not mov.frames:
        mov.frames = np.empty((0, h, w), mov.frames.dtype)
    del mov, preloaded
    bad = None
    if cfg.gain.hot_pixel_sigma > 0:
        bad = hot_pixel_mask(frame_sum, cfg.gain.hot_pixel_sigma)
    if cfg.gain.defects:
        defects = xp.asarray(_defect_mask(cfg.gain.defects, os.path.getmtime(cfg.gain.defects), (h, w)))
        bad = defects if bad is None else (bad | defects)
    n_bad = int(bad.sum()) if bad is not None else 0
    if n_bad:
        frames = replace_pixels(frames, bad)
    lap("gain")

    # the frames' 2x2 sums, once (CPU; on a GPU the gather is cheap and device memory is not: EER at
    # upsampling 2 would need 2.7 GB more): the per-particle patches are cut from them when their
    # band allows it, and the motion stage's own first binning, when it is by 2, is the same mean
    sums2 = None
    use_binned = not backend.is_gpu(xp) if binned_patches is None else binned_patches
    if use_binned and cfg.local.enabled:
        from gpu.local_model import auto_binning, band_size, binned_movie

        a = (cfg.local.align_box or cfg.box) * u
        if auto_binning(a, band_size(a, apix, cfg.local.band_high)) == 2:
            sums2 = binned_movie(frames, _take_buffer(_BINNED_BUFFERS, (n_frames, h // 2, w // 2)))
    binned = bin_movie(frames, apix, cfg.motion.max_resolution, sums2=sums2)
    shifts_px = estimate_frame_shifts(
        binned,
        apix,
        max_resolution_A=cfg.motion.max_resolution,
        bfactor=cfg.motion.bfactor,
        iterations=cfg.motion.iterations,
        tolerance_px=cfg.motion.tolerance * u,
        reference_frame=cfg.motion.reference_frame,
        dose_per_frame=cfg.dose_per_frame,
        pre_exposure=cfg.pre_exposure,
        smoothing=cfg.motion.smoothing,
        max_shift_A=cfg.motion.max_shift,
    )
    shifts_px = np.asarray(shifts_px, dtype=np.float64)
    lap("motion")

    pk = resolve_picks(cfg, movie, picks, phys_shape)
    skipped: list[tuple[float, float, str]] = list(pk.rejected)
    px = pk.x * u + (u - 1) / 2.0
    py = pk.y * u + (u - 1) / 2.0
    positions = np.stack([px, py], axis=-1) if len(pk) else np.zeros((0, 2))
    n_picks = len(pk) + len(pk.rejected)
    lap("picks")

    # per-particle trajectories (local residual on top of the full-frame motion), px
    local_raw = np.zeros((len(pk), n_frames, 2))
    local_smooth = np.zeros((len(pk), n_frames, 2))
    local_info: dict[str, Any] = {}
    if cfg.local.enabled and len(pk) > 0:
        from gpu.local import estimate_local
        from gpu.local_model import binned_boxes_inside, spectra_from_frames

        a = (cfg.local.align_box or cfg.box) * u
        centres = positions[:, None, :] + shifts_px[None, :, :]
        centres_int = np.rint(centres)
        inside = boxes_inside(centres_int, a, (h, w)).all(axis=1)
        if sums2 is not None:  # patches cut from the 2x2 sums: a quarter of the gather
            inside &= binned_boxes_inside(centres, a, (h // 2, w // 2)).all(axis=1)
        if inside.any():
            # band-limited patch spectra, cut chunk by chunk: never all patches of a movie at once
            spectra = spectra_from_frames(
                frames,
                centres[inside],
                a,
                apix=apix,
                dose_per_frame=cfg.dose_per_frame,
                pre_exposure=cfg.pre_exposure,
                kv=cfg.kv,
                band_low=cfg.local.band_low,
                band_high=cfg.local.band_high,
                bfactor=cfg.local.bfactor,
                first_frame=cfg.local.first_frame,
                last_frame=cfg.local.last_frame,
                binned_frames=sums2,
            )
            res = estimate_local(
                None,
                None,
                positions[inside],
                apix=apix,
                dose_per_frame=cfg.dose_per_frame,
                pre_exposure=cfg.pre_exposure,
                kv=cfg.kv,
                cfg=cfg.local,
                sigma_field=cfg.local.sigma_field,
                burst_exposure=cfg.local.burst_exposure,
                kernel=cfg.local.kernel,
                auto_smoothing=cfg.local.auto_smoothing,
                spectra=spectra,
            )
            local_raw[inside] = backend.to_numpy(res.raw)
            local_smooth[inside] = backend.to_numpy(res.smooth)
            local_info = dict(res.info)
            del spectra
        if not inside.all():
            warnings.append(f"{int((~inside).sum())} particles too close to the edge for the alignment box: full-frame motion only")
    if sums2 is not None:
        _BINNED_BUFFERS[:] = [sums2]  # for the next movie (its pages stay mapped)
        sums2 = None
    lap("local")

    traj_smooth_px = shifts_px[None] + local_smooth
    traj_raw_px = shifts_px[None] + local_raw
    dose = {"dose_per_frame": cfg.dose_per_frame, "pre_exposure": cfg.pre_exposure, "kv": cfg.kv} if cfg.dose_weighting else None
    particles, kept, reasons = extract_particles(
        frames,
        positions,
        traj_smooth_px,
        box=cfg.box * u,
        out_box=cfg.out_box,
        apix=apix,
        dose=dose,
        edge=cfg.edge,
    )
    kept = np.asarray(backend.to_numpy(kept), dtype=np.int64)
    kept_set = set(kept.tolist())
    for i, reason in reasons:  # [(pick index, reason)] from extract_particles
        if i not in kept_set:
            skipped.append((float(pk.x[i]), float(pk.y[i]), reason))
    if cfg.normalize or cfg.invert_contrast:
        particles = normalize_background(
            particles, radius_px=0.75 * cfg.out_box / 2, invert=cfg.invert_contrast, normalize=cfg.normalize
        )
    particles_np = backend.to_numpy(particles).astype(np.float32, copy=False)
    lap("extract")

    # reference-free quality signal: held-out relative gain in coherent signal between unseen frames (gpu/quality.py)
    quality_gain = float(local_info.get("quality_gain", float("nan")))
    aligned, binning = aligned_sum(binned, shifts_px)
    del binned
    micrograph = backend.to_numpy(aligned)
    if reusable:
        _FRAME_BUFFERS[:] = [frames]
    del frames
    lap("micrograph")

    frame_shifts_A = shifts_px * apix
    local_mag = np.linalg.norm(local_smooth[kept] - local_smooth[kept].mean(axis=1, keepdims=True), axis=-1) * apix
    per_particle = np.sqrt((local_mag**2).mean(axis=1)) if len(kept) else np.zeros(0)
    cumulative = cfg.pre_exposure + cfg.dose_per_frame * np.arange(1, n_frames + 1)
    n_early = int(np.searchsorted(cumulative, EARLY_EXPOSURE + cfg.pre_exposure, side="right")) + 1
    stats: dict[str, Any] = {
        "motion_total_A": round(path_length(frame_shifts_A), 3),
        "motion_early_A": round(path_length(frame_shifts_A[: max(n_early, 1)]), 3),
        "local_mean_A": round(float(per_particle.mean()), 3) if len(per_particle) else 0.0,
        "local_max_A": round(float(per_particle.max()), 3) if len(per_particle) else 0.0,
        "quality_gain": None if np.isnan(quality_gain) else round(quality_gain, 5),
        "n_picks": n_picks,
        "n_particles": len(kept),
        "n_skipped": len(skipped),
        "frames": int(n_frames),
        "dose_per_frame": cfg.dose_per_frame,
        "pre_exposure": cfg.pre_exposure,
        "hot_pixels": n_bad,
        "eer_leftover": eer_leftover,
        "local_fallback": bool(local_info.get("fallback", False)),
        "warnings": [f"{pk.source}: {p}" for p in pk.problems] + warnings,
        **timings,
    }
    result = MovieResult(
        movie=str(movie),
        particles=particles_np,
        x=np.asarray(pk.x)[kept],
        y=np.asarray(pk.y)[kept],
        columns={k: np.asarray(v)[kept] for k, v in pk.columns.items()},
        skipped=skipped,
        frame_shifts=frame_shifts_A,
        traj_raw=traj_raw_px[kept] * apix,
        traj_smooth=traj_smooth_px[kept] * apix,
        micrograph_shape=phys_shape,
        apix=cfg.apix,
        stats=stats,
    )
    if write_sidecars and cfg.out:
        write_sidecar_files(cfg, result, micrograph, binning * u)
        stats["seconds_sidecars"] = round(time.perf_counter() - tick, 4)
    elif render_plot and cfg.plots:  # a worker: the PNG goes to the session's writer with the result
        from streamer.formats.plot import plot_png

        result.plot_png = plot_png(micrograph, binning * u, result)
        stats["seconds_sidecars"] = round(time.perf_counter() - tick, 4)
    return result


def write_sidecar_files(cfg: Config, result: MovieResult, micrograph: np.ndarray, binning_phys: float) -> None:
    """trajectories/<stem>.star and plots/<stem>.png (idempotent, atomic replace)."""
    from streamer.formats.picks import movie_stem
    from streamer.formats.trajectories import write_trajectories

    out = Path(cfg.out)
    stem = movie_stem(result.movie)
    (out / "trajectories").mkdir(parents=True, exist_ok=True)
    write_trajectories(out / "trajectories" / f"{stem}.star", result)
    if cfg.plots:
        from streamer.formats.plot import plot_trajectories

        (out / "plots").mkdir(parents=True, exist_ok=True)
        plot_trajectories(out / "plots" / f"{stem}.png", micrograph, binning_phys, result)

