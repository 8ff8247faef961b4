"""Memory of the session (streamer) process over a long session: it must not grow with the movies.

    python benchmarks/session_memory.py [--movies 1000] [--shape 256] [--frames 8] [--particles 3]
                                        [--workers 1] [--json FILE]

Simulates ONE small movie (``streamer.simulate``) and hard-links it under ``--movies`` names, each
with its own copy of the pick file, then runs a real ``lmc run`` session on them
(``streamer.session.run_session(cfg, once=True)``, local motion off, no plots) in this process.
A thread samples this process's resident set (``VmRSS`` of ``/proc/self/status``) every
``--every`` s together with the number of movies committed so far (from the session's state
callback), and the workers' RSS (``/proc/<pid>/status`` of this process's children).

Printed: RSS at 10%, 50% and 100% of the movies, and the least-squares slope of RSS against the
movies done over the second half (KiB per movie; the first half contains start-up: imports,
worker spawn, first allocations). A flat line (slope ~0) is the target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamer import config as config_mod
from streamer.session import run_session
from streamer.simulate import SimParams, simulate_session


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of ``pid`` in KiB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_rss_kib() -> int:
    """Summed RSS of this process's direct children (the local workers)."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(rss_kib(k) for k in kids)
    return total


def make_session(work: Path, n: int, shape: int, frames: int, particles: int) -> tuple[Path, Path]:
    """``work/movies`` with ``n`` hard links of one simulated movie, ``work/picks`` with a pick file each."""
    src = work / "src"
    simulate_session(src, SimParams(movies=1, frames=frames, shape=(shape, shape), particles=particles,
                                    seed=3, junk_picks=0, edge_particles=0))
    info = json.loads((src / "session.json").read_text())
    movie = src / info["movies"][0]["movie"]
    pick = src / info["movies"][0]["picks"]
    (work / "movies").mkdir()
    (work / "picks").mkdir()
    suffix = "".join(movie.suffixes)
    for i in range(n):
        stem = f"mov_{i:05d}"
        os.link(movie, work / "movies" / f"{stem}{suffix}")
        shutil.copyfile(pick, work / "picks" / f"{stem}{pick.suffix}")
    return src, movie


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--movies", type=int, default=1000)
    p.add_argument("--shape", type=int, default=256)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--particles", type=int, default=3)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--every", type=float, default=0.25, help="seconds between RSS samples")
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lmc-sessmem-"))
    try:
        t = time.perf_counter()
        src, _ = make_session(work, ns.movies, ns.shape, ns.frames, ns.particles)
        print(f"{ns.movies} movies ready in {time.perf_counter() - t:.1f} s")
        cfg = config_mod.from_dict({
            "local": {"enabled": False}, "movies": str(work / "movies"), "picks": {"dir": str(work / "picks")},
            "out": str(work / "out"), "gain": {"file": str(src / "gain.mrc")}, "apix": 1.0, "box": ns.box,
            "plots": False, "device": "cpu", "workers": ns.workers, "settle_seconds": 0.0, "poll": 1.0,
        })
        done = {"n": 0}
        samples: list[tuple[float, int, int, int]] = []  # (t, movies done, session KiB, workers KiB)
        stop = threading.Event()

        def on_state(snap: dict[str, Any]) -> None:
            done["n"] = int(snap["this_session"]["done"]) + int(snap["this_session"].get("failed", 0))

        def sampler() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0, done["n"], rss_kib(), children_rss_kib()))
                stop.wait(ns.every)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        t = time.perf_counter()
        summary = run_session(cfg, once=True, headless=False, on_state=on_state)
        wall = time.perf_counter() - t
        stop.set()
        th.join()
        final = int(summary["this_session"]["done"])
        samples.append((wall, final, rss_kib(), 0))
        arr = np.array(samples, dtype=np.float64)

        def rss_at(frac: float) -> float:
            """Session RSS (MiB) at the first sample where ``frac`` of the movies were done."""
            i = int(np.argmax(arr[:, 1] >= frac * ns.movies)) if (arr[:, 1] >= frac * ns.movies).any() else -1
            return float(arr[i, 2]) / 1024.0

        half = arr[arr[:, 1] >= ns.movies / 2]
        slope = float(np.polyfit(half[:, 1], half[:, 2], 1)[0]) if len(np.unique(half[:, 1])) > 1 else float("nan")
        res = {
            "machine": platform.processor() or platform.machine(),
            "params": vars(ns),
            "movies_done": final,
            "failed": int(summary["this_session"].get("failed", 0)),
            "wall_s": round(wall, 1),
            "movies_per_s": round(final / wall, 2),
            "session_rss_mib": {f"{int(f * 100)}%": round(rss_at(f), 1) for f in (0.1, 0.5, 1.0)},
            "session_rss_max_mib": round(float(arr[:, 2].max()) / 1024.0, 1),
            "slope_kib_per_movie_second_half": round(slope, 3),
            "workers_rss_max_mib": round(float(arr[:, 3].max()) / 1024.0, 1),
        }
        print(f"{final} movies {ns.shape}x{ns.shape}x{ns.frames}, {ns.particles} particles, {ns.workers} worker(s), "
              f"{wall:.0f} s ({final / wall:.1f} movies/s)")
        print("session RSS (MiB) at " + ", ".join(f"{k}: {v}" for k, v in res["session_rss_mib"].items())
              + f"; slope over the second half {slope:+.2f} KiB/movie; workers' RSS max {res['workers_rss_max_mib']} MiB")
        print(json.dumps(res))
        if ns.json:
            Path(ns.json).write_text(json.dumps({**res, "samples": samples}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
