"""Synthetic specimen motion for ``lmc simulate`` (docs/physics.md#realistic-motion), all in Å, trajectory convention of
gpu/__init__.py (a feature at ``p`` in the reference frame is at ``p + s_t`` in frame ``t``), zero at
the reference frame.

* Full-frame ``s_t``: a beam-induced burst whose speed decays as ``exp(-e / τ)`` (τ = 0.8-1.6
  e/Å², so ~90 % of it is done within 2-4 e/Å²), its direction turning by up to ±60°, plus slow
  linear stage drift; the burst is 60-85 % of the path between frame mid-points, and the whole
  is scaled so that this path length is the requested total.
* Local ``L(x, y, t) = g_fast(t) F_fast(x, y) + g_slow(t) F_slow(x, y)``: two smooth 2-D vector fields,
  each a Gaussian-process sample (random Fourier features, squared-exponential kernel of length
  ``corr_A``), with the field-of-view mean removed (that part *is* full-frame motion); ``g_fast =
  1 - exp(-e / τ_l)`` (τ_l = 1.5-3 e/Å², fastest early), ``g_slow`` linear in exposure. Scaled so the
  RMS over the field of view of ``|L(end) - L(start)|`` is ``amplitude_A``.
* Per-particle residual ``r_p(t)``: a random walk whose steps are white noise smoothed over ~2
  frames (smooth in time), scaled so the RMS over particles of ``|r_p(end) - r_p(start)|`` is
  ``amplitude_A``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from streamer.pipeline import path_length


def mid_exposure(n_frames: int, dose_per_frame: float) -> np.ndarray:
    """(F,) exposure (e/Å²) at the middle of each frame: ``dose * (f + 0.5)``."""
    return dose_per_frame * (np.arange(n_frames) + 0.5)


def fullframe_trajectory(
    n_frames: int, dose_per_frame: float, total_A: float, ref: int, rng: np.random.Generator
) -> np.ndarray:
    """(F, 2) full-frame trajectory (dx, dy) in Å with path length ``total_A``, zero at frame ``ref``."""
    e = mid_exposure(n_frames, dose_per_frame)
    tau = rng.uniform(0.8, 1.6)
    theta0 = rng.uniform(0, 2 * np.pi)
    turn = rng.uniform(-np.pi / 3, np.pi / 3)
    theta = theta0 + turn * (1 - np.exp(-e / tau))
    burst = np.cumsum(np.exp(-e / tau)[:, None] * np.stack([np.cos(theta), np.sin(theta)], -1), axis=0)
    drift_dir = rng.uniform(0, 2 * np.pi)
    drift = e[:, None] * np.array([np.cos(drift_dir), np.sin(drift_dir)])
    return _mix_to_length(burst, drift, rng.uniform(0.6, 0.85), total_A, ref)


def _mix_to_length(fast: np.ndarray, slow: np.ndarray, share: float, total_A: float, ref: int) -> np.ndarray:
    """``fast`` and ``slow`` (F, 2) each scaled to their ``share`` / ``1 - share`` of the path seen
    between frames, then the sum scaled to the path length ``total_A`` and zeroed at frame ``ref``."""
    s = share * fast / max(path_length(fast), 1e-12) + (1 - share) * slow / max(path_length(slow), 1e-12)
    s *= total_A / path_length(s) if path_length(s) > 0 else 0.0
    return s - s[ref]


@dataclass(frozen=True)
class LocalField:
    """Smooth local deviation field ``L(x, y, t)`` (module docstring). Positions in Å.

    ``omega``: (2 fields, 2 components, M, 2) angular frequencies (rad/Å); ``phase``, ``amp``:
    (2, 2, M); ``mean``: (2, 2) field-of-view mean removed; ``profile``: (2, F) temporal profiles
    ``g_fast``, ``g_slow``, zero at the reference frame.
    """

    omega: np.ndarray
    phase: np.ndarray
    amp: np.ndarray
    mean: np.ndarray
    profile: np.ndarray

    def fields(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(2 fields, ..., 2) the two spatial vector fields at positions ``x``, ``y`` (Å, shape ``(...)``)."""
        shape = np.shape(x)
        xf = np.ravel(x)[:, None]
        yf = np.ravel(y)[:, None]
        arg = (
            self.omega[..., 0][:, :, None, :] * xf + self.omega[..., 1][:, :, None, :] * yf + self.phase[:, :, None, :]
        )
        val = (self.amp[:, :, None, :] * np.cos(arg)).sum(-1) - self.mean[..., None]  # (2, 2, n)
        return np.moveaxis(val, 1, -1).reshape((2, *shape, 2))

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(..., F, 2) local displacement (Å) at positions ``x``, ``y`` (Å, shape ``(...)``)."""
        f = self.fields(x, y)  # (2, ..., 2)
        return np.einsum("c...d,ct->...td", f, self.profile)

    def grids(self, xs: np.ndarray, ys: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """(2 fields, 2 components, len(ys), len(xs)) the spatial fields on the grid of positions
        ``xs`` × ``ys`` (Å), separably: one matrix product per field and component."""
        xs = np.asarray(xs, np.float64)
        ys = np.asarray(ys, np.float64)
        ox, oy = self.omega[..., 0], self.omega[..., 1]  # (2, 2, M)
        # cos(a x + b y + c) = cos(a x) cos(b y + c) - sin(a x) sin(b y + c)
        ax = ox[..., None] * xs  # (2, 2, M, w)
        by = oy[..., None] * ys + self.phase[..., None]  # (2, 2, M, h)
        left = np.concatenate([np.cos(by), -np.sin(by)], axis=2) * np.concatenate([self.amp, self.amp], -1)[..., None]
        right = np.concatenate([np.cos(ax), np.sin(ax)], axis=2)
        out = np.matmul(
            np.ascontiguousarray(np.swapaxes(left, -1, -2), dtype=dtype), np.ascontiguousarray(right, dtype=dtype)
        )
        return out - self.mean[..., None, None].astype(dtype)


def local_field(
    shape: tuple[int, int],
    apix: float,
    n_frames: int,
    dose_per_frame: float,
    amplitude_A: float,
    corr_A: float,
    ref: int,
    rng: np.random.Generator,
    modes: int = 24,
) -> LocalField:
    """A random :class:`LocalField` over an ``shape`` (h, w) field of view (module docstring)."""
    h, w = shape
    omega = rng.standard_normal((2, 2, modes, 2)) / corr_A
    phase = rng.uniform(0, 2 * np.pi, (2, 2, modes))
    amp = np.full((2, 2, modes), np.sqrt(2.0 / modes))
    amp[1] *= 0.4  # the slow part is weaker than the early burst
    # exact mean over pixel centres of cos(a x + b y + c), separable in x and y
    ex = np.exp(1j * omega[..., 0, None] * (np.arange(w) * apix)).mean(-1)
    ey = np.exp(1j * omega[..., 1, None] * (np.arange(h) * apix)).mean(-1)
    mean = (amp * np.real(np.exp(1j * phase) * ex * ey)).sum(-1)
    e = mid_exposure(n_frames, dose_per_frame)
    tau = rng.uniform(1.5, 3.0)
    profile = np.stack([1 - np.exp(-e / tau), e / e[-1]])
    profile -= profile[:, ref : ref + 1]
    field = LocalField(omega, phase, amp, mean, profile)
    # normalise on a coarse grid of the field of view
    gy, gx = np.meshgrid(np.linspace(0, (h - 1) * apix, 24), np.linspace(0, (w - 1) * apix, 24), indexing="ij")
    disp = field.at(gx, gy)
    rms = np.sqrt((((disp[..., -1, :] - disp[..., 0, :]) ** 2).sum(-1)).mean())
    scale = amplitude_A / rms if rms > 0 else 0.0
    return LocalField(omega, phase, amp * scale, mean * scale, profile)


def particle_residuals(
    n_particles: int, n_frames: int, amplitude_A: float, ref: int, rng: np.random.Generator
) -> np.ndarray:
    """(P, F, 2) smooth independent per-particle random walks (Å), zero at frame ``ref``."""
    steps = gaussian_filter1d(rng.standard_normal((n_particles, n_frames, 2)), 2.0, axis=1, mode="nearest")
    walk = np.cumsum(steps, axis=1)
    walk -= walk[:, ref : ref + 1]
    if n_particles == 0 or n_frames < 2:
        return walk
    rms = np.sqrt(((walk[:, -1] - walk[:, 0]) ** 2).sum(-1).mean())
    return walk * (amplitude_A / rms if rms > 0 else 0.0)


# -- the "modes" model: the hardest sessions we were given (issue 10) ------------------------------
#
# Full-frame: 5-30 Å, 60-85 % of it a fast exponential start ``1 - exp(-e / τ)`` with τ = 4-15 % of the
# total exposure, the rest linear in exposure in a direction up to ±60° from the start's.
# Local field: six components, each a fixed spatial vector field with its own temporal profile
# ``a (1 - exp(-e / τ_c)) + (1 - a) e / E`` (τ_c = 5-25 % of the exposure E, a = 0.7-1: a fast start
# with some steady creep), zero mean over the field of view:
#   1. radial doming about a random centre: ``(p - c) / R · exp(-|p - c|² / 2R²)``, R = 0.25-0.6 L;
#   2. shear + rotation: ``M (p - p0) / L`` with M = [[a, b + r], [b - r, -a]] (a, b, r ~ N(0, 1));
#   3-6. four sinusoidal modes ``u sin(k·p + φ)``, wavelength 0.6-1.5 L, random direction and
#        polarisation u;
# (L = the larger side of the field of view, p0 its centre); each component is normalised to unit
# RMS over the field, weighted by 0.5-1.5, and the sum scaled so that the RMS over the field of view
# of the net displacement ``|L(end) - L(start)|`` is the requested amplitude (2.5-5 Å in the hard
# sessions).


def burst_drift_trajectory(
    n_frames: int, dose_per_frame: float, total_A: float, ref: int, rng: np.random.Generator
) -> np.ndarray:
    """(F, 2) full-frame trajectory (Å) of the "modes" model (comment above), path length between
    frame mid-points ``total_A``, zero at frame ``ref``."""
    e = mid_exposure(n_frames, dose_per_frame)
    exposure = dose_per_frame * n_frames
    tau = rng.uniform(0.04, 0.15) * exposure
    theta = rng.uniform(0, 2 * np.pi)
    turn = rng.uniform(-np.pi / 3, np.pi / 3)
    burst = (1 - np.exp(-e / tau))[:, None] * np.array([np.cos(theta), np.sin(theta)])
    linear = (e / exposure)[:, None] * np.array([np.cos(theta + turn), np.sin(theta + turn)])
    return _mix_to_length(burst, linear, rng.uniform(0.6, 0.85), total_A, ref)


@dataclass(frozen=True)
class ModeField:
    """Local deviation field of the "modes" model (comment above). Positions in Å.

    ``dome``: (cx, cy, R, weight); ``affine``: (2, 2) matrix (already weighted, per L);
    ``waves``: (4, 6) rows (kx, ky, phase, ux, uy, weight), k in rad/Å; ``origin``: (2,) field centre;
    ``length``: L (Å); ``mean``: (6, 2) field-of-view mean of each component; ``profile``: (6, F)
    temporal profiles, zero at the reference frame. ``scale``: overall factor.
    """

    dome: np.ndarray
    affine: np.ndarray
    waves: np.ndarray
    origin: np.ndarray
    length: float
    mean: np.ndarray
    profile: np.ndarray
    scale: float = 1.0

    def components(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(6, ..., 2) the spatial vector field of each component at positions ``x``, ``y`` (Å)."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        cx, cy, radius, wd = self.dome
        dx, dy = (x - cx) / radius, (y - cy) / radius
        g = wd * np.exp(-0.5 * (dx * dx + dy * dy))
        out = [np.stack([dx * g, dy * g], -1)]
        px, py = (x - self.origin[0]) / self.length, (y - self.origin[1]) / self.length
        m = self.affine
        out.append(np.stack([m[0, 0] * px + m[0, 1] * py, m[1, 0] * px + m[1, 1] * py], -1))
        for kx, ky, phase, ux, uy, wt in self.waves:
            s = wt * np.sin(kx * x + ky * y + phase)
            out.append(np.stack([ux * s, uy * s], -1))
        comps = np.stack(out)
        return (comps - self.mean.reshape((6,) + (1,) * (comps.ndim - 2) + (2,))) * self.scale

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(..., F, 2) local displacement (Å) at positions ``x``, ``y`` (Å, shape ``(...)``)."""
        return np.einsum("c...d,ct->...td", self.components(x, y), self.profile)

    def grids(self, xs: np.ndarray, ys: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """(6 components, 2, len(ys), len(xs)) the spatial fields on the grid ``xs`` × ``ys`` (Å)."""
        gy, gx = np.meshgrid(np.asarray(ys, np.float64), np.asarray(xs, np.float64), indexing="ij")
        return np.moveaxis(self.components(gx, gy), -1, 1).astype(dtype)


def mode_field(
    shape: tuple[int, int],
    apix: float,
    n_frames: int,
    dose_per_frame: float,
    amplitude_A: float,
    ref: int,
    rng: np.random.Generator,
) -> ModeField:
    """A random :class:`ModeField` over an ``shape`` (h, w) field of view (comment above)."""
    h, w = shape
    width, height = (w - 1) * apix, (h - 1) * apix
    length = max(width, height)
    dome = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height,
                     rng.uniform(0.25, 0.6) * length, rng.choice([-1.0, 1.0])])
    a, b, r = rng.standard_normal(3)
    affine = np.array([[a, b + r], [b - r, -a]])
    waves = np.zeros((4, 6))
    for i in range(4):
        k = 2 * np.pi / (rng.uniform(0.6, 1.5) * length)
        phi, psi = rng.uniform(0, 2 * np.pi, 2)
        waves[i] = (k * np.cos(phi), k * np.sin(phi), rng.uniform(0, 2 * np.pi), np.cos(psi), np.sin(psi), 1.0)
    origin = np.array([width / 2, height / 2])
    e = mid_exposure(n_frames, dose_per_frame)
    exposure = dose_per_frame * n_frames
    tau = rng.uniform(0.05, 0.25, 6) * exposure
    fast = rng.uniform(0.7, 1.0, 6)
    profile = fast[:, None] * (1 - np.exp(-e[None] / tau[:, None])) + (1 - fast[:, None]) * (e / exposure)[None]
    profile -= profile[:, ref : ref + 1]
    # field-of-view means on a fine grid of pixel centres, then each component to unit RMS, weighted
    gy, gx = np.meshgrid(np.linspace(0, height, 96), np.linspace(0, width, 96), indexing="ij")
    field = ModeField(dome, affine, waves, origin, length, np.zeros((6, 2)), profile)
    comps = field.components(gx, gy)
    mean = comps.reshape(6, -1, 2).mean(axis=1)
    rms = np.sqrt((((comps - mean[:, None, None]) ** 2).sum(-1)).reshape(6, -1).mean(axis=1))
    weight = rng.uniform(0.5, 1.5, 6) / np.maximum(rms, 1e-12)
    dome[3] *= weight[0]
    affine = affine * weight[1]
    waves[:, 5] = weight[2:]
    field = ModeField(dome, affine, waves, origin, length, mean * weight[:, None], profile)
    disp = field.at(gx, gy)
    net = np.sqrt((((disp[..., -1, :] - disp[..., 0, :]) ** 2).sum(-1)).mean())
    return ModeField(dome, affine, waves, origin, length, mean * weight[:, None], profile,
                     amplitude_A / net if net > 0 else 0.0)
