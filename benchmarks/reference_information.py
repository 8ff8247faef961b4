"""How much a reference would add to the common term: reference-free vs reference-based information.

lmc aligns particles without a reference: each frame against the sum of the particle's other frames
(:mod:`gpu.local_model`). Its information about a frame's shift is the curvature of that likelihood
(:func:`gpu.local.frame_curvature`), which is quadratic in the per-coefficient SNR where the sum of
the other frames is noisy. Against a known reference (the particle's noise-free image) the Fisher
information for frame ``t``'s shift along x is, for Poisson counts of mean ``μ = D a² (1 + image_t)``
(``D`` e/Å² per frame, ``a`` Å/px; variance ≈ ``D a²``, the image's contrast ≪ 1)::

    I_x = Σ_pixels (∂μ/∂x)² / var = D a² Σ_pixels (∂ image_t / ∂x)²        (1/px²)

with ``image_t`` the noise-free particle (CTF included, :func:`streamer.sim.simulate.truth_particles`)
attenuated by frame ``t``'s exposure filter (:func:`gpu.dose.dose_weights`), band-limited to
``--reference-resolution`` (what a reference from 2-D classes or a map would resolve). The
ice texture and the gain variation are left out, so this is the information of the particles alone.

Both are summed over the true particles among the picks (junk picks carry none against a reference)
and turned into the posterior standard deviation of ``s + c`` per frame with the product's own prior
and background share (:func:`gpu.local.common_uncertainty`). The product's figure is lmc's own
(``LocalTrajectories.common_sd``). Sessions: those of ``benchmarks/quality.py`` (tuning seeds).

Usage::

    python benchmarks/reference_information.py --cache /tmp/lmc-q [--regimes default,weak-150kDa] [--seeds 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as bq  # benchmarks/quality.py: regimes, seeds, sessions, Config

from gpu.dose import dose_weights
from gpu.local import common_only_model, common_uncertainty, frame_curvature
from streamer import pipeline as pl
from streamer.sim import score
from streamer.sim.simulate import hard_params, load_truth, movie_filename, recommended_box, truth_particles


def reference_information(images: np.ndarray, apix: float, n_frames: int, dose: float, pre: float, kv: float,
                          resolution: float) -> np.ndarray:
    """(P, F) 1/px²: ``D a² Σ_pixels |∇ image_t|² / 2`` (x and y averaged) for noise-free images (P, b, b)
    in contrast units, each frame's exposure filter applied, band-limited to ``resolution`` Å."""
    b = images.shape[-1]
    ky = np.fft.fftfreq(b)[:, None]
    kx = np.fft.rfftfreq(b)[None, :]
    k2 = kx**2 + ky**2  # cycles/px
    kmag = np.sqrt(k2) / apix  # 1/Å
    mult = np.where((np.arange(kx.size) == 0) | (np.arange(kx.size) == b // 2), 1.0, 2.0)[None, :]  # rfft half plane
    band = kmag <= 1.0 / resolution
    q = dose_weights(kmag, n_frames, dose, pre, kv, normalize=False)  # (F, b, b//2+1)
    power = np.abs(np.fft.rfft2(images)) ** 2  # (P, b, b//2+1)
    # Parseval: Σ_pixels |∂_x f|² = (1/N) Σ_k (2π kx)² |F(k)|² over the full plane
    grad = (2 * np.pi) ** 2 * k2 / 2 * mult * band / b**2  # x and y averaged
    return dose * apix**2 * np.einsum("pyx,fyx,yx->pf", power, q**2, grad)


def run_movie(regime: str, seed: int, cache: str, resolutions: list[float]) -> dict[str, np.ndarray]:
    params = hard_params(seed=seed, movies=1, **bq.REGIMES[regime])
    with tempfile.TemporaryDirectory(prefix="lmc-refinfo-") as tmp:
        root = bq.simulated_session(params, Path(tmp), cache)
        cfg = bq.session_config(root, params, {"box": recommended_box(params)})
        name = movie_filename(params, 0)
        truth = load_truth(root, name)
        est = pl.estimate(cfg, str(root / "movies" / name), None, xp=np, workspace=pl.Workspace(),
                          clock=pl.StageClock(np))
        frames = est.frames
        spec, share, ids = bq.true_particle_spectra(cfg, est, score.pick_ids(est.located.positions, truth, 0.01))
        f = frames.shape[0]
        model = common_only_model(len(ids), f, frames.apix, est.motion.posterior, share)
        h_free = frame_curvature(spec, f)  # the product's reference-free information, true particles only
        images = truth_particles(root, name, spec.box, frames.apix, ids=ids)
        out = {"free_info": h_free.sum(0) / frames.apix**2, "free_sd": common_uncertainty(model, h_free) * frames.apix,
               "lmc_sd": est.local.common_sd * frames.apix}
        for res in resolutions:
            h_ref = reference_information(images, frames.apix, f, cfg.dose_per_frame, cfg.pre_exposure, cfg.kv, res)
            out[f"ref{res:g}_info"] = h_ref.sum(0) / frames.apix**2
            out[f"ref{res:g}_sd"] = common_uncertainty(model, h_ref) * frames.apix
        return out


def info(movies: list[dict[str, np.ndarray]], key: str) -> str:
    """Information per frame (mean over movies) at frame 0, 20 and the last."""
    v = np.mean([m[key] for m in movies], axis=0)
    return f"{v[0]:.1f} / {v[min(20, len(v) - 1)]:.1f} / {v[-1]:.1f}"


def sd(movies: list[dict[str, np.ndarray]], key: str) -> str:
    """Posterior sd: RMS over frames and movies (frame 0's RMS over movies)."""
    rms = np.sqrt(np.mean([np.mean(m[key] ** 2) for m in movies]))
    f0 = np.sqrt(np.mean([m[key][0] ** 2 for m in movies]))
    return f"{rms:.2f} ({f0:.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regimes", default=",".join(bq.REGIMES))
    ap.add_argument("--seeds", type=int, default=len(bq.TUNING_SEEDS))
    ap.add_argument("--reference-resolution", default="8,4", help="comma list of the reference's resolution (Å)")
    ap.add_argument("--cache", help="the session cache of benchmarks/quality.py")
    args = ap.parse_args(argv)
    res = [float(r) for r in args.reference_resolution.split(",")]
    head = ["regime", "seeds", "information /Å², frame 0 / 20 / last: reference-free"]
    head += [f"against a {r:g} Å reference" for r in res]
    head += ["sd of s + c, RMS (frame 0) Å: lmc", "reference-free, true particles only"]
    head += [f"{r:g} Å reference" for r in res]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for regime in args.regimes.split(","):
        seeds = list(bq.TUNING_SEEDS[: args.seeds])
        movies = [run_movie(regime, s, args.cache, res) for s in seeds]
        cells = [regime, ",".join(map(str, seeds)), info(movies, "free_info")]
        cells += [info(movies, f"ref{r:g}_info") for r in res]
        cells += [sd(movies, "lmc_sd"), sd(movies, "free_sd")] + [sd(movies, f"ref{r:g}_sd") for r in res]
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
