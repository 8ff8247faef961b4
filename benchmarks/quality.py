"""Quality of per-particle motion correction on hard simulated sessions, against the truth.

What runs is the product: each session is written by ``lmc simulate`` physics
(:func:`streamer.sim.simulate.hard_params`: at least as hard as the held-out sessions of issue 10)
to a temporary folder, and each movie goes through :func:`streamer.pipeline.estimate` (decode, gain,
full-frame motion, picks, per-particle trajectories) with a real :class:`~streamer.config.Config`
(``lmc run`` defaults + the session's recommended settings + ``--set`` overrides). The same
particles (true particles whose boxes stay inside every frame; positions = the written picks, with
their pick error; junk picks take part in the fit but are not scored) are then extracted by the
product's :func:`streamer.pipeline.extract` along six trajectories:

* ``lmc``: what the product extracts (``Estimate.trajectories_px``, exposure weights with the
  per-frame alignment B-factor of ``Estimate.trajectory_sd_px``);
* ``lmc_plain``: the same trajectories with plain exposure weights (how much of lmc's gain is the
  trajectories themselves);
* ``lmc_ff``: lmc's own full-frame trajectory only (``Estimate.fullframe_px``, with its B-factors:
  what the guard falls back to);
* ``true_ff``: the TRUE full-frame trajectory (the simulated global drift): a perfect full-frame correction;
* ``field``: per frame a cubic polynomial in (x, y) fitted to the true trajectories (a perfect smooth
  field without any per-particle term: the ceiling of a field model);
* ``oracle``: the true trajectories.

Each is scored against the noise-free truth images (shifted to where each particle sits in its box,
:func:`streamer.sim.score.reference_offsets`) by the FRC pooled over all particles of a regime
(:func:`gpu.quality.image_ring_sums`, 30 Å to 0.8 Nyquist by default), and reported as fractions of the
oracle's gain: **vs true full-frame** ``(lmc - true_ff)/(oracle - true_ff)`` (the headline: > 0 means
better particles than a perfect full-frame correction), vs lmc's own full-frame, and the same for
the smooth-field ceiling. Trajectory errors (:mod:`streamer.sim.score`, Å, centred): RMSE of lmc, of
lmc's full-frame only and of the true full-frame; lmc's common-mode error (the mean over particles
of its error per frame): RMS, worst frame, first and last 6 frames, and the same for the motion stage's
``s`` alone (what the common term started from) and for the **limit** of the data
(:func:`common_limit`: ``s + c`` with ``c`` fitted alone, every particle's true field + residual
given: what lmc's joint fit would reach if the field were known exactly); beside it lmc's own posterior
standard deviation of its full-frame trajectory ``s + c`` (``LocalTrajectories.common_sd``, Laplace:
the error to expect where its prior and likelihood calibration hold), RMS over frames and frame 0.

Seeds: each regime has tuning seeds (the default) and ONE held-out seed that is scored only with
``--heldout``: never while tuning the model, only to check a finished change (report every regime,
lost ones included).

Usage::

    python benchmarks/quality.py                               # all regimes, tuning seeds, markdown table
    python benchmarks/quality.py --regimes default,weak-150kDa --seeds 2
    python benchmarks/quality.py --heldout                     # the held-out seeds (final check only)
    python benchmarks/quality.py --set local.sigma_field=1.5   # a config override (repeatable)
    python benchmarks/quality.py --cache /tmp/lmc-q            # keep the simulated sessions and reuse them
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpu.extract import boxes_inside
from gpu.quality import band_frc, image_ring_sums
from gpu.shift import fourier_shift
from streamer import pipeline as pl
from streamer.config import Config, from_dict
from streamer.sim import score
from streamer.sim.simulate import (
    SimParams,
    file_stem,
    hard_params,
    load_truth,
    movie_filename,
    recommended_box,
    recommended_settings,
    simulate_session,
    truth_particles,
)

# overrides of hard_params per regime (the default regime is the sparse one: 60 particles on 2048²)
REGIMES: dict[str, dict[str, Any]] = {
    "default": {},
    "weak-150kDa": {"mass_kda": 150.0, "drift_A": (5.0, 15.0), "local_A": 1.0, "local_A_max": 2.0,
                    "particle_A": 0.3, "particle_A_max": 0.6},
    "strong": {"drift_A": (20.0, 40.0), "local_A": 5.0, "local_A_max": 8.0},
    "lowdose-60x0.7": {"frames": 60, "dose_per_frame": 0.7},
    "0.83A-500kDa": {"apix": 0.83, "mass_kda": 500.0, "pick_jitter_A": 1.5 * 0.83},
    "dense-240": {"particles": 240, "junk_picks": 10},
}
TUNING_SEEDS = (101, 102, 103)
# one per regime, scored only with --heldout (never while tuning). 90001-90006 were retired after two
# scorings (issue 10's first round), 90101-90106 after the second round's final check (and one early
# run); this set was drawn in the fourth session, rendered before any of its changes was scored.
HELDOUT_SEEDS = {name: 90_201 + i for i, name in enumerate(REGIMES)}
METHODS = ("lmc", "lmc_plain", "lmc_ff", "true_ff", "field", "oracle")
NYQUIST_FRACTION = 0.8


@dataclass
class MovieScore:
    """One movie: per-method pooled-FRC ring sums and trajectories (Å) of the scored particles."""

    movie: str
    sums: dict[str, np.ndarray]
    traj_A: dict[str, np.ndarray]  # per method (n, F, 2) or (F, 2), and "motion": the motion stage's s alone
    truth_A: np.ndarray  # (n, F, 2)
    picks_px: np.ndarray  # (n, 2) the scored particles' picks (movie px)
    choice: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.truth_A.shape[0])


def frc_band(apix: float, low_A: float = 30.0) -> tuple[float, float]:
    """(low, high) resolution band in Å: ``low_A`` to 0.8 Nyquist."""
    return (low_A, 2 * apix / NYQUIST_FRACTION)


def session_config(root: Path, params: SimParams, overrides: dict[str, Any]) -> Config:
    """The product's Config for a simulated session: ``lmc run`` defaults, the session's recommended
    settings (pixel size, dose, voltage, box, gain), picks from ``root/picks``, CPU, no plots."""
    data = recommended_settings(params, str(root / ("gain.gain" if params.format == "eer" else "gain.mrc")))
    data["picks"] = {**data.get("picks", {}), "dir": str(root / "picks")}
    data.update({"device": "cpu", "plots": False})
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[name] = value
    return from_dict(data)


# the code that renders a session: a change to any of these files must not reuse a cached session
SIMULATOR_SOURCES = ("streamer/sim/simulate.py", "streamer/sim/specimen.py", "streamer/sim/motion.py",
                     "gpu/ctf.py", "gpu/dose.py")


def simulator_digest() -> str:
    """SHA-256 of :data:`SIMULATOR_SOURCES` (the simulator's code, as it is now)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in SIMULATOR_SOURCES:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def simulated_session(params: SimParams, tmp: Path, cache: str | None) -> Path:
    """The folder of the session ``params``: simulated into ``tmp``, or with ``cache`` into (and, when
    already there, reused from) ``cache/seed<seed>-<hash of params and simulator code>``: a session is
    a pure function of its parameters and of the simulator's code (:func:`simulator_digest`), so a
    changed simulator renders its sessions anew instead of scoring stale ones."""
    if not cache:
        return simulate_session(tmp, params)
    text = json.dumps(params.to_dict(), sort_keys=True) + simulator_digest()
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    root = Path(cache) / f"seed{params.seed}-{key}"
    info = root / "session.json"
    if info.is_file() and json.loads(info.read_text()).get("params") == params.to_dict():
        return root
    return simulate_session(root, params)


def score_movie(root: Path, params: SimParams, index: int, cfg: Config, band: tuple[float, float]) -> MovieScore:
    """Run the product on movie ``index`` of the session in ``root`` and score the five methods."""
    name = movie_filename(params, index)
    truth = load_truth(root, name)
    t0 = time.perf_counter()
    est = pl.estimate(cfg, str(root / "movies" / name), None, xp=np, workspace=pl.Workspace(), clock=pl.StageClock(np))
    seconds = time.perf_counter() - t0
    frames, apix, u = est.frames, est.frames.apix, est.frames.upsampling
    if u != 1:
        raise ValueError(f"{name}: the quality benchmark scores movies at upsampling 1 (got {u})")
    # the picks the product read, matched to the written ones; junk picks are fitted, not scored
    pos = est.located.positions
    pid = score.pick_ids(pos, truth, 0.01)
    true_px = truth["trajectories"] / apix
    field_px = score.smooth_field_fit(pos[pid >= 0], true_px[pid[pid >= 0]])
    lmc = est.trajectories_px()[pid >= 0]
    trajs_all = {
        "lmc": lmc,
        "lmc_plain": lmc,
        "lmc_ff": est.fullframe_px(),
        "true_ff": truth["frame_shifts"] / apix,
        "field": field_px,
        "oracle": true_px[pid[pid >= 0]],
    }
    sel = np.flatnonzero(pid >= 0)
    keep = ~truth["is_edge"][pid[sel]]
    a = max(cfg.box, cfg.local.align_box or cfg.box) + 2
    for traj in trajs_all.values():
        ci = np.rint(pos[sel][:, None, :] + np.broadcast_to(traj, (len(sel), *traj.shape[-2:])))
        keep &= boxes_inside(ci, a, frames.shape[1:]).all(axis=1)
    sel_keep = keep
    ids = pid[sel][sel_keep]
    picks_px = pos[sel][sel_keep]
    trajs = {k: (v[sel_keep] if v.ndim == 3 else v) for k, v in trajs_all.items()}
    refs = truth_particles(root, name, cfg.box, apix, ids=ids)
    sums = {}
    sd_px = est.trajectory_sd_px()  # lmc's own uncertainty; the true trajectories are exact
    for meth, traj in trajs.items():
        out = pl.extract(cfg, frames, picks_px, traj, sd_px if meth in ("lmc", "lmc_ff") else None)
        if len(out.kept) != len(picks_px):
            raise RuntimeError(f"{name}: {meth}: {len(picks_px) - len(out.kept)} particles left the frame")
        offsets = score.reference_offsets(truth["positions"][ids], picks_px, true_px[ids], traj)
        sums[meth] = image_ring_sums(out.particles, fourier_shift(refs, offsets), apix, band)
    limit = common_limit(cfg, est, truth, pid)
    return MovieScore(
        movie=file_stem(name),
        sums=sums,
        traj_A={**{k: v * apix for k, v in trajs.items()}, "motion": est.motion.shifts_px * apix,
                "common_limit": limit * apix},
        truth_A=truth["trajectories"][ids],
        picks_px=picks_px,
        choice=str(est.local.info.get("choice", "off")),
        seconds=seconds,
        extra={"quality_gain": float(est.local.info.get("quality_gain", float("nan"))),
               "common_sd_A": est.local.common_sd * apix},
    )


def true_particle_spectra(cfg: Config, est: pl.Estimate, pid: np.ndarray) -> tuple[Any, float, np.ndarray]:
    """(spectra, share, ids): the product's band spectra (:func:`streamer.pipeline.local_spectra`) of the
    true particles among the aligned picks, overlap-weighted among themselves (junk picks have no true
    displacement and no reference), the background share of all aligned picks (as the product's), and
    their particle ids; spectra None when no true particle is aligned. ``pid``: :func:`score.pick_ids`."""
    from gpu.local import background_share, weight_overlaps

    frames, motion, pos = est.frames, est.motion, est.located.positions
    spec, inside = pl.local_spectra(cfg, frames, pos, motion)
    if spec is None or not (pid[inside] >= 0).any():
        return None, 0.0, np.zeros(0, dtype=np.int64)
    share = background_share(pos[inside], spec.box, motion.posterior.frame_shape)
    true = pid[inside] >= 0
    spec.x = spec.x[true]
    spec.self_power = None
    weight_overlaps(spec, pos[inside][true])
    return spec, share, pid[inside][true]


def common_limit(cfg: Config, est: pl.Estimate, truth: dict[str, Any], pid: np.ndarray) -> np.ndarray:
    """(F, 2) px: the full-frame trajectory ``s + c`` with ``c`` fitted knowing every particle's true
    field + residual (:func:`gpu.local.common_given`): the same data, prior and background share as the
    product's common term, nothing else unknown. Its common-mode error is the limit of the data for this
    model; lmc's ``s + c`` can only approach it. Fitted on the true particles among the aligned picks
    (:func:`true_particle_spectra`)."""
    from gpu.local import common_given

    motion = est.motion
    spec, share, ids = true_particle_spectra(cfg, est, pid)
    if spec is None:
        return motion.shifts_px.copy()
    d = truth["trajectories"][ids] / est.frames.apix - motion.shifts_px[None]
    d -= d.mean(axis=1, keepdims=True)
    known = d - d.mean(axis=0, keepdims=True)  # what differs between particles: field + residual
    return motion.shifts_px + common_given(spec, known, motion.posterior, share)


def summarise(movies: list[MovieScore]) -> dict[str, Any]:
    """Pooled FRC per method, fractions, trajectory errors and common-mode errors over ``movies``."""
    frc = {m: band_frc(sum(ms.sums[m] for ms in movies)) for m in METHODS}
    n = sum(ms.n for ms in movies)

    def rmse(meth: str) -> float:
        sq = sum(score.trajectory_rmse(ms.traj_A[meth], ms.truth_A) ** 2 * ms.n for ms in movies)
        return float(np.sqrt(sq / n))

    cm = {meth: [score.common_mode_summary(score.common_mode(ms.traj_A[meth], ms.truth_A)) for ms in movies]
          for meth in ("lmc", "lmc_ff", "true_ff", "motion", "common_limit")}  # motion: the motion stage's s, before
    # the common term; common_limit: s + c with every particle's own displacement known (the data's limit)

    def pooled(meth: str, key: str) -> float:
        vals = [c[key] for c in cm[meth]]
        return float(max(vals)) if key == "worst" else float(np.sqrt(np.mean(np.square(vals))))

    sd = [ms.extra["common_sd_A"] for ms in movies if len(ms.extra.get("common_sd_A", ()))]
    return {
        "movies": len(movies),
        "particles": n,
        # lmc's own (Laplace) posterior std of its full-frame trajectory s + c: RMS over frames, frame 0
        "common_sd": {"rms": float(np.sqrt(np.mean([np.mean(v**2) for v in sd]))) if sd else float("nan"),
                      "frame0": float(np.sqrt(np.mean([v[0] ** 2 for v in sd]))) if sd else float("nan")},
        "frc": frc,
        "fraction_vs_true_ff": score.oracle_fraction(frc["lmc"], frc["true_ff"], frc["oracle"]),
        "fraction_vs_lmc_ff": score.oracle_fraction(frc["lmc"], frc["lmc_ff"], frc["oracle"]),
        "fraction_plain_vs_true_ff": score.oracle_fraction(frc["lmc_plain"], frc["true_ff"], frc["oracle"]),
        "fraction_lmc_ff_vs_true_ff": score.oracle_fraction(frc["lmc_ff"], frc["true_ff"], frc["oracle"]),
        "field_ceiling": score.oracle_fraction(frc["field"], frc["true_ff"], frc["oracle"]),
        "rmse": {m: rmse(m) for m in ("lmc", "lmc_ff", "true_ff", "field")},
        "common_mode": {m: {k: pooled(m, k) for k in ("rms", "worst", "first", "last")} for m in cm},
        "choices": [ms.choice for ms in movies],
        "seconds_estimate": float(np.mean([ms.seconds for ms in movies])),
    }


def run_regime(name: str, seeds: list[int], args: argparse.Namespace, sim_overrides: dict[str, Any] | None = None,
               log: Any = sys.stderr) -> dict[str, Any]:
    """Simulate and score every movie of ``seeds`` for regime ``name``; returns :func:`summarise`."""
    over = {**REGIMES.get(name, {}), **(sim_overrides or {})}
    # one extraction box for all seeds of a regime (the protein model, hence its recommended box, varies
    # with the seed), so that their FRC rings pool
    box = max(recommended_box(hard_params(seed=seed, movies=args.movies, **over)) for seed in seeds)
    config_overrides = {"box": box, **args.overrides}
    scores: list[MovieScore] = []
    for seed in seeds:
        params = hard_params(seed=seed, movies=args.movies, **over)
        band = frc_band(params.apix, args.band_low)
        with tempfile.TemporaryDirectory(prefix="lmc-quality-") as tmp:
            t0 = time.perf_counter()
            root = simulated_session(params, Path(tmp), getattr(args, "cache", None))
            t_sim = time.perf_counter() - t0
            cfg = session_config(root, params, config_overrides)
            for i in range(params.movies):
                ms = score_movie(root, params, i, cfg, band)
                scores.append(ms)
                print(f"  {name} seed {seed} movie {i}: {ms.n} particles, guard {ms.choice}, simulated in "
                      f"{t_sim:.0f} s, estimated in {ms.seconds:.1f} s", file=log)
    out = summarise(scores)
    out.update(regime=name, seeds=list(seeds), box=box, band_A=list(frc_band(hard_params(**over).apix, args.band_low)))
    return out


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`run_regime` results."""
    lines = [
        "| regime | seeds | n | **fraction vs true full-frame** | the same, plain exposure weights | fraction vs lmc full-frame | smooth-field ceiling | "
        "RMSE lmc Å | RMSE lmc full-frame Å | RMSE true full-frame Å | common-mode lmc: RMS (worst) Å | "
        "first 6 / last 6 Å | limit: s + c with every particle's own motion known: RMS (worst), first 6 / last 6 Å | "
        "lmc's posterior sd of s + c: RMS (frame 0) Å | common-mode lmc full-frame: RMS (worst) Å | "
        "common-mode motion stage s alone: RMS (worst), last 6 Å | common-mode true full-frame: RMS (worst) Å | guard |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cm, cf, ct, cs, cl = (r["common_mode"][k] for k in ("lmc", "lmc_ff", "true_ff", "motion", "common_limit"))
        rm, sd = r["rmse"], r["common_sd"]
        choices = ", ".join(f"{c} ×{r['choices'].count(c)}" for c in dict.fromkeys(r["choices"]))
        lines.append(
            f"| {r['regime']} | {','.join(map(str, r['seeds']))} | {r['particles']} | **{r['fraction_vs_true_ff']:+.2f}** | "
            f"{r['fraction_plain_vs_true_ff']:+.2f} | {r['fraction_vs_lmc_ff']:+.2f} | {r['field_ceiling']:+.2f} | {rm['lmc']:.2f} | {rm['lmc_ff']:.2f} | "
            f"{rm['true_ff']:.2f} | {cm['rms']:.2f} ({cm['worst']:.2f}) | {cm['first']:.2f} / {cm['last']:.2f} | "
            f"{cl['rms']:.2f} ({cl['worst']:.2f}), {cl['first']:.2f} / {cl['last']:.2f} | "
            f"{sd['rms']:.2f} ({sd['frame0']:.2f}) | {cf['rms']:.2f} ({cf['worst']:.2f}) | "
            f"{cs['rms']:.2f} ({cs['worst']:.2f}), {cs['last']:.2f} | {ct['rms']:.2f} ({ct['worst']:.2f}) | "
            f"{choices} |"
        )
    return "\n".join(lines)


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE (e.g. local.sigma_field=1.5)")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regimes", default=",".join(REGIMES), help=f"comma list of {', '.join(REGIMES)}")
    ap.add_argument("--seeds", type=int, default=len(TUNING_SEEDS), help="how many of the tuning seeds per regime")
    ap.add_argument("--movies", type=int, default=1, help="movies per seed")
    ap.add_argument("--heldout", action="store_true",
                    help="score the ONE held-out seed of each regime instead (final check only: never while tuning)")
    ap.add_argument("--band-low", type=float, default=30.0, help="FRC band: lowest resolution (Å); highest = 0.8 Nyquist")
    ap.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                    help="config override KEY=VALUE (section.key for sections), repeatable")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--cache", help="keep the simulated sessions in this folder and reuse them (same parameters)")
    ap.add_argument("--simulate-only", action="store_true", help="only write the sessions into --cache (no scoring)")
    args = ap.parse_args(argv)
    if args.simulate_only and not args.cache:
        ap.error("--simulate-only needs --cache DIR")
    args.overrides = dict(args.overrides)
    names = args.regimes.split(",")
    for name in names:
        if name not in REGIMES:
            ap.error(f"unknown regime {name!r}")
    results = []
    if args.simulate_only:  # e.g. ahead of a final run; writing a held-out session is not scoring it
        for name in names:
            for seed in [HELDOUT_SEEDS[name]] if args.heldout else list(TUNING_SEEDS[: args.seeds]):
                simulated_session(hard_params(seed=seed, movies=args.movies, **REGIMES[name]), Path(args.cache), args.cache)
                print(f"{name} seed {seed}: in {args.cache}", file=sys.stderr)
        return 0
    for name in names:
        seeds = [HELDOUT_SEEDS[name]] if args.heldout else list(TUNING_SEEDS[: args.seeds])
        t = time.perf_counter()
        r = run_regime(name, seeds, args)
        results.append(r)
        print(f"{name}: fraction vs true full-frame {r['fraction_vs_true_ff']:+.3f}, vs lmc full-frame "
              f"{r['fraction_vs_lmc_ff']:+.3f}, ceiling {r['field_ceiling']:+.3f}; FRC "
              f"{ {k: round(v, 4) for k, v in r['frc'].items()} } [{time.perf_counter() - t:.0f} s]", file=sys.stderr)
    print(("held-out seeds" if args.heldout else "tuning seeds") + f"; config overrides {args.overrides or 'none'}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
