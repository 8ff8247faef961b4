"""``lmc simulate``: a synthetic cryo-EM session (movies, gain, picks) with its ground truth.

Image formation, frame ``t`` (0-based), in order (docs/physics.md: dose weighting, realistic motion):

1. Specimen: particles (streamer/sim/specimen.py: pseudo-atom model, uniform random 3-D
   orientations, weak-phase contrast ``-2 F⁻¹[φ̂ · CTF]``, per-particle defocus = micrograph
   defocus + particle height ~ N(0, ``defocus_spread_A``)) and a static ice texture (RMS contrast
   ``ice_texture``, CTF of the micrograph applied).
2. Radiation damage: the signal's transform times ``exp(-N_t / (2 Ne(k)))``, ``N_t = dose · (t + 0.5)``
   the exposure at the middle of the frame, ``Ne`` from gpu.dose.critical_exposure (at ``kv``).
3. Motion: particle ``p`` sits at ``c_p + s_t + L(c_p, t) + r_p(t)`` (streamer/sim/motion.py); the ice
   texture is warped by ``s_t + L(x, t)``. Reference frame = central frame ``F // 2``.
4. Detector: expected counts ``dose · apix² · (1 + signal) · g`` with pixel sensitivity
   ``g ~ 1 + gain_sigma · N(0, 1)``, a few hot pixels (10-30x the mean, every frame), then Poisson.

Each particle is rendered in its own box (big enough for the CTF delocalisation up to
``render_res_A``; finer fringes wrap inside the box) and shifted by a Fourier phase, so sub-pixel
positions, damage and CTF are exact per particle; boxes are then added into the frame.

Contrast, measured with the defaults (300 kDa: 2727 pseudo-atoms, largest diameter 157 Å, Rg 47 Å;
300 kV, 1 Å/px, 1 e/Å²/frame, 40 frames, defocus 0.8-2.5 µm): a particle's noise-free, undamaged
image has an RMS contrast of ~0.02 over its 240 px extraction box (peak-to-peak ~0.27). Against
the Poisson noise (variance ``1 / counts`` per pixel in contrast units) the per-pixel SNR (signal
variance / noise variance) is ~0.016 over the box, ~0.055 within the particle, for the whole
40 e/Å², and ~0.0004 in one frame: a particle is invisible in a single frame and shows only in a
low-pass-filtered, motion-corrected sum, as real 300 kDa data. Not modelled (each would lower the
SNR further): detector MTF/DQE, inelastic loss in the ice, optical envelopes.

Files: ``movies/FoilHole_{h}_Data_{d}_fractions.{tiff,mrc,mrc.bz2}`` or ``..._EER.eer``;
``picks/<movie stem>_autopick.star`` (or ``.box``, ``_topaz.txt``, ``_picks.cs``);
``gain.mrc`` (``1/g``, multiply; MRC/TIFF) or ``gain.gain`` (``g``, divide; a TIFF, EER), stored in
the same array orientation as the frames (no flip or rotation needed); ``truth/<movie stem>.npz``;
``session.json``. Counts: TIFF uint8 LZW; MRC mode 0 (int8, counts clipped at 127); EER pages of
events, ``eer_raw_per_frame`` raw pages per output frame plus ``eer_leftover`` pages.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import map_coordinates

from gpu import backend
from gpu.ctf import ctf_2d, electron_wavelength
from gpu.dose import critical_exposure
from streamer.errors import ConfigError
from streamer.sim import motion as sim_motion
from streamer.sim import specimen as sim_specimen

FORMATS = ("tiff", "mrc", "mrc.bz2", "eer")
MOTION_MODELS = ("classic", "modes")
PICK_FORMATS = ("star", "box", "topaz", "cs")
_MOVIE_SUFFIX = {"tiff": "_fractions.tiff", "mrc": "_fractions.mrc", "mrc.bz2": "_fractions.mrc.bz2", "eer": "_EER.eer"}
_PICK_SUFFIX = {"star": "_autopick.star", "box": ".box", "topaz": "_topaz.txt", "cs": "_picks.cs"}
_CHUNK_PIXELS = 4 * 1024 * 1024  # frames are rendered in batches of about this many pixels (bounds memory)


@dataclass(frozen=True)
class SimParams:
    """Everything that defines a simulated session; equal params give identical files."""

    movies: int = 4
    frames: int = 40
    shape: tuple[int, int] = (1024, 1024)
    particles: int = 40  # true particles per movie, edge ones included (junk picks come on top)
    seed: int = 0
    format: str = "tiff"
    apix: float = 1.0
    dose_per_frame: float = 1.0
    kv: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.07
    mass_kda: float = 300.0
    defocus_um: tuple[float, float] = (0.8, 2.5)
    astigmatism_A: float = 300.0  # |U - V| drawn from [0, this]
    defocus_spread_A: float = 50.0  # std of particle heights in the ice
    drift_A: tuple[float, float] = (10.0, 30.0)  # full-frame path length per movie drawn from this range
    local_A: float = 3.0  # RMS over the field of view of the net local displacement over the movie
    local_corr_A: float = 1500.0
    particle_A: float = 0.5  # RMS net per-particle residual displacement over the movie
    pick_jitter_A: float = 1.5  # per-axis standard deviation of pick errors
    junk_picks: int = 2
    edge_particles: int = 2
    gain_sigma: float = 0.05
    hot_pixels: int = 4
    eer_raw_per_frame: int = 5
    eer_leftover: int = 3
    pick_format: str = "star"
    ice_texture: float = 0.02  # RMS contrast of the static ice texture
    render_res_A: float = 6.0  # CTF delocalisation kept (not wrapped) down to this resolution
    # the harder sessions of issue 10 (see hard_params): which motion model, amplitude ranges, plain ice
    motion_model: str = "classic"  # classic | modes (streamer/sim/motion.py)
    local_A_max: float = 0.0  # > local_A: the local amplitude is drawn per movie from [local_A, local_A_max]
    particle_A_max: float = 0.0  # > particle_A: the residual amplitude is drawn per movie from [particle_A, this]
    texture_corr_A: float = 0.0  # 0: carbon-like texture (1/k spectrum); > 0: plain ice of this correlation length

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "defocus_um", tuple(float(v) for v in self.defocus_um))
        object.__setattr__(self, "drift_A", tuple(float(v) for v in self.drift_A))

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"simulate: {msg}")

        need(self.movies >= 0 and self.frames >= 1, "movies must be >= 0 and frames >= 1")
        need(len(self.shape) == 2 and min(self.shape) >= 64, f"shape must be (h, w) with both >= 64 (got {self.shape})")
        need(self.particles >= 0 and self.junk_picks >= 0, "particles and junk_picks must be >= 0")
        need(0 <= self.edge_particles <= self.particles, "edge_particles must be between 0 and particles")
        need(self.format in FORMATS, f"format {self.format!r} must be one of {', '.join(FORMATS)}")
        need(
            self.pick_format in PICK_FORMATS,
            f"pick_format {self.pick_format!r} must be one of {', '.join(PICK_FORMATS)}",
        )
        need(self.apix > 0 and self.dose_per_frame > 0, "apix and dose_per_frame must be > 0")
        need(self.mass_kda > 0 and self.kv > 0, "mass_kda and kv must be > 0")
        need(0 <= self.amplitude_contrast < 1, "amplitude_contrast must be in [0, 1)")
        need(
            len(self.defocus_um) == 2 and 0 < self.defocus_um[0] <= self.defocus_um[1],
            "defocus_um must be (lo, hi) > 0",
        )
        need(len(self.drift_A) == 2 and 0 <= self.drift_A[0] <= self.drift_A[1], "drift_A must be (lo, hi) >= 0")
        need(
            min(self.local_A, self.particle_A, self.pick_jitter_A, self.gain_sigma, self.ice_texture) >= 0,
            "amplitudes must be >= 0",
        )
        need(self.local_corr_A > 0 and self.render_res_A > 0, "local_corr_A and render_res_A must be > 0")
        need(
            self.eer_raw_per_frame >= 1 and 0 <= self.eer_leftover < self.eer_raw_per_frame,
            "need eer_raw_per_frame >= 1 and 0 <= eer_leftover < eer_raw_per_frame",
        )
        need(self.hot_pixels >= 0, "hot_pixels must be >= 0")
        need(self.motion_model in MOTION_MODELS, f"motion_model {self.motion_model!r} must be one of {', '.join(MOTION_MODELS)}")
        need(min(self.local_A_max, self.particle_A_max, self.texture_corr_A) >= 0, "local_A_max, particle_A_max and texture_corr_A must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimParams:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})

    @property
    def reference_frame(self) -> int:
        return self.frames // 2


def hard_params(**overrides: Any) -> SimParams:
    """Sessions at least as hard as the held-out ones of issue 10 (``lmc simulate --hard``):

    global drift 5-30 Å, 60-85 % of it a fast exponential start (τ = 4-15 % of the exposure), the
    rest linear in a direction up to 60° away; a local field of doming, shear/rotation and four
    sinusoidal modes (0.6-1.5x the field of view), each with its own fast start (τ = 5-25 %),
    2.5-5 Å RMS net displacement, zero mean over the field; each particle's own smoothed random walk
    of 0.3-1.0 Å; 60 particles (+3 junk picks) on a 2048² frame; plain ice (1 % RMS before the CTF,
    ~300 Å correlation length, no carbon); 3 % gain variation; defocus 0.8-2.5 µm, astigmatism up to
    400 Å; picks jittered by 1.5 px per axis. ``overrides`` change any of it (e.g. ``mass_kda``).
    """
    apix = float(overrides.get("apix", 1.0))
    base: dict[str, Any] = {
        "shape": (2048, 2048), "particles": 60, "junk_picks": 3, "edge_particles": 2, "motion_model": "modes",
        "drift_A": (5.0, 30.0), "local_A": 2.5, "local_A_max": 5.0, "particle_A": 0.3, "particle_A_max": 1.0,
        "ice_texture": 0.01, "texture_corr_A": 300.0, "gain_sigma": 0.03, "defocus_um": (0.8, 2.5),
        "astigmatism_A": 400.0, "pick_jitter_A": 1.5 * apix, "format": "mrc",
    }
    base.update(overrides)
    return SimParams(**base)


# -- names -------------------------------------------------------------------------------------


def movie_filename(params: SimParams, index: int) -> str:
    """EPU-style name of movie ``index``: four acquisitions per foil hole."""
    return f"FoilHole_{index // 4 + 1}_Data_{index % 4 + 1}{_MOVIE_SUFFIX[params.format]}"


def file_stem(name: str) -> str:
    """``FoilHole_1_Data_2_fractions.mrc.bz2`` -> ``FoilHole_1_Data_2_fractions``."""
    for ext in (".mrc.bz2", ".tiff", ".mrc", ".eer"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _rng(params: SimParams, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=key))


def fft_size(n: float) -> int:
    """Smallest even integer >= n whose only prime factors are 2, 3 and 5."""
    m = max(2, int(np.ceil(n)))
    m += m % 2
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


# -- session-level objects (one specimen, one detector) ------------------------------------------


@dataclass(frozen=True)
class _Session:
    atoms: np.ndarray  # (N, 3) Å
    diameter_A: float
    box: int  # recommended extraction box (px)
    sensitivity: np.ndarray  # (h, w) g
    hot_xy: np.ndarray  # (n, 2) int (x, y)
    hot_level: np.ndarray  # (n,) expected counts per frame


@functools.lru_cache(maxsize=4)
def _session(params: SimParams) -> _Session:
    rng = _rng(params, 0)
    atoms = sim_specimen.protein_model(params.mass_kda, rng)
    diameter = sim_specimen.max_diameter(atoms)
    box = fft_size(1.5 * diameter / params.apix)
    h, w = params.shape
    g = (1.0 + params.gain_sigma * rng.standard_normal((h, w))).clip(0.2, None).astype(np.float32)
    hot = np.stack([rng.integers(0, w, params.hot_pixels), rng.integers(0, h, params.hot_pixels)], -1)
    level = rng.uniform(10, 30, params.hot_pixels) * params.dose_per_frame * params.apix**2
    return _Session(atoms, diameter, box, g, hot, level)


def render_box(params: SimParams, max_defocus_A: float) -> int:
    """Box (px) in which particles are rendered: the particle plus the CTF delocalisation
    ``2 λ Δf / r`` (Rosenthal & Henderson 2003) at ``r = render_res_A``; at least the extraction box."""
    ses = _session(params)
    deloc = 2 * electron_wavelength(params.kv) * max_defocus_A / max(params.render_res_A, 2 * params.apix)
    return max(ses.box, fft_size((ses.diameter_A + deloc) / params.apix))


def recommended_box(params: SimParams) -> int:
    """Extraction box (px): FFT-friendly, >= 1.5x the particle's largest diameter."""
    return _session(params).box


# -- per-movie geometry and truth ----------------------------------------------------------------


def _place(
    n: int, lo: np.ndarray, hi: np.ndarray, min_dist: float, avoid: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(n, 2) points uniform in the box [lo, hi) at least ``min_dist`` from each other and from
    ``avoid`` (dart throwing; the distance is relaxed when the field is too crowded)."""
    pts = np.zeros((0, 2))
    others = avoid.reshape(-1, 2)
    dist = min_dist
    while len(pts) < n:
        cand = rng.uniform(lo, hi, (4 * n + 16, 2))
        for c in cand:  # placement is set-up, not the hot path
            ref = np.concatenate([others, pts])
            if ref.size == 0 or np.min(np.hypot(*(ref - c).T)) >= dist:
                pts = np.concatenate([pts, c[None]])
                if len(pts) == n:
                    break
        dist *= 0.8
    return pts


def _geometry(params: SimParams, index: int) -> dict[str, Any]:
    """Everything about movie ``index`` except its pixels: positions, orientations, CTF, motion, picks."""
    ses = _session(params)
    rng = _rng(params, index + 1, 0)
    h, w = params.shape
    apix, ref = params.apix, params.reference_frame
    d_px = ses.diameter_A / apix
    n_edge = params.edge_particles
    n_in = params.particles - n_edge
    margin = ses.box / 2 + 2
    lo, hi = np.array([margin, margin]), np.array([w - margin, h - margin])
    if np.any(hi <= lo):
        lo, hi = np.array([d_px / 2, d_px / 2]), np.array([w - d_px / 2, h - d_px / 2])
    inner = _place(n_in, lo, hi, 0.8 * d_px, np.zeros((0, 2)), rng)
    # edge particles: centre inside the frame, 0.1-0.45 diameters from a random edge, apart from the others
    edge = np.zeros((0, 2))
    for _ in range(50):
        if len(edge) == n_edge:
            break
        side = rng.integers(0, 4, n_edge)
        depth = rng.uniform(0.1, 0.45, n_edge) * d_px
        along = rng.uniform(0, 1, n_edge)
        ex = np.where(side == 0, depth, np.where(side == 1, w - 1 - depth, along * (w - 1)))
        ey = np.where(side == 2, depth, np.where(side == 3, h - 1 - depth, along * (h - 1)))
        for c in np.stack([ex, ey], -1):
            taken = np.concatenate([inner, edge])
            if len(edge) < n_edge and (taken.size == 0 or np.hypot(*(taken - c).T).min() >= 0.8 * d_px):
                edge = np.concatenate([edge, c[None]])
    if len(edge) < n_edge:  # a crowded frame: accept overlaps
        edge = np.concatenate([edge, np.stack([ex, ey], -1)[: n_edge - len(edge)]])
    pos = np.concatenate([inner, edge])
    is_edge = np.arange(params.particles) >= n_in
    junk = _place(params.junk_picks, lo, hi, 1.0 * d_px, pos, rng)

    rot = sim_specimen.random_rotations(params.particles, rng)
    mic_def = rng.uniform(*params.defocus_um) * 1e4
    astig = rng.uniform(0, params.astigmatism_A)
    mic_u, mic_v, mic_ang = mic_def + astig / 2, mic_def - astig / 2, rng.uniform(0, 180)
    height = rng.normal(0, params.defocus_spread_A, params.particles)

    total = rng.uniform(*params.drift_A)
    local_A = rng.uniform(params.local_A, params.local_A_max) if params.local_A_max > params.local_A else params.local_A
    particle_A = (rng.uniform(params.particle_A, params.particle_A_max) if params.particle_A_max > params.particle_A
                  else params.particle_A)
    field: sim_motion.LocalField | sim_motion.ModeField
    if params.motion_model == "modes":
        s = sim_motion.burst_drift_trajectory(params.frames, params.dose_per_frame, total, ref, rng)
        field = sim_motion.mode_field(params.shape, apix, params.frames, params.dose_per_frame, local_A, ref, rng)
    else:
        s = sim_motion.fullframe_trajectory(params.frames, params.dose_per_frame, total, ref, rng)
        field = sim_motion.local_field(
            params.shape, apix, params.frames, params.dose_per_frame, local_A, params.local_corr_A, ref, rng
        )
    local = field.at(pos[:, 0] * apix, pos[:, 1] * apix).reshape(params.particles, params.frames, 2)
    resid = sim_motion.particle_residuals(params.particles, params.frames, particle_A, ref, rng)
    traj = s[None] + local + resid

    jit = rng.normal(0, params.pick_jitter_A / apix, pos.shape)
    picks = np.concatenate([pos + jit, junk])
    pick_particle = np.concatenate([np.arange(params.particles), np.full(len(junk), -1)])
    return {
        "positions": pos,
        "is_edge": is_edge,
        "rotations": rot,
        "defocus_u": mic_u + height,
        "defocus_v": mic_v + height,
        "defocus_angle": np.full(params.particles, mic_ang),
        "micrograph_defocus": np.array([mic_u, mic_v, mic_ang]),
        "frame_shifts": s,
        "local": local,
        "residual": resid,
        "trajectories": traj,
        "picks": picks,
        "pick_particle": pick_particle,
        "pick_is_junk": pick_particle < 0,
        "pick_is_edge": np.concatenate([is_edge, np.zeros(len(junk), bool)]),
        "_field": field,
    }


# -- rendering -------------------------------------------------------------------------------------


def _particle_spectra(
    params: SimParams,
    rotations: np.ndarray,
    du: np.ndarray,
    dv: np.ndarray,
    ang: np.ndarray,
    box: int,
    ctf: bool = True,
) -> np.ndarray:
    """(P, box, box//2+1) complex64 transforms of the particles' noise-free image contrast,
    ``-2 φ̂ · CTF``, each centred at index ``box // 2``."""
    ses = _session(params)
    phase = sim_specimen.project_atoms(ses.atoms, rotations, box, params.apix, sim_specimen.residue_phase(params.kv))
    spec = backend.rfft2(phase) * np.float32(-2.0)
    if ctf:
        spec *= ctf_2d(box, box, params.apix, du, dv, ang, params.kv, params.cs, params.amplitude_contrast)
    return spec.astype(np.complex64)


def _damage_rate(h: int, w: int, apix: float, kv: float) -> np.ndarray:
    """(h, w//2+1) ``1 / (2 Ne(k))`` on an rfft grid: the damage filter at exposure N is exp(-N * this)."""
    k = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]) / apix
    return (0.5 / critical_exposure(k, kv)).astype(np.float32)


def poisson_counts(lam: np.ndarray, rng: np.random.Generator, table_max: float = 8.0) -> np.ndarray:
    """Poisson samples of ``lam`` (any shape, float) as uint8 (clipped at 255).

    Pixels with ``lam <= table_max`` use inversion of the CDF with one uniform each (exact up to a
    tail probability < 1e-10; several times faster than Generator.poisson at ``lam ~ 1``): the first
    few terms for all pixels, the rest only for the few pixels still above the running CDF. The
    others (hot pixels, very high doses) use Generator.poisson.
    """
    lam = np.asarray(lam, dtype=np.float32)
    big = lam > table_max
    small = np.where(big, 0, lam).astype(np.float32).ravel()
    top = float(small.max(initial=0.0))
    n_terms = int(np.ceil(top + 6 * np.sqrt(top) + 6))
    n_bulk = min(n_terms, int(np.ceil(top + 2 * np.sqrt(top))) + 1)
    u = rng.random(small.shape, dtype=np.float32)
    p = np.exp(-small)
    cdf = p.copy()
    out = np.zeros(small.shape, np.uint8)

    def terms(
        u: np.ndarray, lam: np.ndarray, p: np.ndarray, cdf: np.ndarray, out: np.ndarray, j0: int, j1: int
    ) -> None:
        for j in range(j0, j1):
            more = u > cdf
            if j > top and not more.any():
                break
            out += more
            p *= lam
            p *= np.float32(1.0 / j)
            cdf += p

    terms(u, small, p, cdf, out, 1, n_bulk)
    rest = np.flatnonzero(u > cdf)
    if rest.size:
        tail = out[rest]
        terms(u[rest], small[rest], p[rest], cdf[rest], tail, n_bulk, n_terms + 1)
        out[rest] = tail
    out = out.reshape(lam.shape)
    if big.any():
        out[big] = np.minimum(rng.poisson(lam[big].astype(np.float64)), 255).astype(np.uint8)
    return out


class _Particles:
    """The particles of one movie, rendered frame by frame: each particle's contrast spectrum is
    damaged, shifted by the fractional part of its position in Fourier space, and its box added into
    a padded canvas at the integer part."""

    def __init__(self, params: SimParams, geo: dict[str, Any]) -> None:
        self.shape, apix = params.shape, params.apix
        box = max(render_box(params, float(np.max(geo[k], initial=0.0))) for k in ("defocus_u", "defocus_v"))
        self.box = box
        self.spectra = _particle_spectra(
            params, geo["rotations"], geo["defocus_u"], geo["defocus_v"], geo["defocus_angle"], box
        )
        self.rate = _damage_rate(box, box, apix, params.kv)
        self.fy = np.fft.fftfreq(box).astype(np.float32)
        self.fx = np.fft.rfftfreq(box).astype(np.float32)
        traj_px = geo["trajectories"] / apix
        self.pad = box // 2 + int(np.ceil(np.abs(traj_px).max(initial=0.0))) + 2
        where = geo["positions"][:, None, :] + traj_px + self.pad  # (P, F, 2) in the padded canvas
        self.whole = np.rint(where).astype(np.int64)
        self.frac = (where - self.whole).astype(np.float32)

    def frames(self, t: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        """(c, h, w) float32 contrast of the particles in frames ``t`` at mid-frame ``exposure`` (c,)."""
        (h, w), pad, box = self.shape, self.pad, self.box
        damage = np.exp(-exposure[:, None, None].astype(np.float32) * self.rate)  # (c, B, B//2+1)
        phx = np.exp(-2j * np.pi * self.frac[:, t, 0, None, None] * self.fx).astype(np.complex64)  # (P, c, 1, B//2+1)
        phy = np.exp(-2j * np.pi * self.frac[:, t, 1, None, None] * self.fy[:, None]).astype(np.complex64)
        spec = self.spectra[:, None] * damage[None]
        spec *= phx
        spec *= phy
        boxes = backend.irfft2(spec, s=(box, box))
        del spec
        canvas = np.zeros((len(t), h + 2 * pad, w + 2 * pad), np.float32)
        corner = self.whole[:, t] - box // 2
        # a strided slice-add per box is memory-bound and ~3x faster than a scatter (np.add.at or
        # bincount) over materialised flat indices; the Python overhead is ~1 us per box
        for p in range(corner.shape[0]):
            for i in range(len(t)):
                x0, y0 = corner[p, i]
                canvas[i, y0 : y0 + box, x0 : x0 + box] += boxes[p, i]
        return canvas[:, pad : pad + h, pad : pad + w]


class _Texture:
    """The ice texture of one movie: static in the reference frame, with the micrograph's CTF.

    Frame ``t`` shows ``T(x - s_t - L(x, t))``. The texture is band-limited to periods >= 4 px, so it
    is warped (bilinear) only on a grid of every 2nd pixel, padded by a tapered margin, and brought
    back to every pixel by zero-padding its transform, which also applies the frame's damage filter.
    The warp uses ``L`` at the frame pixel rather than at the reference point: the difference,
    ``∇L · s``, is ~0.1 Å for the default fields.
    """

    MARGIN = 16  # coarse pixels of tapered margin around the frame

    def __init__(
        self,
        params: SimParams,
        geo: dict[str, Any],
        field_: sim_motion.LocalField | sim_motion.ModeField,
        rng: np.random.Generator,
    ) -> None:
        (h, w), apix, m = params.shape, params.apix, self.MARGIN
        self.shape, self.apix, self.profile = (h, w), apix, field_.profile.astype(np.float32)
        self.hc = (h + 1) // 2 + 2 * m
        self.wc = (w + 1) // 2 + 2 * m
        self.hc += self.hc % 2
        self.wc += self.wc % 2
        self.yc = (np.arange(self.hc) * 2 - 2 * m).astype(np.float32)  # frame pixel rows of the coarse grid
        self.xc = (np.arange(self.wc) * 2 - 2 * m).astype(np.float32)
        self.lgrid = field_.grids(self.xc * apix, self.yc * apix)  # (fields, 2 comps, hc, wc) Å
        self.shifts = geo["frame_shifts"].astype(np.float32)
        n_fields = len(self.profile)
        reach = np.abs(self.shifts).max(initial=0.0) + float(
            (np.abs(self.profile).max(axis=1) * np.abs(self.lgrid).reshape(n_fields, -1).max(axis=1)).sum()
        )
        self.tpad = int(np.ceil(reach / apix)) + 2 * m + 4
        th, tw = h + 2 * self.tpad, w + 2 * self.tpad
        mu, mv, mang = geo["micrograph_defocus"]
        ctf = ctf_2d(th, tw, apix, mu, mv, mang, params.kv, params.cs, params.amplitude_contrast)
        if params.texture_corr_A > 0:  # plain ice: ice_texture is its RMS contrast before the CTF
            ice = sim_specimen.ice_field((th, tw), apix, params.texture_corr_A, rng) * np.float32(params.ice_texture)
            self.texture = backend.irfft2(backend.rfft2(ice) * ctf, s=(th, tw)).astype(np.float32)
        else:  # carbon-like: ice_texture is the RMS contrast of the image (after the CTF)
            tex = backend.irfft2(backend.rfft2(sim_specimen.texture_field((th, tw), apix, rng)) * ctf, s=(th, tw))
            self.texture = (tex * np.float32(params.ice_texture / max(float(tex.std()), 1e-12))).astype(np.float32)
        ramp = np.sin(0.5 * np.pi * (np.arange(m) + 0.5) / m) ** 2
        wy = np.ones(self.hc, np.float32)
        wx = np.ones(self.wc, np.float32)
        wy[:m], wy[-m:], wx[:m], wx[-m:] = ramp, ramp[::-1], ramp, ramp[::-1]
        self.window = wy[:, None] * wx[None, :]
        self.rate = _damage_rate(2 * self.hc, 2 * self.wc, apix, params.kv)

    def frames(self, t: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        """(c, h, w) float32 contrast of the texture in frames ``t`` at mid-frame ``exposure`` (c,)."""
        (h, w), m, hc, wc = self.shape, self.MARGIN, self.hc, self.wc
        disp = self.shifts[t, :, None, None] + np.einsum("ct,cdhw->tdhw", self.profile[:, t], self.lgrid)
        rows = self.yc[:, None] - disp[:, 1] / self.apix + self.tpad
        cols = self.xc[None, :] - disp[:, 0] / self.apix + self.tpad
        coarse = map_coordinates(self.texture, np.stack([rows, cols]), order=1, mode="nearest", prefilter=False)
        spec = backend.rfft2((coarse * self.window).astype(np.float32))
        up = np.zeros((len(t), 2 * hc, wc + 1), np.complex64)
        # the coarse Nyquist row and column hold no texture (band limit), so they are left out
        up[:, : hc // 2, : wc // 2] = spec[:, : hc // 2, : wc // 2]
        up[:, -(hc // 2 - 1) :, : wc // 2] = spec[:, hc // 2 + 1 :, : wc // 2]
        up *= np.exp(-exposure[:, None, None].astype(np.float32) * self.rate)
        full = backend.irfft2(up, s=(2 * hc, 2 * wc)) * np.float32(4.0)
        return full[:, 2 * m : 2 * m + h, 2 * m : 2 * m + w]


def render_movie(params: SimParams, index: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Counts ``(F, h, w)`` uint8 of movie ``index`` and its truth dict (see :func:`simulate_session`)."""
    ses = _session(params)
    geo = _geometry(params, index)
    field_ = geo.pop("_field")
    particles = _Particles(params, geo) if params.particles else None
    texture = _Texture(params, geo, field_, _rng(params, index + 1, 2)) if params.ice_texture > 0 else None
    rng = _rng(params, index + 1, 1)
    exposure = sim_motion.mid_exposure(params.frames, params.dose_per_frame)
    counts = np.empty((params.frames, *params.shape), np.uint8)
    base = np.float32(params.dose_per_frame * params.apix**2)
    hx, hy = ses.hot_xy[:, 0], ses.hot_xy[:, 1]
    chunk = max(1, min(8, _CHUNK_PIXELS // (params.shape[0] * params.shape[1])))
    for start in range(0, params.frames, chunk):
        t = np.arange(start, min(start + chunk, params.frames))
        signal = np.zeros((len(t), *params.shape), np.float32)
        if particles is not None:
            signal += particles.frames(t, exposure[t])
        if texture is not None:
            signal += texture.frames(t, exposure[t])
        lam = base * ses.sensitivity * np.maximum(1.0 + signal, 0.0)
        lam[:, hy, hx] = ses.hot_level.astype(np.float32)
        counts[t] = poisson_counts(lam, rng)

    truth = {k: np.asarray(v) for k, v in geo.items()}
    truth.update(
        movie=movie_filename(params, index),
        index=index,
        reference_frame=params.reference_frame,
        atoms=ses.atoms.copy(),
        hot_pixels=ses.hot_xy.copy(),
        box=ses.box,
        render_box=particles.box if particles is not None else 0,
        diameter_A=ses.diameter_A,
        params=json.dumps(params.to_dict()),
    )
    return counts, truth


# -- writing movies -------------------------------------------------------------------------------

Callback = Callable[[int, int], None]


def _mrc_header(shape: tuple[int, int, int], apix: float, counts: np.ndarray) -> bytes:
    """MRC2014 header (1024 bytes) of an int8 image stack (mode 0, ISPG 0, mz 1), little-endian."""
    import mrcfile.dtypes

    hdr = np.zeros((), dtype=mrcfile.dtypes.HEADER_DTYPE)
    nz, ny, nx = shape
    hdr["nx"], hdr["ny"], hdr["nz"], hdr["mode"] = nx, ny, nz, 0
    hdr["mx"], hdr["my"], hdr["mz"] = nx, ny, 1
    hdr["cella"] = (nx * apix, ny * apix, apix)
    hdr["cellb"] = (90.0, 90.0, 90.0)
    hdr["mapc"], hdr["mapr"], hdr["maps"] = 1, 2, 3
    hdr["dmin"], hdr["dmax"] = float(counts.min(initial=0)), float(counts.max(initial=0))
    hdr["dmean"] = float(counts.mean()) if counts.size else 0.0
    hdr["rms"] = float(counts.std()) if counts.size else 0.0
    hdr["ispg"] = 0
    hdr["nversion"] = 20140
    hdr["map"] = b"MAP "
    hdr["machst"] = (0x44, 0x44, 0, 0)
    hdr["nlabl"] = 1
    hdr["label"][0] = b"lmc simulate".ljust(80)
    return hdr.tobytes()


def _frame_chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def write_movie(
    path: str | os.PathLike[str],
    counts: np.ndarray,
    fmt: str,
    chunk_callback: Callback | None = None,
    *,
    apix: float = 1.0,
    eer_raw_per_frame: int = 5,
    eer_leftover: int = 3,
    seed: int = 0,
    chunk_frames: int = 4,
) -> None:
    """Write counts ``(F, h, w)`` to ``path`` progressively: the file grows chunk by chunk (a reader
    sees a partial file) and ``chunk_callback(frames_done, frames_total)`` runs after each flushed chunk.

    ``fmt``: "tiff" (uint8, LZW, one page per frame), "mrc" (mode 0 int8 stack, header first with the
    full frame count), "mrc.bz2" (bzip2 of that MRC), "eer" (each frame's counts spread over
    ``eer_raw_per_frame`` raw pages, at most one electron per pixel per page as the format allows
    (streamer.formats.eer.split_counts: a pixel's electrons go to a random subset of the pages; counts above
    ``eer_raw_per_frame`` saturate, like coincidence loss), plus ``eer_leftover`` extra pages spread
    from the last frame; the finished file is copied into place in pieces, so it appears truncated first).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"{path}: unknown movie format {fmt!r} (known: {', '.join(FORMATS)})")
    counts = np.asarray(counts)
    if counts.ndim != 3:
        raise ValueError(f"{path}: counts must be (frames, h, w), got shape {counts.shape}")
    n = counts.shape[0]
    chunks = _frame_chunks(n, max(1, chunk_frames))
    report = chunk_callback or (lambda done, total: None)
    if fmt == "tiff":
        import tifffile

        with tifffile.TiffWriter(path) as tw:
            for a, b in chunks:
                for f in range(a, b):
                    page = np.minimum(counts[f], 255).astype(np.uint8)
                    tw.write(page, compression="lzw", photometric="minisblack", metadata=None)
                tw.filehandle.flush()
                report(b, n)
    elif fmt in ("mrc", "mrc.bz2"):
        data = np.minimum(counts, 127).astype(np.int8)
        header = _mrc_header(data.shape, apix, data)
        comp = bz2.BZ2Compressor(9) if fmt == "mrc.bz2" else None
        with open(path, "wb") as fh:
            fh.write(comp.compress(header) if comp else header)
            for a, b in chunks:
                raw = data[a:b].tobytes()
                fh.write(comp.compress(raw) if comp else raw)
                if comp and b == n:
                    fh.write(comp.flush())
                fh.flush()
                report(b, n)
            if comp and n == 0:
                fh.write(comp.flush())
    else:
        _write_eer(path, counts, eer_raw_per_frame, eer_leftover, seed, chunks, report)


def _write_eer(
    path: Path,
    counts: np.ndarray,
    per_frame: int,
    leftover: int,
    seed: int,
    chunks: list[tuple[int, int]],
    report: Callback,
) -> None:
    from streamer.formats import eer

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1_000_003,)))
    n = counts.shape[0]

    def page_events(page: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # a 0/1 page: one electron per hit pixel in a uniformly random cell of its 4x4 sub-pixel grid
        # (what eer.counts_to_events does, without its per-event sort over 16 cells: ~4x faster here)
        ys, xs = np.nonzero(page)
        cell = rng.integers(0, 16, len(xs))
        return 4 * xs + (cell & 3), 4 * ys + (cell >> 2)

    def events() -> Any:
        for frame in counts:
            for page in eer.split_counts(frame, per_frame, rng):
                yield page_events(page)
        if leftover and n:
            for k, page in enumerate(eer.split_counts(counts[-1], per_frame, rng)):
                if k < leftover:
                    yield page_events(page)

    with tempfile.TemporaryDirectory(prefix="lmc-sim-") as tmp:
        whole = Path(tmp) / path.name
        eer.write_eer(whole, events(), counts.shape[1:])
        size = whole.stat().st_size
        with open(whole, "rb") as src, open(path, "wb") as dst:
            for _, b in chunks:
                target = size * b // n if n else size
                shutil.copyfileobj(_Limited(src, target - dst.tell()), dst)
                dst.flush()
                report(b, n)
            shutil.copyfileobj(src, dst)  # nothing left unless there were no frames


class _Limited:
    """Read at most ``n`` bytes from ``fh`` (for copying a file in pieces)."""

    def __init__(self, fh: Any, n: int) -> None:
        self.fh, self.left = fh, max(0, n)

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.fh.read(size)
        self.left -= len(data)
        return data


# -- gain, picks, session -------------------------------------------------------------------------


def write_gain(out_dir: str | os.PathLike[str], params: SimParams) -> Path:
    """``gain.mrc`` = 1/g (multiply; MRC/TIFF movies) or ``gain.gain`` = g as a float32 TIFF
    (divide; EER). Same array orientation as the frames."""
    g = _session(params).sensitivity
    out = Path(out_dir)
    if params.format == "eer":
        import tifffile

        path = out / "gain.gain"
        tifffile.imwrite(path, g.astype(np.float32), photometric="minisblack")
    else:
        import mrcfile

        path = out / "gain.mrc"
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data((1.0 / g).astype(np.float32))
            m.voxel_size = params.apix
            # mrcfile stamps the creation time into label 0; a fixed label keeps the file a pure
            # function of the parameters (same seed -> same bytes)
            m.header.label[0] = b"lmc simulate: gain reference = 1 / pixel sensitivity (multiply)"
            m.header.nlabl = 1
    return path


def write_picks(out_dir: str | os.PathLike[str], params: SimParams, index: int, truth: dict[str, Any]) -> Path:
    """The pick file of movie ``index`` in ``params.pick_format`` (micrograph-level CTF columns)."""
    from streamer.formats import picks as pk

    movie = movie_filename(params, index)
    stem = file_stem(movie)
    path = Path(out_dir) / f"{stem}{_PICK_SUFFIX[params.pick_format]}"
    x, y = truth["picks"][:, 0], truth["picks"][:, 1]
    mu, mv, mang = truth["micrograph_defocus"]
    cols = {
        "rlnDefocusU": np.full(x.shape, mu),
        "rlnDefocusV": np.full(x.shape, mv),
        "rlnDefocusAngle": np.full(x.shape, mang),
    }
    if params.pick_format == "star":
        pk.write_star_coords(path, x, y, columns=cols)
    elif params.pick_format == "box":
        pk.write_box(path, x, y, int(truth["box"]))
    elif params.pick_format == "topaz":
        pk.write_topaz(path, [(stem, float(a), float(b), 1.0) for a, b in zip(x, y, strict=True)])
    else:
        pk.write_cs_picks(path, f"movies/{movie}", params.shape, x, y, columns=cols)
    return path


def write_one_movie(out_dir: str | os.PathLike[str], params: SimParams, index: int) -> dict[str, Any]:
    """Render movie ``index`` and write its movie, pick file and truth under ``out_dir``; returns its
    ``session.json`` entry."""
    out = Path(out_dir)
    counts, truth = render_movie(params, index)
    name = movie_filename(params, index)
    write_movie(
        out / "movies" / name,
        counts,
        params.format,
        apix=params.apix,
        eer_raw_per_frame=params.eer_raw_per_frame,
        eer_leftover=params.eer_leftover,
        seed=params.seed * 100_003 + index,
    )
    ppath = write_picks(out / "picks", params, index, truth)
    np.savez(out / "truth" / f"{file_stem(name)}.npz", **truth)
    return {
        "movie": f"movies/{name}",
        "picks": f"picks/{ppath.name}",
        "truth": f"truth/{file_stem(name)}.npz",
        "particles": int(params.particles),
        "picks_total": len(truth["picks"]),
    }


def recommended_settings(params: SimParams, gain_name: str) -> dict[str, Any]:
    """The lmc settings for a simulated session, config.yaml-shaped (``streamer.config.from_dict``
    accepts it); the gain path is relative to the session folder."""
    rec: dict[str, Any] = {
        "apix": params.apix,
        "dose_per_frame": params.dose_per_frame,
        "kv": params.kv,
        "cs": params.cs,
        "amplitude_contrast": params.amplitude_contrast,
        "box": recommended_box(params),
        "gain": {"file": gain_name, "mode": "divide" if params.format == "eer" else "multiply"},
        "picks": {"format": params.pick_format},
    }
    if params.format == "eer":
        rec["eer"] = {"fractions": params.frames}
    return rec


def simulate_session(
    out_dir: str | os.PathLike[str],
    params: SimParams,
    movie_callback: Callable[[int, Path], None] | None = None,
    workers: int = 1,
) -> Path:
    """Write a whole session to ``out_dir`` and return ``out_dir``:

    * ``movies/``: ``params.movies`` movies; ``picks/``: one pick file per movie;
    * ``gain.mrc`` or ``gain.gain`` (module docstring);
    * ``truth/<movie stem>.npz``: ``positions`` (P, 2) true reference-frame centres (x, y) px;
      ``is_edge`` (P,); ``rotations`` (P, 3, 3); ``defocus_u/v/angle`` (P,) per particle (Å, °);
      ``micrograph_defocus`` (3,); ``frame_shifts`` (F, 2) Å full-frame; ``local`` (P, F, 2) Å local
      field part; ``residual`` (P, F, 2) Å; ``trajectories`` (P, F, 2) Å = sum of the three;
      ``picks`` (Q, 2) px as written; ``pick_particle`` (Q,) index into the particles or -1;
      ``pick_is_junk``, ``pick_is_edge`` (Q,); ``atoms`` (N, 3) Å; ``hot_pixels`` (n, 2) (x, y); ``box``,
      ``render_box``, ``diameter_A``, ``reference_frame``; ``params`` (JSON);
    * ``session.json``: params, movies, and the recommended lmc settings.

    ``movie_callback(index, movie_path)`` runs after each movie is written (in index order).
    ``workers``: movies simulated in parallel (spawned) processes; 0 = one per CPU core when a movie
    is big enough (>= 10 M frame pixels) to be worth a process, else 1. The files do not depend on
    it. With ``workers != 1`` a calling script needs the ``if __name__ == "__main__":`` guard.
    """
    out = Path(out_dir)
    for sub in ("movies", "picks", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    gain = write_gain(out, params)
    if workers == 0:
        big = params.frames * params.shape[0] * params.shape[1] >= 10_000_000
        workers = (os.cpu_count() or 1) if big else 1
    n_workers = min(params.movies, workers)
    movies = []
    if n_workers <= 1:
        results: Any = (write_one_movie(out, params, i) for i in range(params.movies))
        pool = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: forking a process whose FFT thread pools are running is unsafe
        pool = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(write_one_movie, [out] * params.movies, [params] * params.movies, range(params.movies))
    try:
        for i, entry in enumerate(results):
            movies.append(entry)
            if movie_callback:
                movie_callback(i, out / entry["movie"])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    ses = _session(params)
    recommended = recommended_settings(params, gain.name)
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in recommended.items() if not isinstance(v, dict)]
    flags += [f"--gain {gain.name} --gain-mode {recommended['gain']['mode']} --picks-format {params.pick_format}"]
    if params.format == "eer":
        flags.append(f"--eer-fractions {params.frames}")
    info = {
        "params": params.to_dict(),
        "movies": movies,
        "recommended": recommended,
        "flags": " ".join(flags),
        "particle_diameter_A": ses.diameter_A,
        "reference_frame": params.reference_frame,
        "eer_pages": params.frames * params.eer_raw_per_frame + params.eer_leftover if params.format == "eer" else None,
    }
    (out / "session.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


# -- reading the truth ---------------------------------------------------------------------------------


def _truth_path(session_dir: Path, movie_stem: str) -> Path:
    name = Path(movie_stem).name
    direct = session_dir / "truth" / f"{file_stem(name)}.npz"
    if direct.is_file():
        return direct
    from streamer.formats.picks import match_key

    want = match_key(name)
    for cand in sorted((session_dir / "truth").glob("*.npz")):
        if match_key(cand.stem) == want:
            return cand
    raise FileNotFoundError(f"{session_dir / 'truth'}: no truth for movie {movie_stem!r}")


def load_truth(session_dir: str | os.PathLike[str], movie_stem: str) -> dict[str, Any]:
    """The truth dict of one movie (keys in :func:`simulate_session`); ``params`` as a SimParams.

    ``movie_stem`` may be the movie's file name, its stem, or the picks-style stem (``FoilHole_1_Data_2``).
    """
    path = _truth_path(Path(session_dir), movie_stem)
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, Any] = {k: z[k] for k in z.files}
    for k in ("index", "reference_frame", "box", "render_box"):
        out[k] = int(out[k])
    out["diameter_A"] = float(out["diameter_A"])
    out["movie"] = str(out["movie"])
    out["params"] = SimParams.from_dict(json.loads(str(out["params"])))
    return out


def _fourier_resize(img: np.ndarray, box: int) -> np.ndarray:
    """Crop (or zero-pad) ``(..., b, b)`` images to ``(..., box, box)`` in Fourier space (centre kept at b//2)."""
    b = img.shape[-1]
    if b == box:
        return img
    f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=(-2, -1))), axes=(-2, -1))
    out = np.zeros((*img.shape[:-2], box, box), np.complex128)
    m = min(b, box)
    src = slice(b // 2 - m // 2, b // 2 - m // 2 + m)
    dst = slice(box // 2 - m // 2, box // 2 - m // 2 + m)
    out[..., dst, dst] = f[..., src, src]
    res = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(out, axes=(-2, -1))), axes=(-2, -1)).real
    return (res * (box * box) / (b * b)).astype(np.float32)


def _crop_or_pad(img: np.ndarray, box: int) -> np.ndarray:
    """Centre ``(..., b, b)`` images in ``(..., box, box)`` keeping index b//2 at box//2."""
    b = img.shape[-1]
    out = np.zeros((*img.shape[:-2], box, box), np.float32)
    m = min(b, box)
    s0, d0 = b // 2 - m // 2, box // 2 - m // 2
    out[..., d0 : d0 + m, d0 : d0 + m] = img[..., s0 : s0 + m, s0 : s0 + m]
    return out


def truth_particles(
    session_dir: str | os.PathLike[str],
    movie_stem: str,
    box: int,
    apix: float,
    ids: np.ndarray | list[int] | None = None,
    ctf: bool = True,
) -> np.ndarray:
    """(n, box, box) float32 noise-free, undamaged images of the true particles ``ids`` (default all),
    each centred at its true reference-frame position (box centre = index ``box // 2``).

    Units and sign are those of the movie's contrast (expected counts = dose·apix²·(1 + image)):
    protein is dark at low resolution. ``ctf=False`` gives ``-2 φ`` (a perfect phase plate without
    CTF). Regenerated from the stored atoms and orientations in the simulation's render box, then
    cropped/zero-padded to ``box``; for ``apix`` different from the simulation's, rendered in a box of
    the same physical size and Fourier-cropped/padded to ``box``.
    """
    truth = load_truth(session_dir, movie_stem)
    params: SimParams = truth["params"]
    sel = np.arange(len(truth["positions"])) if ids is None else np.asarray(ids, dtype=np.int64)
    if sel.size and (sel.min() < 0 or sel.max() >= len(truth["positions"])):
        raise IndexError(f"{session_dir}: particle ids out of range 0..{len(truth['positions']) - 1}")
    spec = _particle_spectra(
        params,
        truth["rotations"][sel],
        truth["defocus_u"][sel],
        truth["defocus_v"][sel],
        truth["defocus_angle"][sel],
        truth["render_box"],
        ctf=ctf,
    )
    rb = truth["render_box"]
    img = backend.irfft2(spec, s=(rb, rb)).astype(np.float32)
    if abs(apix - params.apix) < 1e-6 * params.apix:
        return _crop_or_pad(img, box)
    phys = round(box * apix / params.apix / 2) * 2
    return _fourier_resize(_crop_or_pad(img, phys), box)
