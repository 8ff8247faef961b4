"""Soak: a live session arriving over time, SIGKILLed again and again, restarted each time, then audited.

    python benchmarks/soak.py [--movies 12] [--kills 22] [--seed 0] [--work DIR] [--json OUT.json]

A microscope emulator (streamer/sim/emulator.py) writes ``--movies`` small simulated movies into a
folder over time (one every ``--interval`` s) (each one growing chunk by chunk, its pick file a little later; the picks include
junk and edge picks, so skips happen). Meanwhile ``lmc watch`` runs on it and is killed ``--kills``
times with SIGKILL — the session and its workers, the whole process group, as a power cut or OOM
killer would — and restarted at once on the same ``--out``. Kill moments are of two kinds, drawn at
random: a timer — 0.2–2.5 s after a start (start-up, crash recovery) or 0.2–6 s after the first
worker joined (decode, processing, a commit or a snapshot, whatever is under way) — and a committer
crash point (``LMC_CRASH_AT``: between
a stack's data and its header, before/after the ledger transaction, while a snapshot is written;
the k-th time it is reached, k in 1..3). After the last kill the session runs to the end
(``lmc run``) and everything is audited:

- every pick of every movie is exactly one particle or one reported skip: per movie, the pick
  file's rows = particles in the ledger + skipped picks the ledger reports (worker statistics);
- ledger, stacks, ``particles.star`` and ``particles.cs`` agree: per-movie counts, every stack image
  referenced exactly once, no two particles with the same (movie, x, y), NZ of each stack = the
  ledger's committed count, ``mrcfile.validate`` passes on every stack;
- every particle is pixel-identical to a clean, never-killed run of the same movies;
- no temporary file is left anywhere in the output folder.

Prints a table of kill points and a JSON summary (lost = picks neither particle nor skip, or movies
never done; duplicated = particles or images present twice; mismatched = pixels differing from the
clean run). Records: BENCHMARKS.md "Soak".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import mrcfile
import numpy as np
import starfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamer.formats.picks import PickIndex, pick_summary
from streamer.output.ledger import Ledger
from streamer.sim.emulator import MicroscopeEmulator, Timing
from streamer.sim.simulate import SimParams

CRASH_WAIT_S = 10.0  # a crash point not reached by then (nothing left to commit): killed by timer instead
CRASH_POINTS = ("stack_data", "stack_header", "before_ledger", "after_ledger", "snapshot_star_tmp",
                "snapshot_star_replaced", "snapshot_cs_tmp", "snapshot_cs_replaced")


def lmc_args(cmd: str, scope: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "streamer.cli", cmd, "--movies", str(scope / "movies"), "--picks",
            str(scope / "picks"), "--gain", str(scope / "gain.mrc"), "--gain-mode", "multiply", "--out", str(out),
            "--apix", "1.0", "--dose-per-frame", "1.0", "--kv", "300", "--box", "64", "--device", "cpu",
            "--workers", "2", "--settle-seconds", "0.4", "--poll", "0.5", "--heartbeat", "0.3", "--liveness", "6",
            "--min-free-gb", "0"]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 10  # the workers (same group) are gone too before the restart
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def done_movies(out: Path) -> int:
    try:
        led = Ledger(out / "ledger.sqlite", readonly=True)
    except Exception:
        return 0
    try:
        return len(led.done_movies())
    except Exception:
        return 0
    finally:
        led.close()


def soak(scope: Path, out: Path, kills: int, rng: random.Random, emu: MicroscopeEmulator) -> list[dict]:
    log = out.parent / "soak_sessions.log"
    points: list[dict] = []
    for i in range(kills):
        env = dict(os.environ)
        crash = None
        if rng.random() < 0.4:
            crash = f"{rng.choice(CRASH_POINTS)}:{rng.randint(1, 3)}"
            env["LMC_CRASH_AT"] = crash
        t0 = time.monotonic()
        before = done_movies(out)
        mark = (out / "logs" / "lmc.log").stat().st_size if (out / "logs" / "lmc.log").exists() else 0
        proc = start([*lmc_args("watch", scope, out), "--headless"], log, env)
        if crash is not None:
            try:
                proc.wait(timeout=CRASH_WAIT_S)  # the crash point kills the session itself
            except subprocess.TimeoutExpired:
                pass
            kind = (f"crash point {crash}" if proc.returncode == -signal.SIGKILL
                    else f"timer {CRASH_WAIT_S:.0f} s ({crash} not reached)")
        elif rng.random() < 0.3:  # start-up: opening the folder, recovering from the last kill
            delay = rng.uniform(0.2, 2.5)
            time.sleep(delay)
            kind = f"timer {delay:.1f} s after start"
        else:  # while working: some time after the first worker joined
            joined = _wait_for_text(out / "logs" / "lmc.log", mark, "joined", proc, 60.0)
            delay = rng.uniform(0.2, 6.0)
            time.sleep(delay)
            kind = f"timer {delay:.1f} s after a worker joined" if joined else "timer (no worker joined in 60 s)"
        alive = proc.poll() is None
        kill_group(proc)
        phase = _phase(out, mark, pending=emu.counts()["movies"] > before)
        points.append({"kill": i + 1, "how": kind, "phase": phase, "session_alive": alive,
                       "s": round(time.monotonic() - t0, 1),
                       "done_before": before, "done_after": done_movies(out),
                       "emulator": emu.counts()})
        print(f"kill {i + 1:2d}: {kind:38s} {phase:38s} movies done {before:2d} -> {points[-1]['done_after']:2d}  "
              f"arrived {emu.counts()['movies']}", flush=True)
    return points


def _wait_for_text(log: Path, mark: int, text: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(log, "rb") as f:
                f.seek(mark)
                if text.encode() in f.read():
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _phase(out: Path, mark: int, pending: bool) -> str:
    """What this life of the session had reached when it was killed (from its log lines; ``pending``:
    movies had arrived that were not done when it started)."""
    try:
        with open(out / "logs" / "lmc.log", "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
    except OSError:
        return "start-up (before the log)"
    if "session starting" not in text:
        return "start-up / recovery"
    if "joined" not in text:
        return "workers starting"
    done = text.count("INFO lmc.session: done: ")
    return f"running, {done} committed in this life" if pending else "running, nothing left to do"


def audit(scope: Path, out: Path, clean: Path) -> dict:
    index = PickIndex(scope / "picks")
    led = Ledger(out / "ledger.sqlite", readonly=True)
    rows = {r.movie: r for r in led.rows(status=None, with_payload=False)}
    stacks = led.stacks()
    led.close()
    movies = sorted(str(p) for p in (scope / "movies").iterdir())
    lost_movies = [m for m in movies if m not in rows or rows[m].status != "done"]
    lost_picks = 0
    picks_total = 0
    for m in movies:
        n_rows, _ = pick_summary(index.lookup(m))
        picks_total += n_rows
        r = rows.get(m)
        if r is None or r.status != "done":
            lost_picks += n_rows
            continue
        skipped = int(r.stats.get("n_skipped", 0))
        lost_picks += abs(n_rows - (r.n_particles + skipped))
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    cs = np.load(out / "particles.cs")
    per_movie = Counter(star["rlnMicrographName"])
    agree = (dict(per_movie) == {m: r.n_particles for m, r in rows.items() if r.status == "done" and r.n_particles}
             and Counter(p.decode() for p in cs["location/micrograph_path"]) == per_movie and len(cs) == len(star))
    dup_particles = int(star.duplicated(["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"]).sum())
    refs = Counter(star["rlnImageName"])
    dup_images = sum(n - 1 for n in refs.values() if n > 1)
    by_stack: dict[str, list[int]] = {}
    for name in refs:
        idx, path = name.split("@")
        by_stack.setdefault(Path(path).name, []).append(int(idx))
    stacks_ok = True
    invalid = []
    for name, n in stacks.items():
        path = out / "stacks" / name
        if not mrcfile.validate(str(path), print_file=open(os.devnull, "w")):
            invalid.append(name)
        with mrcfile.mmap(path, permissive=True) as m:
            stacks_ok &= int(m.header.nz) == n == m.data.shape[0]
        stacks_ok &= sorted(by_stack.get(name, [])) == list(range(1, n + 1))  # every image referenced once
    # pixels against the clean run, particle by particle (movie, x, y)
    clean_star = starfile.read(clean / "particles.star", always_dict=True)["particles"]
    key = ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"]
    soaked_img = _images(out, star)
    clean_img = _images(clean, clean_star)
    soaked_map = {tuple(k): i for i, k in enumerate(star[key].itertuples(index=False))}
    clean_map = {tuple(k): i for i, k in enumerate(clean_star[key].itertuples(index=False))}
    same_set = set(soaked_map) == set(clean_map)
    mismatched = sum(not np.array_equal(soaked_img[soaked_map[k]], clean_img[clean_map[k]])
                     for k in set(soaked_map) & set(clean_map))
    temps = [str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".new"))]
    return {
        "movies": len(movies), "movies_done": len(movies) - len(lost_movies), "picks": picks_total,
        "particles": len(star), "lost_movies": len(lost_movies), "lost_picks": lost_picks,
        "duplicated_particles": dup_particles, "duplicated_images": dup_images,
        "star_cs_ledger_agree": bool(agree), "stacks_consistent": bool(stacks_ok), "mrc_invalid": invalid,
        "same_particles_as_clean_run": same_set, "pixel_mismatches": int(mismatched), "temp_files_left": temps,
    }


def _kind(point: dict) -> str:
    """A kill point's class for the summary: the crash point's name, or the phase a timer hit."""
    if point["how"].startswith("crash point"):
        return "crash point " + point["how"].split()[2].split(":")[0]
    phase = point["phase"]
    return "timer: " + ("running, movies in flight" if phase.startswith("running, ") and "nothing" not in phase
                        else phase)


def _images(out: Path, star) -> list[np.ndarray]:
    cache: dict[str, np.ndarray] = {}
    images = []
    for name in star["rlnImageName"]:
        idx, path = name.split("@")
        if path not in cache:
            with mrcfile.open(path if os.path.isabs(path) else out / path, permissive=True) as m:
                cache[path] = np.array(m.data)
        images.append(cache[path][int(idx) - 1])
    return images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movies", type=int, default=20)
    ap.add_argument("--kills", type=int, default=22)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interval", type=float, default=4.0, help="seconds between movies arriving")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder, removed)")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    ns = ap.parse_args(argv)
    work = ns.work or Path(tempfile.mkdtemp(prefix="lmc-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    scope, out, clean = work / "scope", work / "out", work / "clean"
    rng = random.Random(ns.seed)
    params = SimParams(movies=ns.movies, frames=10, shape=(256, 256), particles=6, junk_picks=1, edge_particles=1,
                       seed=ns.seed)
    emu = MicroscopeEmulator(scope, params, Timing(interval_s=ns.interval, chunk_frames=3, chunk_s=0.15,
                                                   picks_delay_s=0.5))
    t0 = time.monotonic()
    emu.start()
    try:
        points = soak(scope, out, ns.kills, rng, emu)
        emu.join()
        if emu.error is not None:
            raise emu.error
        final = subprocess.run(lmc_args("run", scope, out), capture_output=True, text=True, timeout=600)
        ref = subprocess.run(lmc_args("run", scope, clean), capture_output=True, text=True, timeout=600)
        if ref.returncode not in (0, 1) or final.returncode not in (0, 1):
            print(final.stderr[-3000:], ref.stderr[-3000:], file=sys.stderr)
            return 2
        summary = {"kills": len(points), "kill_points": dict(Counter(_kind(p) for p in points)),
                   "killed_while_running": sum(p["session_alive"] for p in points),
                   **audit(scope, out, clean), "wall_s": round(time.monotonic() - t0, 1),
                   "final_exit": final.returncode, "seed": ns.seed}
    finally:
        emu.stop()
        if ns.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2, default=str))
    if ns.json:
        ns.json.write_text(json.dumps({"summary": summary, "points": points}, indent=2, default=str) + "\n")
    ok = (summary["lost_movies"] == summary["lost_picks"] == summary["duplicated_particles"]
          == summary["duplicated_images"] == summary["pixel_mismatches"] == 0 and summary["star_cs_ledger_agree"]
          and summary["stacks_consistent"] and not summary["mrc_invalid"] and summary["same_particles_as_clean_run"]
          and not summary["temp_files_left"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
