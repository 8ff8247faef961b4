"""Seconds per movie of the per-particle estimation (gpu/local.py), CPU or GPU.

One simulated movie (``lmc simulate`` physics, in memory) is gain-corrected and aligned
full-frame; then the band spectra of all particles are cut and transformed
(:func:`gpu.local_model.spectra_from_frames`) and :func:`gpu.local.estimate_local` runs with the
default configuration (guard on: one fit to all frames + two held-out fits), ``--repeat`` times.
Reported: seconds for the spectra, the held-out fits, the main fit and the total, per movie.

Usage::

    python benchmarks/local_speed.py [--particles 300] [--frames 40] [--size 3072] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import numpy as np

from gpu import backend
from gpu.extract import boxes_inside
from gpu.gain import apply_gain
from gpu.local import estimate_local
from gpu.local_model import spectra_from_frames
from gpu.motion import estimate_frame_shifts
from streamer.config import LocalConfig
from streamer.sim.simulate import SimParams, render_movie, write_gain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", type=int, default=3072, help="movie size (px, square)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--local", default='{"band_high": 8, "bfactor": 0}', help="JSON overrides of LocalConfig")
    args = ap.parse_args(argv)
    xp = backend.get_xp(args.device)
    cfg = dataclasses.replace(LocalConfig(), **json.loads(args.local))
    params = SimParams(movies=1, shape=(args.size, args.size), particles=args.particles, frames=args.frames)
    t = time.perf_counter()
    counts, truth = render_movie(params, 0)
    import mrcfile

    with tempfile.TemporaryDirectory() as tmp, mrcfile.open(write_gain(tmp, params), permissive=True) as m:
        gain = np.asarray(m.data, dtype=np.float32)
    frames = apply_gain(xp.asarray(counts), xp.asarray(gain))
    del counts
    shifts = estimate_frame_shifts(frames, params.apix, 8.0, 500.0, 10, 0.01, -1)
    print(f"simulated + full-frame aligned in {time.perf_counter() - t:.1f} s")
    box = int(truth["box"])
    a = cfg.align_box or box
    pos = truth["picks"][truth["pick_particle"] >= 0]
    centres = pos[:, None, :] + shifts[None]
    pos = pos[boxes_inside(np.rint(centres), a, frames.shape[1:]).all(axis=1)]
    centres = pos[:, None, :] + shifts[None]
    rows = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        spec = spectra_from_frames(frames, centres, a, params.apix, params.dose_per_frame, 0.0, params.kv,
                                   band_low=cfg.band_low, band_high=cfg.band_high, bfactor=cfg.bfactor)
        if backend.is_gpu(xp):
            xp.cuda.Stream.null.synchronize()
        t1 = time.perf_counter()
        res = estimate_local(None, None, pos, params.apix, params.dose_per_frame, 0.0, params.kv, cfg=cfg, spectra=spec)
        t2 = time.perf_counter()
        rows.append((t1 - t0, res.info["seconds_validate"], res.info["seconds_fit"], t2 - t0, res.info["iterations"]))
    sp = spec.x.shape
    print(f"device {args.device}; {sp[0]} particles, {sp[1]} frames, align box {a} px, band spectra {sp[2]}x{sp[3]}")
    print("| spectra s | held-out fits s | main fit s | total s per movie | L-BFGS iterations (main) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
