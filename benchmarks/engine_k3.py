"""Time the engine on a synthetic K3 movie: the pipeline's full-frame motion and extraction stages.

Frames: 5760 x 4092 float32, Poisson(1) counts per pixel and frame plus a weak (10%) specimen
texture drifting by integer steps (so the correlation has something to lock on to). 300 particles,
box 256 -> 128, dose weighting and normalisation on (``lmc run`` defaults otherwise: a real
:class:`~streamer.config.Config`). The stages are the product's own
(:func:`streamer.pipeline.full_frame_motion`: binning + FFT + estimation; :func:`streamer.pipeline.extract`).
Prints the seconds of each stage, wall clock and process CPU time (all threads; on a shared machine
the CPU time shows the work when the wall clock is inflated by other jobs). ``--repeat N`` runs the
engine N times on the same movie and adds the steady state (the minimum of each stage over the
repeats; the first run also pays the first touch of freshly mapped memory). Usage::

    python benchmarks/engine_k3.py [--device cpu|gpu] [--frames 40] [--particles 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gpu.backend import get_xp, is_gpu
from streamer import pipeline as pl
from streamer.config import from_dict

H, W = 4092, 5760
# Poisson(1) cumulative probabilities: counts = number of thresholds a uniform draw exceeds
_CDF = np.cumsum([np.exp(-1.0) / np.prod(np.arange(1, k + 1)) for k in range(8)]).astype(np.float32)


def synthetic_movie(n_frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(frames (F, H, W) float32, drift (F, 2) px)``."""
    margin = 40
    noise = rng.standard_normal((H + 2 * margin, W + 2 * margin), dtype=np.float32)
    k2 = np.fft.fftfreq(noise.shape[0])[:, None] ** 2 + np.fft.rfftfreq(noise.shape[1])[None, :] ** 2
    tex = np.fft.irfft2(np.fft.rfft2(noise) * np.exp(-k2 / (2 * 0.02**2)), s=noise.shape).astype(np.float32)
    tex *= np.float32(0.1 / tex.std())
    t = np.arange(n_frames)
    drift = np.round(np.stack([15 * (1 - np.exp(-t / 3)) + 0.2 * t, -10 * (1 - np.exp(-t / 3)) + 0.1 * t], 1))
    drift -= drift[n_frames // 2]
    frames = np.empty((n_frames, H, W), np.float32)
    for f in range(n_frames):
        u = rng.random((H, W), dtype=np.float32)
        counts = np.zeros((H, W), np.float32)
        for c in _CDF:
            counts += u > c
        dx, dy = int(drift[f, 0]), int(drift[f, 1])
        frames[f] = counts + tex[margin - dy : margin - dy + H, margin - dx : margin - dx + W]
    return frames, drift


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--out-box", type=int, default=128)
    ap.add_argument("--apix", type=float, default=0.83)
    ap.add_argument("--repeat", type=int, default=1, help="runs of the engine on the same movie (min per stage)")
    args = ap.parse_args()
    xp = get_xp(args.device)
    cfg = from_dict({"apix": args.apix, "dose_per_frame": 1.0, "box": args.box, "fcrop_box": args.out_box, "device": args.device})

    def sync() -> None:
        if is_gpu(xp):
            xp.cuda.Device().synchronize()

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    frames_host, drift = synthetic_movie(args.frames, rng)
    print(f"synthetic movie {frames_host.shape}: {time.perf_counter() - t0:.1f} s (not part of the engine)")
    t0 = time.perf_counter()
    frames = pl.Frames(xp.asarray(frames_host), frames_host.shape, 1, args.apix, 0, False)
    sync()
    if is_gpu(xp):
        print(f"host -> device copy: {time.perf_counter() - t0:.2f} s")

    half = args.box // 2 + 60
    pos = np.stack([rng.uniform(half, W - half, args.particles), rng.uniform(half, H - half, args.particles)], 1)
    jitter = rng.normal(0.0, 0.3, (args.particles, args.frames, 2))
    best: dict[str, tuple[float, float]] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> tuple[Any, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        old = best.get(stage, (np.inf, np.inf))
        best[stage] = (min(old[0], wall), min(old[1], cpu))
        return out, wall, cpu

    for run in range(max(1, args.repeat)):
        motion, tm, cm = timed("motion", lambda: pl.full_frame_motion(cfg, frames))
        shifts = motion.shifts_px
        err = np.sqrt(np.mean(np.sum((shifts - drift) ** 2, axis=1)))
        print(
            f"[run {run + 1}] motion (binning + FFT + estimation): {tm:.2f} s (CPU {cm:.2f} s); "
            f"RMS error vs the planted drift {err:.3f} px"
        )
        del motion
        traj = shifts[None] + jitter
        out, tx, cx = timed("extraction", lambda t=traj: pl.extract(cfg, frames, pos, t, None))
        print(
            f"[run {run + 1}] extraction: {tx:.2f} s (CPU {cx:.2f} s) for {out.kept.size} particles, box {args.box} -> "
            f"{args.out_box}, {args.frames} frames; output {tuple(out.particles.shape)} {out.particles.dtype}"
        )
    if args.repeat > 1:
        stages = ", ".join(f"{k} {w:.2f} s (CPU {c:.2f} s)" for k, (w, c) in best.items())
        print(f"steady state (min of {args.repeat} runs): {stages}")


if __name__ == "__main__":
    main()
