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

Two references that need no orientation, or a set of orientations that is not the particle's own:

- **the rotational average** of the particle's noise-free image (per particle: the best a
  rotationally symmetric reference, e.g. the movie's own mean particle, could be); its information
  is that of a misspecified mean (below) and is *added* to the reference-free one, since the rest of
  the particle is still aligned without a reference;
- **2-D class templates** (``--classes``; their information is also added to the reference-free
  one): projections of the true specimen at K random views
  (uniform on SO(3)), no CTF, band-limited like the reference, as class averages of a 2-D
  classification would be. Each particle takes the view and in-plane angle (10° steps, then 1°
  around the best) whose CTF-multiplied template correlates best with its image plus the noise of
  the movie's whole exposure (its own defocus known, as from CTF estimation). Optimistic: the
  templates are noise-free, exact projections, and the particle's centre is known.

A template ``μ`` that is not the particle's image ``f`` is a misspecified mean: aligning against it,
the shift's sensitivity is ``Σ c_k Re(μ* f)`` and the score's variance ``Σ c_k |μ|²`` (``c_k`` the
per-coefficient Fisher weight of frame t), so its information is ``(Σ c_k Re(μ* f))² / Σ c_k |μ|²``,
``≤ Σ c_k |f|²`` (Cauchy-Schwarz, equality for ``μ ∝ f``).

All are summed over the true particles among the picks (junk picks carry none against a reference)
and turned into the posterior standard deviation of ``s + c`` per frame with the product's own prior
and background share (:func:`gpu.local.common_uncertainty`). The product's figure is lmc's own
(``LocalTrajectories.common_sd``). Sessions: those of ``benchmarks/quality.py`` (tuning seeds).

Usage::

    python benchmarks/reference_information.py --cache /tmp/lmc-q [--regimes default,weak-150kDa] [--seeds 1] [--classes 50,200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as bq  # benchmarks/quality.py: regimes, seeds, sessions, Config

from gpu.ctf import ctf_2d
from gpu.dose import dose_weights
from gpu.local import common_only_model, common_uncertainty, frame_curvature
from streamer import pipeline as pl
from streamer.sim import score
from streamer.sim import simulate as sim
from streamer.sim.simulate import hard_params, load_truth, movie_filename, recommended_box, truth_particles
from streamer.sim.specimen import project_atoms, random_rotations, residue_phase

PSI_COARSE = 10.0  # degrees: in-plane search step, then 1° steps within ±PSI_COARSE/2 of the best


def half_plane(b: int, apix: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rfft2 half plane of a (b, b) image: ``|k|²`` (cycles/px)², ``|k|`` (1/Å), and ``mult`` (2 for
    the conjugate twins a half plane stands for, 1 on the kx = 0 and Nyquist columns)."""
    ky = np.fft.fftfreq(b)[:, None]
    kx = np.fft.rfftfreq(b)[None, :]
    k2 = kx**2 + ky**2
    mult = np.where((np.arange(kx.size) == 0) | (np.arange(kx.size) == b // 2), 1.0, 2.0)[None, :]
    return k2, np.sqrt(k2) / apix, mult


def fisher_weights(b: int, apix: float, n_frames: int, dose: float, pre: float, kv: float,
                   resolution: float) -> np.ndarray:
    """(F, b, b//2+1) ``c_k``: frame t's Fisher information for a shift per unit ``|F(k)|²`` of a
    noise-free image's rfft2, x and y averaged: ``D a² q_t² (2π)² |k|² / 2 · mult / b²``
    (:func:`half_plane`) within ``resolution`` Å."""
    k2, kmag, mult = half_plane(b, apix)
    band = kmag <= 1.0 / resolution
    q = dose_weights(kmag, n_frames, dose, pre, kv, normalize=False)  # (F, b, b//2+1)
    # Parseval: Σ_pixels |∂_x f|² = (1/N) Σ_k (2π kx)² |F(k)|² over the full plane
    grad = (2 * np.pi) ** 2 * k2 / 2 * mult * band / b**2  # x and y averaged
    return dose * apix**2 * q**2 * grad


def reference_information(images: np.ndarray, apix: float, n_frames: int, dose: float, pre: float, kv: float,
                          resolution: float) -> np.ndarray:
    """(P, F) 1/px²: ``D a² Σ_pixels |∇ image_t|² / 2`` (x and y averaged) for noise-free images (P, b, b)
    in contrast units, each frame's exposure filter applied, band-limited to ``resolution`` Å."""
    c = fisher_weights(images.shape[-1], apix, n_frames, dose, pre, kv, resolution)
    power = np.abs(np.fft.rfft2(images)) ** 2  # (P, b, b//2+1)
    return np.einsum("pyx,fyx->pf", power, c)


def mismatched_information(truth_ft: np.ndarray, ref_ft: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(P, F) information about a shift when aligning against a reference ``μ`` that is not the image
    ``f``: ``(Σ_k c_k Re(μ* f))² / Σ_k c_k |μ|²`` (module docstring). ``truth_ft``, ``ref_ft``: (P, b, b//2+1)
    rfft2 of ``f`` and ``μ``; ``c``: (F, b, b//2+1) :func:`fisher_weights`."""
    cross = np.einsum("pyx,fyx->pf", (np.conj(ref_ft) * truth_ft).real, c)
    norm = np.einsum("pyx,fyx->pf", np.abs(ref_ft) ** 2, c)
    return np.where(norm > 0, cross**2 / np.where(norm > 0, norm, 1.0), 0.0)


def rotational_average(images: np.ndarray) -> np.ndarray:
    """(P, b, b) each image's average over rotations about the box centre (index b//2): the ring
    average of its transform (real for a real image), on rings of one Fourier pixel."""
    b = images.shape[-1]
    ft = np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1)))
    k = np.fft.fftfreq(b) * b
    ring = np.rint(np.hypot(k[:, None], k[None, :])).astype(np.int64).ravel()
    count = np.bincount(ring)
    out = np.empty(images.shape, dtype=np.float64)
    for p in range(len(images)):
        prof = np.bincount(ring, ft[p].real.ravel(), len(count)) / count
        out[p] = np.fft.fftshift(np.fft.ifft2(prof[ring].reshape(b, b)).real, axes=(-2, -1))
    return out


def in_plane(rotations: np.ndarray, psi_deg: np.ndarray) -> np.ndarray:
    """(V, A, 3, 3) ``Rz(ψ) R``: each view turned in the image plane by each angle (degrees)."""
    c, s = np.cos(np.radians(psi_deg)), np.sin(np.radians(psi_deg))
    rz = np.zeros((len(psi_deg), 3, 3))
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1], rz[:, 2, 2] = c, -s, s, c, 1.0
    return np.einsum("aij,vjk->vaik", rz, rotations.astype(np.float64)).astype(np.float32)


def best_templates(noisy_ft: np.ndarray, ctf: np.ndarray, project: Any, views: np.ndarray, band: np.ndarray,
                   mult: np.ndarray) -> np.ndarray:
    """(P, b, b//2+1) for each particle the CTF-multiplied template of highest normalised correlation
    with its (noisy) image over ``band``: first over ``views`` × in-plane angles of ``PSI_COARSE``
    steps, then 1° steps around the best. ``project(rotations (n, 3, 3)) -> (n, b, b//2+1)`` rfft2 of
    the CTF-free templates; ``ctf``: (P, b, b//2+1)."""
    w = (band * mult)[band]  # (K,) over the band's coefficients only
    y = ctf[:, band] * noisy_ft[:, band] * w  # (P, K): the correlation's particle side
    c2 = np.abs(ctf[:, band]) ** 2 * w  # (P, K): its normalisation's

    def scores(t: np.ndarray) -> np.ndarray:
        """(n, P) normalised correlations of templates t (n, K) with every particle."""
        num = (np.conj(t) @ y.T).real
        den = np.sqrt(np.abs(t) ** 2 @ c2.T)
        return num / np.maximum(den, 1e-30)

    n_psi = round(360 / PSI_COARSE)
    coarse = in_plane(views, np.arange(n_psi) * PSI_COARSE).reshape(-1, 3, 3)
    best = np.full(len(y), -np.inf)
    idx = np.zeros(len(y), dtype=np.int64)
    for a in range(0, len(coarse), 256):
        cc = scores(project(coarse[a : a + 256])[:, band])
        j = cc.argmax(axis=0)
        better = cc[j, np.arange(len(y))] > best
        best[better] = cc[j, np.arange(len(y))][better]
        idx[better] = a + j[better]
    v, a = np.divmod(idx, n_psi)
    steps = np.arange(-PSI_COARSE / 2, PSI_COARSE / 2 + 1)
    out = np.zeros(ctf.shape, dtype=np.complex128)
    for p in range(len(y)):  # the particle's own 1° neighbourhood of its best coarse angle
        t = project(in_plane(views[v[p] : v[p] + 1], a[p] * PSI_COARSE + steps)[0])
        cc = scores(t[:, band])[:, p]
        out[p] = t[int(np.argmax(cc))] * ctf[p]
    return out


def template_information(truth: dict[str, Any], ids: np.ndarray, images: np.ndarray, apix: float, classes: int,
                         resolution: float, c: np.ndarray, seed: int) -> np.ndarray:
    """(P, F) information against the best of ``classes`` 2-D class templates (module docstring) for the
    true particles ``ids`` with noise-free images (P, b, b); ``c``: :func:`fisher_weights`."""
    params = truth["params"]
    b = images.shape[-1]
    _, kmag, mult = half_plane(b, apix)
    band = kmag <= 1.0 / resolution
    # the simulator's specimen (benchmark-only access to its private session object)
    atoms = sim._session(params).atoms
    phase = residue_phase(params.kv)

    def project(rot: np.ndarray) -> np.ndarray:
        return np.fft.rfft2(project_atoms(atoms, rot, b, apix, phase)) * -2.0 * band

    ctf = ctf_2d(b, b, apix, truth["defocus_u"][ids], truth["defocus_v"][ids], truth["defocus_angle"][ids],
                 params.kv, params.cs, params.amplitude_contrast)
    rng = np.random.default_rng([seed, classes])
    views = random_rotations(classes, rng)
    # the particle as the whole exposure shows it: Poisson noise of variance 1/(D_total a²) per pixel
    # in contrast units (no damage: optimistic)
    total = params.dose_per_frame * params.frames
    noisy = images + rng.standard_normal(images.shape) / np.sqrt(total * apix**2)
    templates = best_templates(np.fft.rfft2(noisy), ctf, project, views, band, mult)
    return mismatched_information(np.fft.rfft2(images), templates, c)


def run_movie(regime: str, seed: int, cache: str, resolutions: list[float], classes: list[int]) -> dict[str, np.ndarray]:
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
        # orientation-free and class references, at the first resolution
        c = fisher_weights(spec.box, frames.apix, f, cfg.dose_per_frame, cfg.pre_exposure, cfg.kv, resolutions[0])
        sym = mismatched_information(np.fft.rfft2(images), np.fft.rfft2(rotational_average(images)), c)
        found = {"sym": h_free + sym}
        for k in classes:
            found[f"cls{k}"] = h_free + template_information(truth, ids, images, frames.apix, k, resolutions[0], c, seed)
        for key, h in found.items():
            out[f"{key}_info"] = h.sum(0) / frames.apix**2
            out[f"{key}_sd"] = common_uncertainty(model, h) * frames.apix
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
    ap.add_argument("--classes", default="50,200", help="comma list of the number of 2-D class templates ('' for none)")
    ap.add_argument("--cache", help="the session cache of benchmarks/quality.py")
    args = ap.parse_args(argv)
    res = [float(r) for r in args.reference_resolution.split(",")]
    classes = [int(k) for k in args.classes.split(",") if k]
    extra = ["sym"] + [f"cls{k}" for k in classes]
    names = [f"rotational average + reference-free, {res[0]:g} Å"]
    names += [f"best of {k} class templates + reference-free, {res[0]:g} Å" for k in classes]
    head = ["regime", "seeds", "information /Å², frame 0 / 20 / last: reference-free"]
    head += [f"against a {r:g} Å reference" for r in res] + names
    head += ["sd of s + c, RMS (frame 0) Å: lmc", "reference-free, true particles only"]
    head += [f"{r:g} Å reference" for r in res] + names
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for regime in args.regimes.split(","):
        seeds = list(bq.TUNING_SEEDS[: args.seeds])
        movies = [run_movie(regime, s, args.cache, res, classes) for s in seeds]
        cells = [regime, ",".join(map(str, seeds)), info(movies, "free_info")]
        cells += [info(movies, f"ref{r:g}_info") for r in res] + [info(movies, f"{e}_info") for e in extra]
        cells += [sd(movies, "lmc_sd"), sd(movies, "free_sd")] + [sd(movies, f"ref{r:g}_sd") for r in res]
        cells += [sd(movies, f"{e}_sd") for e in extra]
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
