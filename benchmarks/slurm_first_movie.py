"""Slurm benchmark: from `sbatch` to a Slurm worker's first committed movie, on a real single-node
Slurm started for the purpose (the test cluster of tests/slurm_cluster.py; needs root and the
slurmctld, slurmd, slurm-client and munge packages).

Per round, a real `lmc run --workers 0 --slurm-workers N` on small simulated movies (all present at
the start); for each job, from the session's own log and the job's log (one clock):

* submitted -> running: Slurm's scheduling latency (the session's first squeue poll that sees it
  RUNNING, so up to ``slurm.POLL_S`` late; the worker's join is exact),
* submitted -> joined: the worker process started, imported lmc and completed the CURVE handshake,
* submitted -> first movie: the worker's first movie finished (decode + full-frame motion +
  extraction of a tiny movie: mostly start-up).

Also: the seconds to start the cluster (munged, slurmctld, slurmd until the node is idle).

Usage: ``python benchmarks/slurm_first_movie.py [--rounds 5] [--jobs 2] [--movies 6]``
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from slurm_cluster import SlurmCluster, unavailable  # noqa: E402

from streamer.live.keys import create_keys  # noqa: E402
from streamer.sim.simulate import SimParams, simulate_session  # noqa: E402


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _times(out: Path) -> list[dict[str, float]]:
    """Per job: seconds from submission to running, joined and first movie."""
    lines = (out / "logs" / "lmc.log").read_text().splitlines()
    rows = []
    for line in lines:
        if "slurm: submitted worker job" not in line:
            continue
        job = line.split("worker job ")[1].split()[0]
        t0 = _stamp(line)
        row = {"job": float(job)}
        for key, needle in (("running", f"slurm job {job} running"), ("joined", f"worker slurm-{job} joined")):
            hit = next((ln for ln in lines if needle in ln), None)
            if hit:
                row[key] = _stamp(hit) - t0
        job_log = out / "logs" / f"slurm-{job}.log"
        if job_log.exists():
            first = next((ln for ln in job_log.read_text().splitlines() if " particles in " in ln), None)
            if first:
                row["first_movie"] = _stamp(first) - t0
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--movies", type=int, default=6)
    ns = ap.parse_args()
    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}")
        return 1
    work = Path(tempfile.mkdtemp(prefix="lmc-slurm-bench-"))
    src = work / "src"
    simulate_session(src, SimParams(movies=ns.movies, frames=10, shape=(256, 256), particles=5, seed=11))
    create_keys(work / "keys")
    try:
        return _rounds(ns, work, src)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rounds(ns: argparse.Namespace, work: Path, src: Path) -> int:
    starts = []
    rows: list[dict[str, float]] = []
    for r in range(ns.rounds):
        cluster = SlurmCluster().start()
        starts.append(cluster.start_seconds)
        try:
            out = work / f"out{r}"
            cmd = [sys.executable, "-m", "streamer.cli", "run", "--movies", str(src / "movies"), "--picks",
                   str(src / "picks"), "--gain", str(src / "gain.mrc"), "--out", str(out), "--box", "64",
                   "--apix", "1.0", "--dose-per-frame", "1.0", "--no-plots", "--device", "cpu", "--no-local-enabled", "--settle-seconds", "0",
                   "--workers", "0", "--slurm-workers", str(ns.jobs), "--keys", str(work / "keys")]
            t = time.monotonic()
            res = subprocess.run(cmd, cwd=work, env=cluster.env, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                print(res.stderr[-2000:])
                return 1
            rows += _times(out)
            print(f"round {r + 1}: cluster up in {cluster.start_seconds:.2f} s, session {time.monotonic() - t:.1f} s")
        finally:
            cluster.stop()

    def med(key: str) -> str:
        vals = [row[key] for row in rows if key in row]
        return f"{statistics.median(vals):.2f} s (min {min(vals):.2f}, max {max(vals):.2f}, n={len(vals)})" if vals else "-"

    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"cluster start (munged + slurmctld + slurmd, node idle): median {statistics.median(starts):.2f} s "
          f"(min {min(starts):.2f}, max {max(starts):.2f})")
    print(f"submitted -> running (squeue poll):  {med('running')}")
    print(f"submitted -> worker joined:          {med('joined')}")
    print(f"submitted -> first movie done:       {med('first_movie')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
