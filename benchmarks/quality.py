"""Quality of per-particle motion correction on simulated sessions with known trajectories.

For each regime, movies are rendered with :mod:`streamer.sim.simulate` (in memory), gain-corrected,
hot pixels replaced, full-frame motion estimated (:func:`gpu.motion.estimate_frame_shifts`), and
the same particles (true particles whose boxes stay inside the frame; positions = the written
picks, with their pick error) are extracted four ways with :func:`gpu.extract.extract_particles`:

(a) ``plain``: uncorrected sum of frames (no dose weighting);
(b) ``fullframe``: full-frame trajectory, dose weighted;
(c) ``local``: full-frame + this tool's per-particle trajectory (:func:`gpu.local.estimate_local`), dose weighted;
(d) ``oracle``: the TRUE trajectories, dose weighted.

Each set is scored against the noise-free ground-truth particle images
(:func:`streamer.sim.simulate.truth_particles`) by the Fourier ring correlation pooled over all
particles of the regime, after the best sub-pixel translation of each particle onto its truth
(the same procedure for all four), and averaged over the shells from ``--band`` (Å). Reported:
band-averaged FRC of a-d, the oracle gain fraction ``(c - b) / (d - b)``, trajectory RMSE against
the truth (Å, after removing each trajectory's mean over frames) for full-frame only and for the
local model, the guard's choices, and the per-movie reference-free quality signal (held-out
weighted correlation gain, :func:`gpu.quality.heldout_signal`; also the held-out and in-sample
even/odd FRC gains) next to the oracle-based per-movie score ``FRC(c) - FRC(b)``, with whether
their signs agree where the score shows a clear effect (|score| >= ``EFFECT``). The unguarded
best candidate (what the model would apply without the guard) is scored too (``local_nog``), so
the signal can be compared with a non-zero effect even where the guard falls back.
``--diagnostics`` also scores the true full-frame trajectory, the true field without the
per-particle residual, and the true local motion on top of the *estimated* full-frame
trajectory: the ceiling of any local model given the full-frame estimate.

Usage::

    python benchmarks/quality.py                      # all regimes, 2 movies each
    python benchmarks/quality.py --regimes default,hard --movies 2 --particles 60 --size 1536
    python benchmarks/quality.py --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpu.extract import boxes_inside, extract_particles
from gpu.gain import apply_gain, hot_pixel_mask, replace_pixels
from gpu.local import estimate_local
from gpu.local_model import spectra_from_frames
from gpu.motion import estimate_frame_shifts
from gpu.quality import evenodd_gain
from streamer.config import LocalConfig
from streamer.sim.simulate import SimParams, file_stem, render_movie, truth_particles, write_gain

REGIMES: dict[str, dict[str, Any]] = {
    "default": {},
    "no-local": {"local_A": 0.0, "particle_A": 0.0},
    "hard-100kDa-weak": {"mass_kda": 100.0, "local_A": 1.0, "particle_A": 0.3},
    "100kDa": {"mass_kda": 100.0},
    "600kDa": {"mass_kda": 600.0},
    "strong-local-6A": {"local_A": 6.0},
    "dose-0.5": {"dose_per_frame": 0.5},
    "dose-2-20fr": {"dose_per_frame": 2.0, "frames": 20},
}
METHODS = ("plain", "fullframe", "local", "oracle", "local_nog")
# LocalConfig values this benchmark established (proposed as the config defaults)
RECOMMENDED = {"band_high": 8.0, "bfactor": 0.0, "sigma_velocity": 0.05}
EFFECT = 1e-3  # |FRC(c') - FRC(b)| below this is "no measurable effect" when checking the signal's sign


# -- scoring ---------------------------------------------------------------------------------------


def best_translation(est: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(n, b, b) ``est`` shifted by the sub-pixel translation that maximises its correlation with ``truth``.

    Integer peak of the circular cross-correlation, refined by a parabola through the peak and its
    neighbours on each axis, applied as a Fourier phase ramp.
    """
    n, b, _ = est.shape
    e = np.fft.rfft2(est)
    t = np.fft.rfft2(truth)
    cc = np.fft.irfft2(t * np.conj(e), s=(b, b))
    flat = cc.reshape(n, -1).argmax(axis=1)
    iy, ix = flat // b, flat % b
    rows = np.arange(n)

    def vertex(m: np.ndarray, c: np.ndarray, p: np.ndarray) -> np.ndarray:
        den = m - 2 * c + p
        return np.where(np.abs(den) > 0, 0.5 * (m - p) / np.where(den == 0, 1, den), 0.0)

    c0 = cc[rows, iy, ix]
    dy = vertex(cc[rows, (iy - 1) % b, ix], c0, cc[rows, (iy + 1) % b, ix])
    dx = vertex(cc[rows, iy, (ix - 1) % b], c0, cc[rows, iy, (ix + 1) % b])
    sy = np.where(iy > b // 2, iy - b, iy) + dy
    sx = np.where(ix > b // 2, ix - b, ix) + dx
    ky = np.fft.fftfreq(b)[:, None]
    kx = np.fft.rfftfreq(b)[None, :]
    ramp = np.exp(-2j * np.pi * (kx * sx[:, None, None] + ky * sy[:, None, None]))
    return np.fft.irfft2(e * ramp, s=(b, b))


def pooled_frc(est: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-shell sums (numerator, |est|², |truth|²) over particles, shells in Fourier pixels (rfft grid)."""
    b = est.shape[-1]
    e = np.fft.rfft2(est)
    t = np.fft.rfft2(truth)
    mult = np.full(b // 2 + 1, 2.0)
    mult[0] = 1.0
    if b % 2 == 0:
        mult[-1] = 1.0
    shell = np.rint(np.hypot(np.fft.fftfreq(b)[:, None] * b, np.fft.rfftfreq(b)[None, :] * b)).astype(np.int64).ravel()
    nb = b // 2 + 1
    w = np.broadcast_to(mult, (b, b // 2 + 1)).ravel()
    num = np.bincount(shell, ((e * np.conj(t)).real.sum(0)).ravel() * w, minlength=nb)[:nb]
    pe = np.bincount(shell, ((np.abs(e) ** 2).sum(0)).ravel() * w, minlength=nb)[:nb]
    pt = np.bincount(shell, ((np.abs(t) ** 2).sum(0)).ravel() * w, minlength=nb)[:nb]
    return num, pe, pt


def band_frc(sums: tuple[np.ndarray, np.ndarray, np.ndarray], box: int, apix: float, band: tuple[float, float]) -> float:
    num, pe, pt = sums
    j = np.arange(len(num))
    res = box * apix / np.maximum(j, 1e-9)
    use = (res <= band[0]) & (res >= band[1]) & (pe > 0) & (pt > 0)
    return float(np.mean(num[use] / np.sqrt(pe[use] * pt[use])))


def centred_rmse(est: np.ndarray, truth: np.ndarray) -> float:
    """RMS over particles and frames of |est - truth| (Å) after removing each trajectory's mean."""
    e = est - est.mean(axis=-2, keepdims=True)
    t = truth - truth.mean(axis=-2, keepdims=True)
    return float(np.sqrt(((e - t) ** 2).sum(-1).mean()))


# -- one movie ---------------------------------------------------------------------------------------


def process_movie(params: SimParams, index: int, workdir: Path, local_cfg: LocalConfig, local_kw: dict[str, Any],
                  align_box: int | None = None, diagnostics: bool = False, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Render, correct and extract one movie (``methods``: which of :data:`METHODS` to extract and
    score); returns per-shell FRC sums per method, trajectory errors and the local fit's diagnostics."""
    t0 = time.perf_counter()
    counts, truth = render_movie(params, index)
    t_render = time.perf_counter() - t0
    stem = file_stem(truth["movie"])
    (workdir / "truth").mkdir(parents=True, exist_ok=True)
    np.savez(workdir / "truth" / f"{stem}.npz", **truth)
    import mrcfile

    with mrcfile.open(write_gain(workdir, params), permissive=True) as m:
        gain = np.asarray(m.data, dtype=np.float32)
    frames = apply_gain(counts, gain)
    del counts
    bad = hot_pixel_mask(frames.sum(axis=0), 6.0)
    if bad.any():
        frames = replace_pixels(frames, bad)
    apix = params.apix
    shifts = estimate_frame_shifts(frames, apix, 8.0, 500.0, 10, 0.01, -1)

    box = int(truth["box"])
    a = align_box or local_cfg.align_box or box
    real = (truth["pick_particle"] >= 0)
    pid = truth["pick_particle"][real]
    pos = truth["picks"][real]
    keep = ~truth["is_edge"][pid]
    true_px = truth["trajectories"][pid] / apix
    _f, h, w = frames.shape
    for traj in (np.broadcast_to(shifts, true_px.shape), true_px):
        ci = np.floor(pos[:, None, :] + traj + 0.5)
        keep &= boxes_inside(ci, max(a, box) + 2, (h, w)).all(axis=1)
    pid, pos, true_px = pid[keep], pos[keep], true_px[keep]

    t1 = time.perf_counter()
    centres = pos[:, None, :] + shifts[None]
    spec = spectra_from_frames(
        frames, centres, a, apix, params.dose_per_frame, 0.0, params.kv,
        band_low=local_cfg.band_low, band_high=local_cfg.band_high, bfactor=local_cfg.bfactor,
        first_frame=local_cfg.first_frame, last_frame=local_cfg.last_frame,
    )
    res = estimate_local(None, None, pos, apix, params.dose_per_frame, 0.0, params.kv, cfg=local_cfg, spectra=spec, **local_kw)
    t_local = time.perf_counter() - t1
    best = res.info.get("best", res.info["choice"])
    nog = res.candidates.get(best, res.smooth)
    insample = evenodd_gain(spec, res.smooth)

    dose = {"dose_per_frame": params.dose_per_frame, "pre_exposure": 0.0, "kv": params.kv}
    trajs = {
        "plain": (np.zeros_like(shifts), None),
        "fullframe": (shifts, dose),
        "local": (shifts[None] + res.smooth, dose),
        "oracle": (true_px, dose),
        "local_nog": (shifts[None] + nog, dose),
    }
    trajs = {k: v for k, v in trajs.items() if k in methods}
    if diagnostics:
        # how much of the oracle a perfect full-frame / a perfect smooth-field model could reach
        trajs["true_fullframe"] = (truth["frame_shifts"] / apix, dose)
        trajs["true_field"] = ((truth["frame_shifts"][None] + truth["local"][pid]) / apix, dose)
        # the ceiling of any local model on top of the estimated full-frame trajectory
        trajs["est_fullframe_true_local"] = (shifts[None] + (truth["local"][pid] + truth["residual"][pid]) / apix, dose)
    stacks = {}
    for name, (traj, dw) in trajs.items():
        parts, kept, _ = extract_particles(frames, pos, traj, box, box, apix, dose=dw, edge="skip")
        if len(kept) != len(pos):
            raise RuntimeError(f"benchmarks/quality.py: {name}: {len(pos) - len(kept)} particles left the frame")
        stacks[name] = np.asarray(parts, dtype=np.float64)
    truth_img = truth_particles(workdir, stem, box, apix, ids=pid).astype(np.float64)
    aligned = {name: best_translation(s, truth_img) for name, s in stacks.items()}
    frc_sums = {name: pooled_frc(s, truth_img) for name, s in aligned.items()}

    est_A = (shifts[None] + res.smooth) * apix
    raw_A = (shifts[None] + res.raw) * apix
    true_A = truth["trajectories"][pid]
    return {
        "movie": stem,
        "n": len(pid),
        "box": box,
        "frc_sums": frc_sums,
        "rmse_fullframe": centred_rmse(np.broadcast_to(shifts[None] * apix, true_A.shape), true_A),
        "rmse_local": centred_rmse(est_A, true_A),
        "rmse_local_nog": centred_rmse((shifts[None] + nog) * apix, true_A),
        "rmse_raw": centred_rmse(raw_A, true_A),
        "choice": res.info["choice"],
        "best": best,
        "heldout_gain": res.info.get("heldout_gain"),
        "signal": res.info.get("quality", {}).get("gain", float("nan")),
        "signal_best": res.info.get("quality_best", {}).get("gain", float("nan")),
        "signal_insample": insample,
        "signal_z_best": res.info.get("quality_best", {}).get("z", float("nan")),
        "signal_frc_best": res.info.get("quality_best", {}).get("frc_gain", float("nan")),
        "sigma_field": res.info.get("sigma_field"),
        "seconds_local": t_local,
        "seconds_render": t_render,
        "iterations": res.info.get("iterations"),
    }


def run_regime(name: str, overrides: dict[str, Any], args: argparse.Namespace, local_cfg: LocalConfig,
               local_kw: dict[str, Any]) -> dict[str, Any]:
    params = SimParams(
        movies=args.movies, shape=(args.size, args.size), particles=args.particles, seed=args.seed, **overrides
    )
    band = (args.band_low, args.band_high)
    per_movie = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.movies):
            per_movie.append(process_movie(params, i, Path(tmp), local_cfg, local_kw, args.align_box, args.diagnostics))
            m = per_movie[-1]
            print(f"  {name} movie {i}: n={m['n']} choice={m['choice']} local {m['seconds_local']:.1f}s", file=sys.stderr)
    box = per_movie[0]["box"]
    pooled = {}
    for meth in per_movie[0]["frc_sums"]:
        sums = [sum(m["frc_sums"][meth][k] for m in per_movie) for k in range(3)]
        pooled[meth] = band_frc(tuple(sums), box, params.apix, band)
    denom = pooled["oracle"] - pooled["fullframe"]
    frac = (pooled["local"] - pooled["fullframe"]) / denom if denom > 0 else float("nan")
    frac_nog = (pooled["local_nog"] - pooled["fullframe"]) / denom if denom > 0 else float("nan")
    movies = []
    for m in per_movie:
        score = {k: band_frc(m["frc_sums"][k], box, params.apix, band) for k in METHODS}
        movies.append({
            "movie": m["movie"], "n": m["n"], "choice": m["choice"], "best": m["best"],
            "oracle_score": score["local"] - score["fullframe"],
            "oracle_score_nog": score["local_nog"] - score["fullframe"],
            "signal": m["signal"], "signal_best": m["signal_best"], "signal_insample": m["signal_insample"],
            "signal_z_best": m["signal_z_best"], "signal_frc_best": m["signal_frc_best"],
            "heldout_gain": m["heldout_gain"], "sigma_field": m["sigma_field"],
            "rmse_fullframe": m["rmse_fullframe"], "rmse_local": m["rmse_local"], "rmse_local_nog": m["rmse_local_nog"],
            "rmse_raw": m["rmse_raw"], "seconds_local": m["seconds_local"], "iterations": m["iterations"],
        })
    n = sum(m["n"] for m in per_movie)
    return {
        "regime": name,
        "overrides": overrides,
        "particles": n,
        "frc": pooled,
        "fraction": frac,
        "fraction_nog": frac_nog,
        "rmse_fullframe": float(np.sqrt(np.mean([m["rmse_fullframe"] ** 2 for m in per_movie]))),
        "rmse_local": float(np.sqrt(np.mean([m["rmse_local"] ** 2 for m in per_movie]))),
        "rmse_local_nog": float(np.sqrt(np.mean([m["rmse_local_nog"] ** 2 for m in per_movie]))),
        "rmse_raw": float(np.sqrt(np.mean([m["rmse_raw"] ** 2 for m in per_movie]))),
        "movies": movies,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| regime | n | FRC plain | FRC full-frame | FRC local | FRC oracle | oracle gain fraction | (no guard) | "
        "RMSE full-frame Å | RMSE local Å | guard choices | signal sign agrees |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f = r["frc"]
        choices = ", ".join(m["choice"] for m in r["movies"])
        clear = [m for m in r["movies"] if abs(m["oracle_score_nog"]) >= EFFECT]
        agree = sum(np.sign(m["signal_best"]) == np.sign(m["oracle_score_nog"]) for m in clear)
        lines.append(
            f"| {r['regime']} | {r['particles']} | {f['plain']:.4f} | {f['fullframe']:.4f} | {f['local']:.4f} | "
            f"{f['oracle']:.4f} | {r['fraction']:.2f} | {r['fraction_nog']:.2f} | {r['rmse_fullframe']:.2f} | "
            f"{r['rmse_local']:.2f} | {choices} | {agree}/{len(clear)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regimes", default=",".join(REGIMES), help=f"comma list of {', '.join(REGIMES)}")
    ap.add_argument("--movies", type=int, default=2)
    ap.add_argument("--particles", type=int, default=60, help="true particles per movie")
    ap.add_argument("--size", type=int, default=1536, help="movie size (px, square)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--band-low", type=float, default=100.0, help="FRC band: lowest resolution averaged (Å)")
    ap.add_argument("--band-high", type=float, default=3.0, help="FRC band: highest resolution averaged (Å)")
    ap.add_argument("--align-box", type=int, default=None, help="alignment box (px); default local.align_box or the extraction box")
    ap.add_argument("--local", default=json.dumps(RECOMMENDED), help="JSON overrides of LocalConfig (default: the values recommended for the config defaults)")
    ap.add_argument("--local-kw", default="{}", help='JSON keyword arguments of estimate_local, e.g. {"sigma_field": 1}')
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--diagnostics", action="store_true", help="also score the true full-frame and true field-only trajectories")
    args = ap.parse_args(argv)
    local_cfg = dataclasses.replace(LocalConfig(), **json.loads(args.local))
    local_kw = json.loads(args.local_kw)
    results = []
    for name in args.regimes.split(","):
        if name not in REGIMES:
            ap.error(f"unknown regime {name!r}")
        t = time.perf_counter()
        results.append(run_regime(name, REGIMES[name], args, local_cfg, local_kw))
        r = results[-1]
        extra = {k: round(v, 4) for k, v in r["frc"].items()}
        print(f"  FRC {extra}", file=sys.stderr)
        print(f"{name}: fraction {r['fraction']:.3f} (no guard {r['fraction_nog']:.3f}) rmse {r['rmse_fullframe']:.3f} -> "
              f"{r['rmse_local']:.3f} Å  [{time.perf_counter() - t:.0f} s]", file=sys.stderr)
        for m in r["movies"]:
            print(f"    {m['movie']}: choice {m['choice']} best {m['best']} score {m['oracle_score']:+.5f} "
                  f"(nog {m['oracle_score_nog']:+.5f}) signal {m['signal']:+.5f} best {m['signal_best']:+.5f} "
                  f"(z {m['signal_z_best']:+.2f}, heldout FRC {m['signal_frc_best']:+.5f}, in-sample FRC "
                  f"{m['signal_insample']:+.5f}) gains {m['heldout_gain']} rmse {m['rmse_fullframe']:.3f}->"
                  f"{m['rmse_local']:.3f} (nog {m['rmse_local_nog']:.3f}, raw {m['rmse_raw']:.2f}) {m['seconds_local']:.1f}s",
                  file=sys.stderr)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
