"""Live-processing benchmark: latency from a movie becoming ready to its particles being committed,
and throughput, with 1 and 2 CPU workers (real `lmc watch` sessions on simulated movies).

Two measurements per worker count:

* latency (live): movies arrive one every ``--interval`` s (slower than they are processed, as at a
  microscope), each written in chunks; reported: median and p95 of ready -> committed (s).
* throughput (backlog): all movies present at the start (``lmc run``); reported: steady-state
  movies/s = (n - 1) / (last commit - first commit), which leaves out worker start-up.

Usage: ``python benchmarks/live_latency.py [--movies 12] [--workers 1 2] [--shape 256] [--frames 10]``
Prints a table and, with ``--json FILE``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from streamer import config as config_mod
from streamer.live.session import run_session
from streamer.output.ledger import Ledger
from streamer.sim.simulate import SimParams, simulate_session

LOCAL = {"enabled": True}
SESSION: dict[str, Any] = {}  # extra top-level settings from the command line (threads)


def _cfg(root: Path, src: Path, out: Path, workers: int, box: int) -> config_mod.Config:
    return config_mod.from_dict({
        "local": dict(LOCAL),
        "movies": str(root / "movies"), "picks": {"dir": str(root / "picks")}, "out": str(out),
        "gain": {"file": str(src / "gain.mrc")}, "apix": 1.0, "dose_per_frame": 1.0, "box": box, "plots": False, "device": "cpu",
        "workers": workers, "settle_seconds": 0.3, "poll": 0.5, **SESSION,
    })


def _copy_session(src: Path, dst: Path, names: list[str], picks: dict[str, Path]) -> None:
    (dst / "movies").mkdir(parents=True)
    (dst / "picks").mkdir(parents=True)
    for n in names:
        shutil.copyfile(src / "movies" / n, dst / "movies" / n)
        shutil.copyfile(picks[n], dst / "picks" / picks[n].name)


def throughput(src: Path, work: Path, names: list[str], picks: dict[str, Path], workers: int, box: int) -> dict[str, Any]:
    root = work / f"backlog-{workers}"
    _copy_session(src, root, names, picks)
    t0 = time.monotonic()
    summary = run_session(_cfg(root, src, root / "out", workers, box), once=True, headless=False)
    wall = time.monotonic() - t0
    led = Ledger(root / "out" / "ledger.sqlite", readonly=True)
    times = sorted(r.committed_at for r in led.rows(status="done", with_payload=False))
    led.close()
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"movies": len(times), "wall_s": round(wall, 2), "movies_per_s": steady and round(steady, 3),
            "particles": summary["particles"]}


def latency(src: Path, work: Path, names: list[str], picks: dict[str, Path], workers: int, box: int,
            interval: float) -> dict[str, Any]:
    root = work / f"live-{workers}"
    (root / "movies").mkdir(parents=True)
    (root / "picks").mkdir(parents=True)
    controls = SimpleNamespace(paused=False, quit_requested=False)
    last: dict[str, Any] = {}

    def on_state(snap: dict[str, Any]) -> None:
        last.update(snap)
        if snap["counts"].get("done", 0) + snap["counts"].get("failed", 0) >= len(names):
            controls.quit_requested = True

    def microscope() -> None:
        time.sleep(3.0)  # let the workers start: the first movie should not measure start-up
        for n in names:
            shutil.copyfile(picks[n], root / "picks" / picks[n].name)
            raw = (src / "movies" / n).read_bytes()
            step = -(-len(raw) // 4)
            with open(root / "movies" / n, "wb") as f:
                for i in range(0, len(raw), step):
                    f.write(raw[i : i + step])
                    f.flush()
                    time.sleep(0.05)
            time.sleep(interval)

    threading.Thread(target=microscope, daemon=True).start()
    summary = run_session(_cfg(root, src, root / "out", workers, box), once=False, headless=False,
                          on_state=on_state, controls=controls)
    return {"movies": summary["this_session"]["done"], "latency_median_s": _r(summary["latency_median_s"]),
            "latency_p95_s": _r(summary["latency_p95_s"])}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--movies", type=int, default=12)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shape", type=int, default=256)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--particles", type=int, default=5)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--interval", type=float, default=1.5, help="seconds between movies in the latency run")
    p.add_argument("--no-local", action="store_true", help="full-frame motion only (local.enabled = false)")
    p.add_argument("--throughput-only", action="store_true", help="skip the live latency runs")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per worker (0 = the session's default: cores / workers)")
    p.add_argument("--json", default=None, help="write the results here")
    ns = p.parse_args(argv)
    LOCAL["enabled"] = not ns.no_local
    if ns.threads:
        SESSION["threads"] = ns.threads
    work = Path(tempfile.mkdtemp(prefix="lmc-bench-"))
    try:
        src = work / "src"
        params = SimParams(movies=ns.movies, frames=ns.frames, shape=(ns.shape, ns.shape), particles=ns.particles, seed=7)
        simulate_session(src, params)
        info = json.loads((src / "session.json").read_text())
        names = [Path(m["movie"]).name for m in info["movies"]]
        picks = {Path(m["movie"]).name: src / m["picks"] for m in info["movies"]}
        results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "params": vars(ns), "runs": {}}
        for w in ns.workers:
            results["runs"][w] = {"throughput": throughput(src, work, names, picks, w, ns.box),
                                  "latency": {"latency_median_s": None, "latency_p95_s": None} if ns.throughput_only
                                  else latency(src, work, names, picks, w, ns.box, ns.interval)}
        print(f"{ns.movies} movies {ns.shape}x{ns.shape}x{ns.frames}, {ns.particles} particles, box {ns.box}, "
              f"local motion {'on' if LOCAL['enabled'] else 'off'}")
        print(f"{'workers':>8} {'movies/s':>9} {'backlog wall s':>15} {'latency median s':>17} {'p95 s':>7}")
        for w, r in results["runs"].items():
            print(f"{w:>8} {r['throughput']['movies_per_s']!s:>9} {r['throughput']['wall_s']:>15} "
                  f"{r['latency']['latency_median_s']!s:>17} {r['latency']['latency_p95_s']!s:>7}")
        if ns.json:
            Path(ns.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
