"""A CPU model of the GPU memory the engine needs per stage, for K3 and EER (upsampling 2) movies.

    python benchmarks/device_memory.py [--formats tiff eer] [--frames 40] [--particles 300]
                                       [--box 256] [--fcrop-box 128] [--upsampling 2] [--no-local]
                                       [--card-gib 16] [--reserve-gib 1] [--shape H W] [--workdir DIR]

No GPU is needed: ``streamer.pipeline.process_movie`` runs with the NumPy backend, which is the
CuPy code path with another array module, under ``tracemalloc`` (NumPy reports every array
allocation to it). Per stage (the ``on_stage`` laps of process_movie) the peak of traced memory
is recorded, then reset. The model of the device footprint:

* host only, not counted on the device: the decoded raw movie and the reader's file buffers
  (measured in a separate traced read; on the GPU path the raw movie stays in host RAM and
  ``gpu.gain.apply_gain`` uploads ``chunk`` raw frames at a time into the float32 device movie);
* the device, per stage: traced peak of the NumPy run (tracing starts after the decode), plus
  in the gain stage the GPU-only uploads the NumPy run does not make (the gain multiplier
  h·w·4 bytes and one raw chunk of 4 frames);
* map_chunks runs chunks one after the other on the GPU, so the model runs with ``threads=1``
  (parallel CPU chunks would each hold their own temporaries).

Not modelled: the CUDA context, cuFFT plan work areas and CuPy memory-pool rounding/fragmentation
(``--reserve-gib``, default 1 GiB, is subtracted from the card before the "fits" verdict); host
(pageable) staging of uploads. Movies are the synthetic ones of benchmarks/k3_movie.py (cached in
``--workdir``); one movie per format.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k3_movie import APIX, make_data  # the synthetic movies and pixel size of the K3 benchmark

GIB = 2**30
UPLOAD_CHUNK = 4  # frames per upload: apply_gain's default chunk


def _gib(n: float) -> float:
    return n / GIB


def model_movie(movie: Path, gain: Path, picks: Path, fmt: str, ns: argparse.Namespace) -> dict:
    """Host (decode) and per-stage device figures for one movie (bytes)."""
    from streamer import config as c
    from streamer import pipeline
    from streamer.formats.movies import read_movie

    u = ns.upsampling if fmt == "eer" else 1
    cfg = c.from_dict({
        "apix": APIX, "dose_per_frame": 1.0, "box": ns.box, "fcrop_box": ns.fcrop_box, "device": "cpu", "threads": 1,
        "gain": {"file": str(gain)}, "picks": {"dir": str(picks.parent)},
        "local": {"enabled": not ns.no_local}, "eer": {"fractions": ns.frames, "upsampling": u},
    })
    gc.collect()  # process_movie gets a fresh Workspace: no previous movie's buffer counts here

    tracemalloc.start()
    t = time.perf_counter()
    mov = read_movie(str(movie), cfg.eer, threads=0)
    decode_s = time.perf_counter() - t
    decode_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n_f, h, w = mov.frames.shape
    raw, raw_dtype = mov.frames.nbytes, str(mov.frames.dtype)
    multiplier = pipeline.load_gain(cfg, (h, w), u)  # host cache, read before tracing: file buffers are host
    gpu_only = (0 if multiplier is None else h * w * 4) + min(UPLOAD_CHUNK, n_f) * h * w * mov.frames.itemsize

    stages: list[dict] = []

    def on_stage(name: str) -> None:
        current, peak = tracemalloc.get_traced_memory()
        extra = gpu_only if name == "gain" else 0
        stages.append({"stage": name, "peak": peak + extra, "traced_peak": peak, "gpu_only": extra,
                       "held_after": current, "t": time.perf_counter()})
        tracemalloc.reset_peak()

    tracemalloc.start()
    t0 = time.perf_counter()
    result = pipeline.process_movie(cfg, str(movie), preloaded=mov, write_sidecars=False, on_stage=on_stage,
                                     binned_patches=False)  # as on a GPU
    total_s = time.perf_counter() - t0
    tracemalloc.stop()
    del mov
    gc.collect()
    return {
        "format": fmt, "movie": str(movie), "shape": [n_f, h, w], "upsampling": u, "raw_dtype": raw_dtype,
        "raw_bytes": raw, "decode_peak": decode_peak, "decode_s": round(decode_s, 2), "float32_bytes": n_f * h * w * 4,
        "particles": result.n, "stages": [{k: v for k, v in st.items() if k != "t"} for st in stages if st["stage"] != "decode"],
        "seconds": round(total_s, 1),
    }


def warm_up(work: Path, ns: argparse.Namespace) -> None:
    """One tiny movie through the pipeline untraced: the lazy imports and module-level state of the
    first run are Python objects, not device memory, and would otherwise count in the first stages."""
    from streamer import config as c
    from streamer import pipeline

    movie, gain, picks = make_data(work, "tiff", 4, 3, shape=(256, 256))
    cfg = c.from_dict({"apix": APIX, "dose_per_frame": 1.0, "box": 64, "device": "cpu", "threads": 1, "gain": {"file": str(gain)},
                       "picks": {"dir": str(picks.parent)}, "local": {"enabled": not ns.no_local}})
    pipeline.process_movie(cfg, str(movie), write_sidecars=False, binned_patches=False)


def print_table(m: dict, card_gib: float, reserve_gib: float) -> None:
    n_f, h, w = m["shape"]
    usable = card_gib - reserve_gib
    print(f"\n{m['format']} {w}x{h}x{n_f} (EER upsampling {m['upsampling']})" if m["format"] == "eer"
          else f"\n{m['format']} {w}x{h}x{n_f}", f"— {m['particles']} particles; float32 movie "
          f"{_gib(m['float32_bytes']):.2f} GiB; NumPy run {m['seconds']:.0f} s")
    print("  host only (host RAM on the GPU path, never on the device):")
    print(f"    decoded raw movie ({m['raw_dtype']:<7})             {_gib(m['raw_bytes']):6.2f} GiB")
    print(f"    decode peak (raw + file/decoder bufs) {_gib(m['decode_peak']):6.2f} GiB")
    print(f"  device model, peak per stage (CPU model of the GPU footprint; fits = <= {card_gib:g} GiB card "
          f"- {reserve_gib:g} GiB reserve):")
    print(f"    {'stage':<11} {'peak GiB':>9} {'of which GPU-only':>18} {'held after':>11}  fits")
    for st in m["stages"]:
        fits = "yes" if _gib(st["peak"]) <= usable else "NO"
        print(f"    {st['stage']:<11} {_gib(st['peak']):9.2f} {_gib(st['gpu_only']):18.2f} "
              f"{_gib(st['held_after']):11.2f}  {fits}")
    gain = next(st for st in m["stages"] if st["stage"] == "gain")
    whole = gain["peak"] + m["raw_bytes"] - m["raw_bytes"] * min(UPLOAD_CHUNK, n_f) // n_f
    print(f"    (uploading the whole raw movie instead of {UPLOAD_CHUNK}-frame chunks: gain stage {_gib(whole):.2f} GiB)")
    peak = max(st["peak"] for st in m["stages"])
    verdict = "fits" if _gib(peak) <= usable else "does NOT fit"
    print(f"  device peak {_gib(peak):.2f} GiB = {peak / m['float32_bytes']:.2f}x the float32 movie: {verdict} a "
          f"{card_gib:g} GiB card ({usable - _gib(peak):+.2f} GiB left after the reserve)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["tiff", "eer"], choices=["tiff", "mrc", "eer"])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--fcrop-box", type=int, default=128)
    ap.add_argument("--upsampling", type=int, default=2, choices=[1, 2, 4], help="EER grid")
    ap.add_argument("--no-local", action="store_true", help="full-frame-only extraction")
    ap.add_argument("--card-gib", type=float, default=16.0)
    ap.add_argument("--reserve-gib", type=float, default=1.0,
                    help="CUDA context, cuFFT work areas, pool rounding: not modelled, kept free")
    ap.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="physical frame size instead of K3 / Falcon 4096² (quick checks)")
    ap.add_argument("--workdir", default="/tmp/lmc-bench")
    ns = ap.parse_args()
    work = Path(ns.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print("CPU MODEL of the GPU memory footprint: the NumPy run of the CuPy code path under tracemalloc "
          "(see the module docstring for what is and is not modelled)")
    warm_up(work, ns)
    results = []
    for fmt in ns.formats:
        movie, gain, picks = make_data(work, fmt, ns.frames, ns.particles, shape=ns.shape)
        m = model_movie(movie, gain, picks, fmt, ns)
        print_table(m, ns.card_gib, ns.reserve_gib)
        results.append(m)
    print(json.dumps({"card_gib": ns.card_gib, "reserve_gib": ns.reserve_gib, "movies": results}))

if __name__ == "__main__":
    main()
