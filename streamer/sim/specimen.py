"""Synthetic specimen for ``lmc simulate``: a protein-like pseudo-atom model, its projections and a
weak ice texture.

Model: one pseudo-atom per residue (110 Da), so ``mass_kda`` sets the count ``N = 1000 m / 110``.
The atoms fill 1-4 ellipsoidal domains (one per ~100 kDa, unequal sizes, axis ratios 1 : 0.6-0.9 :
0.45-0.75) at protein density 0.81 Da/Å³ (136 Å³ per residue), joined in a bent chain that
overlaps by 20 %: compact like a globular protein but clearly non-spherical. The radius of
gyration then comes out near the empirical ``Rg ≈ 2.2 N^0.38 Å`` of globular proteins (44 Å at
300 kDa), above the ``2.47 N^(1/3) Å`` of a solid sphere of the same volume (35 Å).

Contrast (weak-phase approximation): each pseudo-atom is a 2-D Gaussian (σ = 1.2 Å) whose
integral is the phase of one residue, ``σ_e · ΔV · v_res`` with ``σ_e`` the interaction constant
(6.53e-4 rad/(V·Å) at 300 kV), ΔV = 2.4 V the excess potential of protein over vitreous ice
(protein ≈ 7 V, ice ≈ 4.6 V) and ``v_res`` = 136 Å³: 0.21 rad·Å² per residue at 300 kV. The image
contrast is ``-2 F⁻¹[φ̂ · CTF]`` (gpu/ctf.py). What this gives for a 300 kDa particle is stated in
streamer/sim/simulate.py.
"""

from __future__ import annotations

import numpy as np

from gpu import backend
from gpu.ctf import electron_wavelength
from streamer.errors import ConfigError

RESIDUE_DA = 110.0
PROTEIN_DA_PER_A3 = 0.81
EXCESS_POTENTIAL_V = 2.4
ATOM_SIGMA_A = 1.2


def interaction_constant(kv: float) -> float:
    """σ_e in rad/(V·Å): ``2π / (λ V) · (m c² + e V) / (2 m c² + e V)`` (6.53e-4 at 300 kV)."""
    volts = kv * 1e3
    mc2 = 510998.95  # electron rest energy, eV
    return float(2 * np.pi / (electron_wavelength(kv) * volts) * (mc2 + volts) / (2 * mc2 + volts))


def residue_phase(kv: float) -> float:
    """Integrated phase of one residue (rad·Å²): σ_e · ΔV · (110 Da / 0.81 Da/Å³)."""
    return interaction_constant(kv) * EXCESS_POTENTIAL_V * RESIDUE_DA / PROTEIN_DA_PER_A3


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return random_rotations(1, rng)[0].astype(np.float64)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 3) float32 rotation matrices, uniform on SO(3) (normalised Gaussian quaternions)."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    rot = np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )
    return rot.astype(np.float32)


def protein_model(mass_kda: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) float32 pseudo-atom coordinates (Å), centre of mass at the origin (module docstring)."""
    if mass_kda <= 0:
        raise ConfigError(f"simulate: --mass-kda must be > 0 (got {mass_kda})")
    n = max(20, round(mass_kda * 1000.0 / RESIDUE_DA))
    n_dom = int(np.clip(round(mass_kda / 100.0), 1, 4))
    frac = rng.dirichlet(np.full(n_dom, 4.0))
    counts = np.maximum(np.floor(frac * n).astype(int), 1)
    counts[0] += n - counts.sum()
    atoms = []
    centre = np.zeros(3)
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    prev_radius = 0.0
    for i, c in enumerate(counts):
        volume = c * RESIDUE_DA / PROTEIN_DA_PER_A3
        ratios = np.array([1.0, rng.uniform(0.6, 0.9), rng.uniform(0.45, 0.75)])
        semi = ratios * (3 * volume / (4 * np.pi * ratios.prod())) ** (1 / 3)
        radius = float(semi.mean())
        if i:
            # keep the chain going roughly the same way (elongated), bent by up to ~60 degrees
            bend = rng.standard_normal(3) * 0.6
            direction = direction + bend - direction * (direction @ bend)
            direction /= np.linalg.norm(direction)
            centre = centre + direction * 0.8 * (prev_radius + radius)
        v = rng.standard_normal((c, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        pts = v * rng.random((c, 1)) ** (1 / 3) * semi
        atoms.append(pts @ _random_rotation(rng).T + centre)
        prev_radius = radius
    xyz = np.concatenate(atoms)
    return (xyz - xyz.mean(axis=0)).astype(np.float32)


def radius_of_gyration(atoms: np.ndarray) -> float:
    """Rg (Å) of equal-weight pseudo-atoms ``(N, 3)``."""
    d = atoms - atoms.mean(axis=0)
    return float(np.sqrt((d * d).sum(axis=1).mean()))


def max_diameter(atoms: np.ndarray) -> float:
    """Twice the largest distance of an atom from the centre of mass (Å): bounds every projection."""
    return float(2 * np.sqrt(((atoms - atoms.mean(axis=0)) ** 2).sum(axis=1).max()))


def project_atoms(
    atoms: np.ndarray,
    rotations: np.ndarray,
    box: int,
    apix: float,
    phase_per_atom: float,
    sigma_A: float = ATOM_SIGMA_A,
) -> np.ndarray:
    """Projected phase (rad per pixel) of rotated pseudo-atoms, ``(P, box, box)`` float32.

    Atom ``r`` lands at ``(R r)_xy / apix`` pixels from index ``box // 2`` (the model's centre of mass
    at the box centre) and is a point-sampled 2-D Gaussian of width ``sigma_A`` whose integral is
    ``phase_per_atom`` rad·Å² (truncated at ±3σ). Separable tap weights, one scatter-add per group of particles.
    """
    s = sigma_A / apix
    r = int(np.ceil(3.0 * s))
    taps = np.arange(-r, r + 2, dtype=np.int64)
    norm = np.float32(phase_per_atom / (2 * np.pi * sigma_A**2))  # Gaussian peak (rad) for the right integral
    out = np.zeros(rotations.shape[0] * box * box, np.float64)
    # particles in groups: the (group, N, T, T) tap arrays stay ~ 32 MB
    group = max(1, int(4_000_000 // (atoms.shape[0] * taps.size**2)))
    for a in range(0, rotations.shape[0], group):
        rot = rotations[a : a + group, :2, :].astype(np.float32)
        xy = np.einsum("pij,nj->pni", rot, atoms.astype(np.float32)) / np.float32(apix) + np.float32(box // 2)
        idx = np.floor(xy).astype(np.int64)[..., None] + taps  # (g, N, 2, T): pixel indices, x then y
        g = np.exp(-((idx - xy[..., None]) ** 2) / np.float32(2 * s * s)).astype(np.float32)
        g *= (idx >= 0) & (idx < box)
        np.clip(idx, 0, box - 1, out=idx)
        weights = (g[..., 1, :, None] * g[..., 0, None, :]) * norm  # (g, N, T, T): rows y, cols x
        first = (a + np.arange(rot.shape[0]))[:, None, None, None] * box
        flat = (first + idx[..., 1, :, None]) * box + idx[..., 0, None, :]
        out += np.bincount(flat.ravel(), weights=weights.ravel(), minlength=out.size)
    return out.reshape(rotations.shape[0], box, box).astype(np.float32)


def texture_field(shape: tuple[int, int], apix: float, rng: np.random.Generator, max_res_A: float = 8.0) -> np.ndarray:
    """Static specimen texture (ice thickness / carbon-like), ``shape`` float32, zero mean, unit RMS.

    Gaussian random field with amplitude spectrum ``1 / sqrt(k² + k0²)`` (k0 = 1/200 Å⁻¹: large-scale
    thickness variation) rolled off smoothly to zero at ``max(max_res_A, 4 apix)`` so that bilinear
    warping stays accurate. Periodic on ``shape``.
    """
    h, w = shape
    noise = rng.standard_normal(shape).astype(np.float32)
    kmax = 1.0 / max(max_res_A, 4.0 * apix)
    ky = np.fft.fftfreq(h)[:, None] / apix
    kx = np.fft.rfftfreq(w)[None, :] / apix
    k = np.sqrt(kx * kx + ky * ky)
    amp = 1.0 / np.sqrt(k * k + (1.0 / 200.0) ** 2)
    taper = np.clip((kmax - k) / (0.25 * kmax), 0.0, 1.0)
    amp *= np.sin(0.5 * np.pi * taper) ** 2
    amp[0, 0] = 0.0
    field = backend.irfft2(backend.rfft2(noise) * amp.astype(np.float32), s=shape)
    return (field / field.std()).astype(np.float32)


def ice_field(shape: tuple[int, int], apix: float, corr_A: float, rng: np.random.Generator, max_res_A: float = 8.0) -> np.ndarray:
    """Plain vitreous ice: a thickness-like texture, ``shape`` float32, zero mean, unit RMS.

    Gaussian random field with an exponential covariance ``exp(-r / corr_A)``, whose 2-D power
    spectrum is ``∝ (1 + (2π corr_A k)²)^(-3/2)`` (a Matérn field of smoothness ½): smooth over
    ``corr_A`` with little power at high resolution (at 20 Å, 300 Å correlation length: ~1e-3 of the
    low-resolution amplitude, against ~0.1 for :func:`texture_field`), so it gives the full-frame
    alignment little to lock on to. Rolled off to zero at ``max(max_res_A, 4 apix)`` as
    :func:`texture_field`. Periodic on ``shape``.
    """
    h, w = shape
    noise = rng.standard_normal(shape).astype(np.float32)
    kmax = 1.0 / max(max_res_A, 4.0 * apix)
    k = np.sqrt((np.fft.rfftfreq(w)[None, :] / apix) ** 2 + (np.fft.fftfreq(h)[:, None] / apix) ** 2)
    amp = (1.0 + (2 * np.pi * corr_A * k) ** 2) ** -0.75
    amp *= np.sin(0.5 * np.pi * np.clip((kmax - k) / (0.25 * kmax), 0.0, 1.0)) ** 2
    amp[0, 0] = 0.0
    field = backend.irfft2(backend.rfft2(noise) * amp.astype(np.float32), s=shape)
    return (field / field.std()).astype(np.float32)
