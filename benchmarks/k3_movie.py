"""End-to-end seconds per movie, split by stage, and peak memory, on a K3-sized movie.

    python benchmarks/k3_movie.py [--format tiff|mrc|eer] [--frames 40] [--particles 300]
                                  [--box 256] [--fcrop-box 128] [--device cpu|gpu] [--no-local]
                                  [--repeat N | --worker N] [--shape H W]

Writes a synthetic movie (Poisson counts at 1 e/Å²/frame, 0.83 Å/px, K3 5760x4092; EER:
Falcon 4096², 5 raw pages per frame), a gain reference and a STAR of random picks into
``--workdir`` (reused between runs), then measures in separate processes:

* the I/O floor: read + decode only (``streamer.formats.movies.read_movie``), and its peak RSS;
* the whole job: ``streamer.pipeline.process_movie`` (decode, gain, motion, picks, local,
  extraction, quality, plot/trajectories) + ``Committer.commit`` (stacks, ledger, STAR/.cs);
  its per-stage seconds and peak RSS.

The ratio end-to-end / I/O floor is the machine-independent figure (issue: within 5x on CPU).

``--worker N`` replaces the whole-job process by a worker's steady state: N hard links of the
movie (each with its own pick file) go through the real ``streamer.live.handler.PipelineHandler`` in
one process exactly as ``Worker._compute`` drives it (prefetch of movie i+1 issued, then movie i
processed and its result message encoded), so decoding the next movie overlaps the current one.
Reported: seconds per movie between completions after the first, up to the second-to-last (the
last movie has no next movie decoding beside it; steady state), its ratio to the
I/O floor of the same run (decode child with 4 reads, the best of reads 2-4), the median interval, per-stage means
and peak RSS. ``--shape H W`` overrides the frame size (tests use a tiny one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

K3 = (4092, 5760)
FALCON = (4096, 4096)
APIX = 0.83
REPEAT = {"n": 1}  # --repeat: movies per measuring process (the last one is reported)


def make_data(
    work: Path, fmt: str, frames: int, particles: int, seed: int = 0, shape: tuple[int, int] | None = None
) -> tuple[Path, Path, Path]:
    """Movie, gain and picks (cached by parameters). ``shape`` (h, w): default K3, or Falcon for EER."""
    import mrcfile
    import tifffile

    from streamer.formats.picks import write_star_coords

    default = FALCON if fmt == "eer" else K3
    shape = tuple(shape) if shape else default
    size = "" if shape == default else f"_{shape[0]}x{shape[1]}"
    tag = f"{fmt}_{frames}f{size}"
    movie = work / {"tiff": f"k3_{tag}.tiff", "mrc": f"k3_{tag}.mrc", "eer": f"falcon_{tag}.eer"}[fmt]
    gain = work / (f"falcon{size}.gain" if fmt == "eer" else f"k3_gain{size}.mrc")
    picks = work / f"picks_{fmt}_{particles}{size}" / (movie.name.split(".")[0] + ".star")
    rng = np.random.default_rng(seed)
    lam = APIX * APIX * 1.0  # e/px/frame at 1 e/Å²/frame
    if not movie.exists():
        tmp = movie.with_name(movie.name + ".part")
        if fmt == "tiff":
            with tifffile.TiffWriter(tmp) as tw:
                for _ in range(frames):
                    tw.write(rng.poisson(lam, size=shape).astype(np.uint8), compression="lzw", contiguous=False)
        elif fmt == "mrc":
            with mrcfile.new(tmp, overwrite=True) as m:
                m.set_data(rng.poisson(lam, size=(frames, *shape)).astype(np.int8))
                m.voxel_size = APIX
        else:
            from streamer.formats.eer import counts_to_events, write_eer

            raw = 5
            events = []
            for _ in range(frames * raw):
                c = (rng.random(shape) < (lam / raw)).astype(np.uint8)  # at most one electron per pixel per raw frame
                events.append(counts_to_events(c, rng))
            write_eer(tmp, events, shape)
        tmp.rename(movie)
    if not gain.exists():
        g = (1.0 + 0.03 * rng.standard_normal(shape)).astype(np.float32)
        if fmt == "eer":
            tifffile.imwrite(gain.with_suffix(".tmp.tif"), g)
            gain.with_suffix(".tmp.tif").rename(gain)
        else:
            with mrcfile.new(gain, overwrite=True) as m:
                m.set_data(g)
    if not picks.exists():
        picks.parent.mkdir(parents=True, exist_ok=True)
        h, w = shape
        margin = min(200, min(h, w) // 4)  # 200 px on the K3 and Falcon frames, as the cached picks
        x = rng.uniform(margin, w - margin, particles)
        y = rng.uniform(margin, h - margin, particles)
        write_star_coords(picks, x, y)
    return movie, gain, picks


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a child started
    by a parent that just generated the data would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stage_decode(movie: Path, cfg_json: str) -> dict:
    from streamer import config as c
    from streamer.formats.movies import read_movie

    cfg = c.from_dict(json.loads(cfg_json))
    times = []
    for _ in range(REPEAT["n"]):
        mov = None  # as a worker between movies: the previous movie is freed before the next is read
        t = time.perf_counter()
        mov = read_movie(str(movie), cfg.eer, threads=0)  # the floor: read + decode on all cores
        times.append(time.perf_counter() - t)
    # the floor is the best warm read (reads 2..N; a shared VM's speed drifts by tens of percent)
    return {"decode_s": min(times[1:] or times), "decode_first_s": times[0], "peak_rss_mb": _peak_rss_mb(),
            "frames_shape": list(mov.frames.shape)}


def stage_pipeline(movie: Path, cfg_json: str) -> dict:
    from streamer import config as c
    from streamer.output.committer import Committer
    from streamer.pipeline import Workspace, process_movie

    cfg = c.from_dict(json.loads(cfg_json))
    workspace = Workspace()  # the buffers a worker keeps between movies
    totals = []
    for i in range(REPEAT["n"]):  # the same movie again, as a worker processes one movie after another
        result = None
        t0 = time.perf_counter()
        result = process_movie(cfg, str(movie), workspace=workspace)
        t1 = time.perf_counter()
        with Committer(Path(cfg.out) / f"run{i}", cfg, snapshot_interval=0) as com:
            com.commit(result)
        t2 = time.perf_counter()
        totals.append(t2 - t0)
    stages = {k.removeprefix("seconds_"): v for k, v in result.stats.items() if k.startswith("seconds_")}
    stages["write"] = round(t2 - t1, 4)
    return {
        "total_s": t2 - t0,
        "total_first_s": totals[0],
        "sys_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime,
        "stages": stages,
        "particles": result.n,
        "peak_rss_mb": _peak_rss_mb(),
    }


def link_movies(movie: Path, picks: Path, folder: Path, n: int) -> Path:
    """``n`` hard links (copies where links fail) of ``movie`` in ``folder/movies``, each with a copy
    of ``picks`` under its own stem in ``folder/picks``; returns ``folder``. Existing names are kept."""
    (folder / "movies").mkdir(parents=True, exist_ok=True)
    (folder / "picks").mkdir(parents=True, exist_ok=True)
    stem, ext = movie.name.split(".", 1)
    for i in range(n):
        name = f"{stem}_w{i:03d}"
        dst = folder / "movies" / f"{name}.{ext}"
        if not dst.exists():
            try:
                os.link(movie, dst)
            except OSError:  # another filesystem: a copy reads the same from the page cache
                shutil.copyfile(movie, dst)
        shutil.copyfile(picks, folder / "picks" / f"{name}.star")
    return folder


def stage_worker(folder: Path, cfg_json: str) -> dict:
    """The movies of ``folder/movies`` through one PipelineHandler, driven as ``Worker._compute`` does."""
    from streamer import config as c
    from streamer.formats.movies import is_movie
    from streamer.live import protocol
    from streamer.live.handler import PipelineHandler

    cfg = c.from_dict(json.loads(cfg_json))
    movies = sorted(str(p) for p in (folder / "movies").iterdir() if is_movie(p))
    remote = cfg.to_dict()  # what the dispatcher sends; the handler applies the local compute fields
    jobs = [{"job_id": f"j{i}", "movie": m, "picks": None, "config": remote, "float16": cfg.float16}
            for i, m in enumerate(movies)]
    handler = PipelineHandler(c.Config().with_(device=cfg.device, threads=cfg.threads))
    done: list[float] = []
    per_movie: list[dict[str, float]] = []
    names: list[str] = []
    cpu: list[float] = []
    t_start = time.perf_counter()
    for i, job in enumerate(jobs):
        if i + 1 < len(jobs):  # the worker asks for the next queued job's decode before running this one
            handler.prefetch(jobs[i + 1])
        t0 = time.perf_counter()
        result = handler(job)
        t1 = time.perf_counter()
        msg = protocol.encode_result(job["job_id"], result, float16=bool(job["float16"]))
        done.append(time.perf_counter())
        cpu.append(_cpu_s())
        stages = {k.removeprefix("seconds_"): v for k, v in result.stats.items() if k.startswith("seconds_")}
        # handler time not inside process_movie's stages = waiting for the prefetched decode
        stages["wait_prefetch"] = max(0.0, (t1 - t0) - sum(stages.values()))
        stages["encode"] = done[-1] - t1
        per_movie.append(stages)
        n_particles = result.n
        names.append(Path(result.movie).name)  # each job answered for its own movie (workers write no files)
        del msg, result  # as the worker: nothing of this movie is held while the next one runs
    last = len(done) - 2 if len(done) >= 3 else len(done) - 1  # index of the last steady-state completion
    steady = per_movie[1 : last + 1] or per_movie
    keys = list(dict.fromkeys(k for st in steady for k in st))
    mean = {k: sum(st.get(k, 0.0) for st in steady) / len(steady) for k in keys}
    return {
        "movies": len(jobs),
        "prefetched": handler.prefetch_hits,
        "first_s": done[0] - t_start,
        # the last movie has no next one decoding beside it: a steady-state interval needs one, so
        # intervals run from the first completion to the second-to-last (N >= 3)
        "steady_s": (done[last] - done[0]) / last if last > 0 else done[0] - t_start,
        "steady_median_s": float(np.median(np.diff(done[: last + 1]))) if last > 0 else done[0] - t_start,
        "completions_s": [round(t - t_start, 3) for t in done],
        # CPU seconds of the process per movie (all threads): less sensitive than wall to other jobs
        "steady_cpu_s": (cpu[last] - cpu[0]) / last if last > 0 else cpu[0],
        "stages": mean,
        "particles": int(n_particles),
        "results": names,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _child(stage: str, movie: Path, cfg: dict, repeat: int | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_stage", stage, "--_movie", str(movie), "--_cfg", json.dumps(cfg),
         "--repeat", str(repeat or REPEAT["n"])],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="tiff", choices=["tiff", "mrc", "eer"])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--fcrop-box", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--no-local", action="store_true", help="full-frame-only extraction")
    ap.add_argument("--workdir", default="/tmp/lmc-bench")
    ap.add_argument("--repeat", type=int, default=1,
                    help="process the movie this many times per measuring process and report the last "
                         "(a worker's steady state: buffers and gain cached, pages already mapped)")
    ap.add_argument("--worker", type=int, default=0, metavar="N",
                    help="a worker's steady state instead: N movies (hard links) through the real "
                         "PipelineHandler with the next movie decoded ahead (N >= 2)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads of the measured pipeline/worker (0 = all cores); e.g. 1 for each of "
                         "two workers run side by side with different --tag")
    ap.add_argument("--tag", default="", help="suffix for this run's worker and output folders (runs side by side)")
    ap.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="frame size instead of K3 (Falcon 4096x4096 for EER); for quick checks")
    ap.add_argument("--_stage")
    ap.add_argument("--_movie")
    ap.add_argument("--_cfg")
    ns = ap.parse_args()
    REPEAT["n"] = max(1, ns.repeat)
    if ns._stage:
        fn = {"decode": stage_decode, "pipeline": stage_pipeline, "worker": stage_worker}[ns._stage]
        print(json.dumps(fn(Path(ns._movie), ns._cfg)))
        return
    if ns.worker == 1 or ns.worker < 0:
        ap.error("--worker N needs N >= 2 (the first movie is not part of the steady state)")

    work = Path(ns.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    movie, gain, picks = make_data(work, ns.format, ns.frames, ns.particles, shape=ns.shape)
    print(f"data ready in {time.perf_counter() - t:.1f} s: {movie} ({movie.stat().st_size / 2**20:.0f} MiB)")
    out = work / f"out_{ns.format}{'_worker' if ns.worker else ''}{ns.tag}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "out": str(out),
        "apix": APIX,
        "dose_per_frame": 1.0,
        "box": ns.box,
        "fcrop_box": ns.fcrop_box,
        "device": ns.device,
        "gain": {"file": str(gain)},
        "picks": {"dir": str(picks.parent)},
        "local": {"enabled": not ns.no_local},
        "eer": {"fractions": ns.frames},
        "threads": ns.threads,
    }
    if ns.worker:
        run_worker(ns, movie, picks, cfg, work)
        return
    dec = _child("decode", movie, cfg)
    run = _child("pipeline", movie, cfg)
    f, h, w = dec["frames_shape"]
    movie_f32_mb = f * h * w * 4 / 2**20
    print(f"\n{ns.format} movie {w}x{h}x{f}, {run['particles']} particles, box {ns.box} -> {ns.fcrop_box}, "
          f"device {ns.device}, local {'off' if ns.no_local else 'on'}")
    print(f"I/O floor (read + decode{', best warm read' if ns.repeat > 1 else ''}): {dec['decode_s']:.2f} s, "
          f"peak RSS {dec['peak_rss_mb']:.0f} MiB")
    print(f"end to end:                {run['total_s']:.2f} s  ({run['total_s'] / dec['decode_s']:.1f}x the I/O floor)")
    if ns.repeat > 1:
        print(f"first movie of the process: decode {dec['decode_first_s']:.2f} s, end to end {run['total_first_s']:.2f} s "
              f"({run['total_first_s'] / dec['decode_first_s']:.1f}x); reported: movie {ns.repeat}")
    print(f"kernel (system) time of the pipeline process: {run['sys_s']:.1f} s (page faults of fresh memory)")
    for k, v in run["stages"].items():
        print(f"  {k:<10} {v:7.2f} s")
    print(f"peak RSS {run['peak_rss_mb']:.0f} MiB = {run['peak_rss_mb'] / movie_f32_mb:.2f}x the float32 movie "
          f"({movie_f32_mb:.0f} MiB)")
    print(json.dumps({"format": ns.format, "decode": dec, "pipeline": run}))


def run_worker(ns: argparse.Namespace, movie: Path, picks: Path, cfg: dict, work: Path) -> None:
    """``--worker N``: the I/O floor (steady-state read) and N movies through one PipelineHandler."""
    folder = link_movies(movie, picks, work / f"worker_{movie.name.split('.')[0]}{ns.tag}", ns.worker)
    for extra in sorted((folder / "movies").iterdir())[ns.worker :]:  # left by an earlier, larger N
        extra.unlink()
    cfg = {**cfg, "picks": {"dir": str(folder / "picks")}}
    dec = _child("decode", movie, cfg, repeat=max(4, ns.repeat))
    run = _child("worker", folder, cfg)
    f, h, w = dec["frames_shape"]
    movie_f32_mb = f * h * w * 4 / 2**20
    floor = dec["decode_s"]
    print(f"\n{ns.format} movie {w}x{h}x{f}, {run['particles']} particles, box {ns.box} -> {ns.fcrop_box}, "
          f"device {ns.device}, local {'off' if ns.no_local else 'on'}; worker mode: {run['movies']} movies, "
          f"{run['prefetched']} decoded ahead")
    print(f"I/O floor (read + decode, best of reads 2..{max(4, ns.repeat)} of a process): {floor:.2f} s")
    print(f"worker steady state: {run['steady_s']:.2f} s per movie  ({run['steady_s'] / floor:.1f}x the I/O floor), "
          f"{3600 / run['steady_s']:.0f} movies/hour; median interval {run['steady_median_s']:.2f} s "
          f"({run['steady_median_s'] / floor:.1f}x)")
    print(f"CPU time of the worker process: {run['steady_cpu_s']:.2f} s per movie (all threads; "
          f"{run['steady_cpu_s'] / run['steady_s']:.2f} cores busy on average)")
    print(f"first movie (fresh process, decoded in line): {run['first_s']:.2f} s; "
          f"completions at {', '.join(f'{t:.1f}' for t in run['completions_s'])} s")
    print("mean per stage over movies 2..N-1 (decode ~0 when the prefetch finished in time):")
    for k, v in run["stages"].items():
        print(f"  {k:<14} {v:7.2f} s")
    print(f"peak RSS {run['peak_rss_mb']:.0f} MiB = {run['peak_rss_mb'] / movie_f32_mb:.2f}x the float32 movie "
          f"({movie_f32_mb:.0f} MiB)")
    print(json.dumps({"format": ns.format, "decode": dec, "worker": run}))


if __name__ == "__main__":
    main()
