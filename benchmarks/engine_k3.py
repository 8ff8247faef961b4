"""Time the engine on a synthetic K3 movie: full-frame motion estimation and particle extraction.

Frames: 5760 x 4092 float32, Poisson(1) counts per pixel and frame plus a weak (10%) specimen
texture drifting by integer steps (so the correlation has something to lock on to). 300 particles,
box 256 -> 128, dose weighting on. Usage::

    python benchmarks/engine_k3.py [--device cpu|gpu] [--frames 40] [--particles 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gpu.backend import get_xp, is_gpu
from gpu.extract import extract_particles
from gpu.motion import bin_movie, estimate_frame_shifts

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
    ap.add_argument("--memory-budget", type=float, default=None, help="GiB per extraction chunk (default: engine's)")
    args = ap.parse_args()
    xp = get_xp(args.device)

    def sync() -> None:
        if is_gpu(xp):
            xp.cuda.Device().synchronize()

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    frames_host, drift = synthetic_movie(args.frames, rng)
    print(f"synthetic movie {frames_host.shape}: {time.perf_counter() - t0:.1f} s (not part of the engine)")
    t0 = time.perf_counter()
    frames = xp.asarray(frames_host)
    sync()
    if is_gpu(xp):
        print(f"host -> device copy: {time.perf_counter() - t0:.2f} s")

    t0 = time.perf_counter()
    movie = bin_movie(frames, args.apix, 8.0)
    sync()
    t1 = time.perf_counter()
    shifts = estimate_frame_shifts(movie, args.apix, 8.0, 500.0)
    t2 = time.perf_counter()
    err = np.sqrt(np.mean(np.sum((shifts - drift) ** 2, axis=1)))
    print(
        f"motion: {t2 - t0:.2f} s (binning+FFT {t1 - t0:.2f} s to {movie.shape}, estimation {t2 - t1:.2f} s); "
        f"RMS error vs the planted drift {err:.3f} px"
    )

    half = args.box // 2 + 60
    pos = np.stack([rng.uniform(half, W - half, args.particles), rng.uniform(half, H - half, args.particles)], 1)
    traj = shifts[None] + rng.normal(0.0, 0.3, (args.particles, args.frames, 2))
    dose = {"dose_per_frame": 1.0, "pre_exposure": 0.0, "kv": 300.0}
    t0 = time.perf_counter()
    parts, kept, _ = extract_particles(
        frames,
        pos,
        traj,
        args.box,
        args.out_box,
        args.apix,
        dose=dose,
        memory_budget=None if args.memory_budget is None else int(args.memory_budget * 2**30),
    )
    sync()
    t1 = time.perf_counter()
    print(
        f"extraction: {t1 - t0:.2f} s for {kept.size} particles, box {args.box} -> {args.out_box}, "
        f"{args.frames} frames; output {tuple(parts.shape)} {parts.dtype}"
    )


if __name__ == "__main__":
    main()
