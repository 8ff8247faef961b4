"""Seconds per movie of the per-particle stage (``streamer.pipeline.local_trajectories``), CPU or GPU.

One simulated movie (``lmc simulate`` physics, rendered in memory; gain and picks written to a
temporary folder) goes through the product's own stages with a real :class:`~streamer.config.Config`
(``lmc run`` defaults plus ``--local`` overrides): gain, full-frame motion, picks, then the
per-particle stage ``--repeat`` times (band spectra of all particles, then
:func:`gpu.local.estimate_local` with the guard on: one fit to all frames + two held-out fits).
Reported per movie: seconds of the whole stage, of the held-out fits and of the main fit (the
estimator's own timings), the rest (spectra, raw shifts, quality signal), the iterations, and the
CPU seconds of the stage (all threads of the process: on a shared machine they show the work when
the wall clock is inflated by other jobs).

Usage::

    python benchmarks/local_speed.py [--particles 300] [--frames 40] [--size 3072] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from gpu import backend
from streamer import pipeline as pl
from streamer.config import from_dict
from streamer.formats.movies import Movie
from streamer.sim.simulate import (
    SimParams,
    file_stem,
    movie_filename,
    recommended_box,
    render_movie,
    write_gain,
    write_picks,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", type=int, default=3072, help="movie size (px, square)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--local", default="{}", help="JSON overrides of the local section of the config")
    args = ap.parse_args(argv)
    xp = backend.get_xp(args.device)
    params = SimParams(movies=1, shape=(args.size, args.size), particles=args.particles, frames=args.frames)
    t = time.perf_counter()
    counts, truth = render_movie(params, 0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict({
            "apix": params.apix, "dose_per_frame": params.dose_per_frame, "kv": params.kv, "box": recommended_box(params),
            "device": args.device, "gain": {"file": str(write_gain(tmp, params))}, "picks": {"dir": tmp},
            "local": json.loads(args.local),
        })
        write_picks(tmp, params, 0, truth)
        movie = movie_filename(params, 0)
        frames = pl.correct_gain(cfg, Movie(movie, counts, "mrc"), xp=xp, gain=None, workspace=pl.Workspace())
        del counts
        motion = pl.full_frame_motion(cfg, frames)
        located = pl.locate_picks(cfg, file_stem(movie), None, frames)
    print(f"simulated + gain + full-frame motion in {time.perf_counter() - t:.1f} s")
    rows = []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        res = pl.local_trajectories(cfg, frames, located.positions, motion)
        if backend.is_gpu(xp):
            xp.cuda.Stream.null.synchronize()
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        val, fit = res.info["seconds_validate"], res.info["seconds_fit"]
        rows.append((total - val - fit, val, fit, total, res.info["iterations"], cpu))
    # the box the stage used: a binned movie rounds the configured box down to a multiple of 4
    spectra, _ = pl.local_spectra(cfg, frames, located.positions, motion)
    a = f"{spectra.box} px" if spectra is not None else "none"
    if spectra is not None and spectra.box != (cfg.local.align_box or cfg.box):
        a += f" (configured {cfg.local.align_box or cfg.box} px)"
    print(f"device {args.device}; {len(located.positions) - res.n_outside} particles, {args.frames} frames, align box {a}")
    print("| spectra + rest s | held-out fits s | main fit s | total s per movie | L-BFGS iterations (main) | CPU s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]} | {r[5]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
