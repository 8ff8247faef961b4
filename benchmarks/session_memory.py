"""Memory of the session (streamer) process over a long session: it must not grow with the movies.

    python benchmarks/session_memory.py [--movies 1000] [--shape 256] [--frames 8] [--particles 3]
                                        [--workers 1] [--json FILE] [--tracemalloc [N]]

Simulates ONE small movie (``streamer.sim.simulate``) and hard-links it under ``--movies`` names, each
with its own copy of the pick file, then runs a real ``lmc run`` session on them
(``streamer.live.session.run_session(cfg, once=True)``, local motion off, no plots) in this process.
A thread samples this process's resident set (``VmRSS`` of ``/proc/self/status``) every
``--every`` s together with the number of movies committed so far (from the session's state
callback), and the workers' RSS (``/proc/<pid>/status`` of this process's children).

Printed: RSS at 10%, 50% and 100% of the movies, and the least-squares slope of RSS against the
movies done over the second half (KiB per movie; the first half contains start-up: imports,
worker spawn, first allocations), and a verdict: flat when the slope is under ``FLAT_KIB_PER_MOVIE``.

``--tracemalloc N`` (diagnosis; slows the run): traces Python allocations and prints the ``N``
allocation sites (file:line) that grew most between 30% of the movies and the end of the loop
(the last snapshot taken while still running, >= 90%), plus sqlite's own heap
(``sqlite3_memory_used``) and glibc's in-use heap (``mallinfo2``) at both points.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import shutil
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from streamer import config as config_mod
from streamer.live.session import run_session
from streamer.sim.simulate import SimParams, simulate_session

FLAT_KIB_PER_MOVIE = 1.0  # below this the per-movie growth is allocator noise, not retained state


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


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def native_heaps_kib() -> dict[str, float]:
    """sqlite's heap (``sqlite3_memory_used`` of the shared libsqlite3; meaningful when Python's
    ``_sqlite3`` links that library) and glibc's in-use heap (``mallinfo2``: ``uordblks`` over all
    arenas + ``hblkhd`` mmapped blocks), in KiB; a key is absent where the call is unavailable."""
    out: dict[str, float] = {}
    name = ctypes.util.find_library("sqlite3")
    if name:
        lib = ctypes.CDLL(name)
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        out["sqlite"] = lib.sqlite3_memory_used() / 1024.0
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
        out["malloc_in_use"] = (info.uordblks + info.hblkhd) / 1024.0
    return out


def top_growth(first: tracemalloc.Snapshot, last: tracemalloc.Snapshot, n: int) -> list[str]:
    """The ``n`` file:line sites whose traced Python allocations grew most from ``first`` to ``last``."""
    keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    stats = last.filter_traces(keep).compare_to(first.filter_traces(keep), "lineno")
    stats.sort(key=lambda s: s.size_diff, reverse=True)
    return [f"{s.size_diff / 1024:+9.1f} KiB {s.count_diff:+7d} blocks  {s.traceback[0].filename}:"
            f"{s.traceback[0].lineno}" for s in stats[:n]]


def _traced(snap: tracemalloc.Snapshot) -> int:
    return sum(s.size for s in snap.statistics("filename"))


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
    p.add_argument("--tracemalloc", type=int, nargs="?", const=15, default=0, metavar="N",
                   help="print the N allocation sites that grew most between 30%% and the end (slow)")
    ns = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lmc-sessmem-"))
    try:
        t = time.perf_counter()
        src, _ = make_session(work, ns.movies, ns.shape, ns.frames, ns.particles)
        print(f"{ns.movies} movies ready in {time.perf_counter() - t:.1f} s")
        cfg = config_mod.from_dict({
            "local": {"enabled": False}, "movies": str(work / "movies"), "picks": {"dir": str(work / "picks")},
            "out": str(work / "out"), "gain": {"file": str(src / "gain.mrc")}, "apix": 1.0, "dose_per_frame": 1.0, "box": ns.box,
            "plots": False, "device": "cpu", "workers": ns.workers, "settle_seconds": 0.0, "poll": 1.0,
        })
        done = {"n": 0}
        samples: list[tuple[float, int, int, int]] = []  # (t, movies done, session KiB, workers KiB)
        stop = threading.Event()

        traced: dict[str, Any] = {}  # "first"/"last": (movies done, tracemalloc snapshot, native heaps)

        def on_state(snap: dict[str, Any]) -> None:
            done["n"] = int(snap["this_session"]["done"]) + int(snap["this_session"].get("failed", 0))
            if not ns.tracemalloc or snap.get("phase") != "running":
                return
            # the end point is taken while the loop still runs, so the session's objects are all alive
            if "first" not in traced and done["n"] >= 0.3 * ns.movies:
                traced["first"] = (done["n"], tracemalloc.take_snapshot(), native_heaps_kib())
            elif "first" in traced and done["n"] >= 0.9 * ns.movies:
                traced["last"] = (done["n"], tracemalloc.take_snapshot(), native_heaps_kib())

        def sampler() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0, done["n"], rss_kib(), children_rss_kib()))
                stop.wait(ns.every)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        if ns.tracemalloc:
            tracemalloc.start(1)
        t = time.perf_counter()
        summary = run_session(cfg, once=True, headless=False, on_state=on_state)
        wall = time.perf_counter() - t
        stop.set()
        th.join()
        if ns.tracemalloc:
            tracemalloc.stop()
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
        flat = abs(slope) < FLAT_KIB_PER_MOVIE
        caveats = []
        if summary.get("failures"):  # a broken worker makes every movie fail: the figures mean little
            caveats.append(f"{len(summary['failures'])} movies failed, e.g. {summary['failures'][0][1]}")
        if ns.tracemalloc:
            caveats.append("RSS includes tracemalloc's own tables: judge flatness from a run without --tracemalloc")
        print(f"verdict: {'FLAT' if flat else 'GROWING'} (|slope| {abs(slope):.2f} KiB/movie "
              f"{'<' if flat else '>='} {FLAT_KIB_PER_MOVIE} KiB/movie)" + "".join(f"; {c}" for c in caveats))
        res["flat"] = flat
        if "first" in traced and "last" in traced:
            (n0, snap0, heap0), (n1, snap1, heap1) = traced["first"], traced["last"]
            moved = max(n1 - n0, 1)
            print(f"tracemalloc: top {ns.tracemalloc} growing sites from {n0} to {n1} movies "
                  f"(traced total {(_traced(snap1) - _traced(snap0)) / moved:+.0f} B/movie)")
            for line in top_growth(snap0, snap1, ns.tracemalloc):
                print("  " + line)
            for k in heap1:
                print(f"  {k} heap: {heap0.get(k, 0) / 1024:.1f} -> {heap1[k] / 1024:.1f} MiB "
                      f"({(heap1[k] - heap0.get(k, 0)) * 1024 / moved:+.0f} B/movie)")
        print(json.dumps(res))
        if ns.json:
            Path(ns.json).write_text(json.dumps({**res, "samples": samples}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
