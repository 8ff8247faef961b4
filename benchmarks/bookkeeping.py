"""Bookkeeping cost of the single writer: does a commit stay O(new particles) as the folder grows?

Commits N fake movies (default 2000 x 300 particles of 8x8 px) through ``Committer`` with the
default 2 s snapshot throttle (snapshots in the background writer) and prints the median / p95 commit time of the first and last
windows of movies (snapshot rewrites included), and the process RSS at the start and the end.

    .venv/bin/python benchmarks/bookkeeping.py [--movies 2000] [--particles 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from streamer.config import Config
from streamer.output.committer import Committer
from streamer.types import MovieResult


def rss_mib() -> float:
    """Current resident set size (MiB) from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def fake_result(i: int, n: int, box: int, particles: np.ndarray, rng: np.random.Generator) -> MovieResult:
    cols = {"rlnDefocusU": rng.uniform(1e4, 2e4, n), "rlnDefocusV": rng.uniform(1e4, 2e4, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n)}
    return MovieResult(
        movie=f"/data/session/Images-Disc1/GridSquare_{i // 50:05d}/Data/FoilHole_{i:07d}_fractions.tiff",
        particles=particles, x=rng.uniform(0, 5760, n), y=rng.uniform(0, 4092, n), columns=cols, skipped=[],
        frame_shifts=np.zeros((40, 2)), traj_raw=np.zeros((n, 40, 2)), traj_smooth=np.zeros((n, 40, 2)),
        micrograph_shape=(4092, 5760), apix=0.83, stats={"n_particles": n, "motion_total_A": 12.5},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movies", type=int, default=2000)
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--window", type=int, default=200, help="movies in the start / end windows")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one, removed)")
    args = ap.parse_args()

    box = 8
    cfg = Config(apix=0.83, box=16, fcrop_box=box)
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="lmc-bookkeeping-")
        out = Path(tmp) / "out"
    rng = np.random.default_rng(0)
    particles = rng.standard_normal((args.particles, box, box)).astype(np.float32)
    results = [fake_result(i, args.particles, box, particles, rng) for i in range(min(args.window, args.movies))]
    rss0 = rss_mib()
    times = np.zeros(args.movies)
    t_all = time.perf_counter()
    try:
        with Committer(out, cfg) as c:
            for i in range(args.movies):
                r = results[i % len(results)]
                r.movie = r.movie.rsplit("_", 2)[0] + f"_{i:07d}_fractions.tiff"  # unique movie, same payload
                t0 = time.perf_counter()
                c.commit(r)
                times[i] = time.perf_counter() - t0
            t_close = time.perf_counter()
        t_close = time.perf_counter() - t_close
        total = time.perf_counter() - t_all
        sizes = {p.name: p.stat().st_size for p in [out / "particles.star", out / "particles.cs",
                                                     out / "ledger.sqlite"]}
        n_stacks = len(list((out / "stacks").glob("*.mrcs")))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    w = min(args.window, args.movies // 2)
    first, last = times[:w] * 1e3, times[-w:] * 1e3
    print(f"{args.movies} movies x {args.particles} particles of {box}x{box} px "
          f"({args.movies * args.particles:,} particles, {n_stacks} stacks) in {total:.1f} s")
    print(f"commit ms/movie, first {w}: median {np.median(first):.2f}  p95 {np.percentile(first, 95):.2f}  "
          f"mean {first.mean():.2f}")
    print(f"commit ms/movie, last  {w}: median {np.median(last):.2f}  p95 {np.percentile(last, 95):.2f}  "
          f"mean {last.mean():.2f}")
    print(f"slowest commit {times.max() * 1e3:.1f} ms; close (final forced snapshot) {t_close * 1e3:.1f} ms")
    print("final sizes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))
    print(f"RSS start {rss0:.0f} MiB, end {rss_mib():.0f} MiB, "
          f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
