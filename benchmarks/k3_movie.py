"""End-to-end seconds per movie, split by stage, and peak memory, on a K3-sized movie.

    python benchmarks/k3_movie.py [--format tiff|mrc|eer] [--frames 40] [--particles 300]
                                  [--box 256] [--fcrop-box 128] [--device cpu|gpu] [--no-local]

Writes a synthetic movie (Poisson counts at 1 e/Å²/frame, 0.83 Å/px, K3 5760x4092; EER:
Falcon 4096², 5 raw pages per frame), a gain reference and a STAR of random picks into
``--workdir`` (reused between runs), then measures in separate processes:

* the I/O floor: read + decode only (``streamer.movies.read_movie``), and its peak RSS;
* the whole job: ``streamer.pipeline.process_movie`` (decode, gain, motion, picks, local,
  extraction, quality, plot/trajectories) + ``Committer.commit`` (stacks, ledger, STAR/.cs);
  its per-stage seconds and peak RSS.

The ratio end-to-end / I/O floor is the machine-independent figure (issue: within 5x on CPU).
"""

from __future__ import annotations

import argparse
import json
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


def make_data(work: Path, fmt: str, frames: int, particles: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """Movie, gain and picks (cached by parameters)."""
    import mrcfile
    import tifffile

    from streamer.picks import write_star_coords

    shape = FALCON if fmt == "eer" else K3
    tag = f"{fmt}_{frames}f"
    movie = work / {"tiff": f"k3_{tag}.tiff", "mrc": f"k3_{tag}.mrc", "eer": f"falcon_{tag}.eer"}[fmt]
    gain = work / ("falcon.gain" if fmt == "eer" else "k3_gain.mrc")
    picks = work / f"picks_{fmt}_{particles}" / (movie.name.split(".")[0] + ".star")
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
            from streamer.eer import counts_to_events, write_eer

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
        x = rng.uniform(200, w - 200, particles)
        y = rng.uniform(200, h - 200, particles)
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


def stage_decode(movie: Path, cfg_json: str) -> dict:
    from streamer import config as c
    from streamer.movies import read_movie

    cfg = c.from_dict(json.loads(cfg_json))
    times = []
    for _ in range(REPEAT["n"]):
        mov = None  # as a worker between movies: the previous movie is freed before the next is read
        t = time.perf_counter()
        mov = read_movie(str(movie), cfg.eer, threads=cfg.threads)
        times.append(time.perf_counter() - t)
    return {"decode_s": times[-1], "decode_first_s": times[0], "peak_rss_mb": _peak_rss_mb(),
            "frames_shape": list(mov.frames.shape)}


def stage_pipeline(movie: Path, cfg_json: str) -> dict:
    from streamer import config as c
    from streamer.committer import Committer
    from streamer.pipeline import process_movie

    cfg = c.from_dict(json.loads(cfg_json))
    totals = []
    for i in range(REPEAT["n"]):  # the same movie again, as a worker processes one movie after another
        result = None
        t0 = time.perf_counter()
        result = process_movie(cfg, str(movie))
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


def _child(stage: str, movie: Path, cfg: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_stage", stage, "--_movie", str(movie), "--_cfg", json.dumps(cfg),
         "--repeat", str(REPEAT["n"])],
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
    ap.add_argument("--_stage")
    ap.add_argument("--_movie")
    ap.add_argument("--_cfg")
    ns = ap.parse_args()
    REPEAT["n"] = max(1, ns.repeat)
    if ns._stage:
        fn = stage_decode if ns._stage == "decode" else stage_pipeline
        print(json.dumps(fn(Path(ns._movie), ns._cfg)))
        return

    work = Path(ns.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    movie, gain, picks = make_data(work, ns.format, ns.frames, ns.particles)
    print(f"data ready in {time.perf_counter() - t:.1f} s: {movie} ({movie.stat().st_size / 2**20:.0f} MiB)")
    out = work / f"out_{ns.format}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "out": str(out),
        "apix": APIX,
        "box": ns.box,
        "fcrop_box": ns.fcrop_box,
        "device": ns.device,
        "gain": {"file": str(gain)},
        "picks": {"dir": str(picks.parent)},
        "local": {"enabled": not ns.no_local},
        "eer": {"fractions": ns.frames},
    }
    dec = _child("decode", movie, cfg)
    run = _child("pipeline", movie, cfg)
    f, h, w = dec["frames_shape"]
    movie_f32_mb = f * h * w * 4 / 2**20
    print(f"\n{ns.format} movie {w}x{h}x{f}, {run['particles']} particles, box {ns.box} -> {ns.fcrop_box}, "
          f"device {ns.device}, local {'off' if ns.no_local else 'on'}")
    print(f"I/O floor (read + decode): {dec['decode_s']:.2f} s, peak RSS {dec['peak_rss_mb']:.0f} MiB")
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


if __name__ == "__main__":
    main()
