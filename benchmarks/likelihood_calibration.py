"""Is the per-particle likelihood calibrated? Its score at the TRUE trajectories, against its curvature.

For a calibrated log-likelihood ``ℓ`` the score ``g = ∂ℓ/∂d`` at the true parameters has variance
equal to the Fisher information, which :func:`gpu.local_model.curvature` estimates (``h``). This
script takes hard simulated sessions (:mod:`benchmarks.quality`'s regimes and tuning seeds), builds
the product's band spectra (:func:`streamer.pipeline.local_spectra`, the overlap weights of
:func:`gpu.local.weight_overlaps`, as :func:`gpu.local.estimate_local` applies them), evaluates the
score of the particles' summed log-likelihood in a common shift of frame t (``Σ_p g_pt``, what the
common term ``c_t`` sees) at the true trajectories (junk picks at the full-frame track), and reports
``z = Σ_p g_pt / sqrt(Σ_p h_pt)``: its standard deviation over frames 8-39 and both axes (1 when
calibrated; above 1 the likelihood is overconfident), and over frame 0 alone (pooled over seeds).
Beside it, per seed, frame 0's ``z_x² + z_y²``: χ² with 2 degrees of freedom when calibrated (mean 2,
99th percentile 9.2), ``2 Δℓ`` of the data's own best common shift of frame 0 over the truth (to
second order), which tells one odd movie from a frame that is overconfident in every movie. And per
seed the largest ``|z|`` of a block of 4 consecutive frames (``Σ_block g / sqrt(Σ_block h)``, one axis:
a common pull on several frames, e.g. at the end of the movie), with its first frame and axis.

``--heldout`` takes the held-out seeds instead: a diagnosis of where a scored held-out movie went
wrong, for use only after its final scoring (it changes nothing, but what it shows must not be tuned
against).

Usage::

    python benchmarks/likelihood_calibration.py [--cache DIR] [--no-overlap] [--heldout]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import quality as bq  # benchmarks/quality.py: regimes, seeds, sessions, Config

from gpu.local import weight_overlaps
from gpu.local_model import curvature, data_term
from streamer import pipeline as pl
from streamer.sim.score import pick_ids
from streamer.sim.simulate import hard_params, load_truth, movie_filename, recommended_box


def movie_z(cfg: Any, root: Path, name: str, overlap: bool) -> np.ndarray:
    """(F, 2) ``z`` of one movie (module docstring)."""
    g, h = movie_score(cfg, root, name, overlap)
    return g / np.sqrt(h)[:, None]


def worst_block(g: np.ndarray, h: np.ndarray, size: int = 4) -> tuple[float, int, str]:
    """(z, first frame, axis) of the block of ``size`` consecutive frames with the largest ``|z|``."""
    window = np.lib.stride_tricks.sliding_window_view
    z = window(g, size, axis=0).sum(axis=-1) / np.sqrt(window(h, size).sum(axis=-1))[:, None]
    i, a = np.unravel_index(np.abs(z).argmax(), z.shape)
    return float(z[i, a]), int(i), "xy"[a]


def movie_score(cfg: Any, root: Path, name: str, overlap: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ_p g_pt (F, 2), Σ_p h_pt (F,))`` of one movie at the true trajectories (module docstring)."""
    truth = load_truth(root, name)
    est = pl.estimate(cfg, str(root / "movies" / name), None, xp=np, workspace=pl.Workspace(), clock=pl.StageClock(np))
    frames, apix = est.frames, est.frames.apix
    spectra, inside = pl.local_spectra(cfg, frames, est.located.positions, est.motion)
    pos = est.located.positions[inside]
    if overlap:
        weight_overlaps(spectra, pos)
    pid = pick_ids(pos, truth, 0.01)
    s = est.motion.shifts_px - est.motion.shifts_px.mean(axis=0)
    true = np.zeros((len(pos), *s.shape))  # local shifts on top of the motion stage's s (junk: 0)
    tr = truth["trajectories"][pid[pid >= 0]] / apix
    true[pid >= 0] = tr - tr.mean(axis=1, keepdims=True) - s[None]
    _, g = data_term(spectra, true[:, spectra.frames])
    return np.asarray(g).sum(axis=0), np.asarray(curvature(spectra)).sum(axis=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", help="simulated sessions folder (as benchmarks/quality.py --cache)")
    ap.add_argument("--no-overlap", action="store_true", help="without the overlap weights (the likelihood before them)")
    ap.add_argument("--heldout", action="store_true", help="the held-out seeds (diagnosis after their final scoring only)")
    args = ap.parse_args(argv)
    print("| regime | seeds | z std, frames 8+ | z std, frame 0 | frame 0 z² per seed | largest 4-frame block z per seed (first frame, axis) |")
    print("|---|---|---|---|---|---|")
    for name, over in bq.REGIMES.items():
        seeds = [bq.HELDOUT_SEEDS[name]] if args.heldout else list(bq.TUNING_SEEDS)
        box = max(recommended_box(hard_params(seed=s, movies=1, **over)) for s in seeds)
        zs, blocks = [], []
        for seed in seeds:
            params = hard_params(seed=seed, movies=1, **over)
            with tempfile.TemporaryDirectory(prefix="lmc-calibration-") as tmp:
                root = bq.simulated_session(params, Path(tmp), args.cache)
                cfg = bq.session_config(root, params, {"box": box})
                g, h = movie_score(cfg, root, movie_filename(params, 0), not args.no_overlap)
            zs.append(g / np.sqrt(h)[:, None])
            blocks.append("{:+.1f} ({}, {})".format(*worst_block(g, h)))
        z = np.stack(zs)
        chi2 = " / ".join(f"{v:.1f}" for v in (z[:, 0] ** 2).sum(axis=-1))
        print(f"| {name} | {','.join(map(str, seeds))} | {z[:, 8:].std():.2f} | {np.sqrt((z[:, 0] ** 2).mean()):.2f} | {chi2} | "
              f"{' / '.join(blocks)} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
