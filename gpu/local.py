"""Per-particle ("local") trajectories on top of the full-frame motion, without a 3-D reference.

Model (one movie, all particles at once). Particle p sits in frame t at ``x_p + s_t + d_{p,t}``
(px, (dx, dy); ``s``: the motion stage's full-frame estimate, :mod:`gpu.motion`), with::

    d_{p,t} = c_t  +  Σ_m Ψ_{p,m} f_{m,t}  +  e_{p,t}
              common   shared smooth field     small per-particle residual

* ``c`` (F, 2): a correction of the full-frame trajectory common to every particle, fitted jointly
  from all particles and the background. Where the background carries little signal the motion
  estimate ``s`` is off by 0.5-1 Å in the first and last frames, an error no per-particle term can
  see (it is common to all); ``s + c`` is the improved full-frame trajectory and ``s`` only the
  starting point. Prior: the motion stage's trajectory prior (``P``, in exposure units,
  :func:`gpu.motion.prior_precision`: the burst basis and a smooth residual) on the *total* ``s + c``, plus the background's own share
  of the motion stage's evidence as a quadratic around ``s``::

      -log p(c) = ½ Σ_axis (s + c)ᵀ P (s + c) − β [ (P s)ᵀ c − ½ cᵀ L c ]

  ``L``: the full-frame likelihood's curvature (:meth:`gpu.motion.FrameMotion.data_precision`),
  whose gradient at ``s`` is ``P s`` (``s`` is the motion stage's MAP). ``β``: the fraction of the
  frame outside every particle's alignment box (:func:`background_share`): the rest of the motion
  stage's evidence came from the particles' own pixels, which enter in full through their
  likelihood, and counting it twice would also count its noise twice (``s`` followed that noise,
  and the particles' likelihood then agrees with ``s``: on simulated sessions β = 1 left 0.31 Å of
  common error where β from the area left 0.2 Å). β = 1 would be the Laplace approximation of the
  motion stage's posterior; β = 0 the particles and the prior alone.
* ``Ψ`` (P, R) spans a Gaussian process over the micrograph: ``Ψ Ψᵀ ≈ J K J`` with
  ``K_ij = exp(-|x_i - x_j|² / (2 ℓ²))`` (``kernel="gaussian"``: smooth, low rank) or RELION's
  ``exp(-|x_i - x_j| / ℓ)`` (``kernel="exponential"``, Zivanov et al. 2019, IUCrJ 6:5; rougher),
  ``ℓ`` = ``correlation_length`` (Å), centred by ``J = I - 11ᵀ/P`` so that every field mode sums to
  zero over the particles: the field is what differs between particles, the common term what they
  share (without the common term, K is used uncentred). Top eigenvectors: every field mode is
  constrained by many particles.
* Time, field (the default, ``field_scale`` > 0): every field mode's time course ``f_m`` (per axis)
  has the full-frame motion prior of :func:`gpu.motion.prior_precision` (the burst basis, a few
  saturating exponentials ``1 - e^{-e/τ}`` plus a linear drift with their amplitudes integrated out,
  and a smooth residual) with every scale in Å multiplied by ``field_scale``: the local field is
  beam-induced motion too, a fast start with some steady creep (docs/physics.md#realistic-motion), so
  its early frames are pooled through a handful of amplitudes instead of being left nearly free.
  With ``field_scale`` = 0: RELION's velocity prior — each frame's velocity an independent
  N(0, σ²) draw, σ = ``sigma_field`` (Å per e/Å²) scaled by ``N0 / (N + N0)`` at exposure N
  (``burst_exposure`` N0) — plus an acceleration prior (``sigma_acceleration``, Å per (e/Å²)²).
  The field's size differs between movies (1-8 Å), so with ``field_evidence`` the scale is chosen per
  movie: a first fit at ``field_scale``, then the factor in ``EVIDENCE_FACTORS`` (×1/8 ... ×4) of
  highest Laplace evidence (:func:`field_scale_evidence`), then the guard's held-out fits and the
  final fit at that scale. On the tuning sessions of benchmarks/quality.py a fixed 0.15 (basis
  amplitudes of 3 Å) was the best single value (0.05 shrank large fields, 0.25-1 followed more
  noise), and the evidence's choice did better on weak and strong fields (BENCHMARKS.md).
* Time, residual: each particle's ``e_p`` gets RELION's velocity prior (``sigma_velocity``, frame
  displacement std = σ·dose_per_frame/apix px) plus the acceleration prior: the particles' velocities
  have the prior covariance (field) + ``σ_e² I``, a GP whose independent part is strongly shrunk
  (independent per-particle fits follow the noise at realistic SNR; docs/physics.md#per-particle-alignment).
* Gauge: ``c`` and every ``d_p`` are **zero-mean over all frames** of the movie. The likelihood sees
  only differences between frames, so a constant is free; zero mean keeps each particle centred
  where it appears in the full-frame-corrected micrograph (where it was picked), and ``s + c``
  is ``s`` re-centred on the particles' common track (``s_ref = 0`` no longer holds exactly).
* Parameters: the field modes' increments in px (whitened velocity increments, prior ½|z|², with
  ``field_scale`` = 0), the residuals' whitened velocity increments and the common term's increments
  in px; positions are their cumulative sums, made zero-mean.

Objective: ``J(z) = -log L(d(z)) + prior(z)`` with the calibrated likelihood of
:mod:`gpu.local_model` (nats), so hyper-parameters in physical units need no λ per data set and
transfer across pixel sizes, boxes and doses. Each particle's log-likelihood is weighted by
:func:`overlap_weights` (1 for a patch that overlaps no other): overlapping patches share pixels, and
without it a movie with densely packed picks or large boxes counted their evidence up to 2.5 times. Minimised by L-BFGS (scipy, on the host: the
parameters are few) with the data term and its analytic gradient evaluated on ``xp`` (NumPy or
CuPy), starting from the full-frame motion (d = 0) for the held-out fits and from the mean of
their solutions for the fit to all frames. L-BFGS runs in preconditioned variables (a block
approximation of the Hessian: the prior plus each frame's curvature of the likelihood through the
trajectory integration, :meth:`TrajectoryModel.preconditioner`), which reaches the same minimum
in ~10 evaluations instead of ~130.

Guard (cross-validation in time): the model is also fitted to the even alignment frames alone and
to the odd ones alone; each fit is scored on the frames it did not see, per particle (held-out
log-likelihood gain over the motion stage's ``s``, d = 0). :func:`guard_choice` then takes the
simplest of {full-frame (``c`` alone), field, field + residual} whose summed gain over the next
simpler one is larger (``GUARD_Z`` = 0 standard errors: a margin of 0.5 standard errors rejected a
field that halved the trajectory error on a tuning session, whose held-out gain was +0.9 nats); when neither beats the full-frame candidate the
movie falls back to the improved full-frame trajectory ``s + c`` (``smooth = 0``). Without local
motion a field fitted to noise scores *negative* on held-out frames, so the fallback is the
expected outcome there. ``c`` itself is not guarded: it is the joint posterior of a common
shift, not a more complex model, and its held-out score is biased low (held-out frames see ``c``
interpolated from their neighbours, while ``s`` was fitted to them). The same held-out scores give
the per-movie quality signal (:func:`gpu.quality.heldout_signal`). ``auto_smoothing``
additionally scales the field's prior (``field_scale`` or ``sigma_field``) by ×{0.5, 1, 2}, chosen by the held-out score.

Outputs (px): ``common`` (F, 2) — ``c``; ``smooth`` (P, F, 2) — the model's MAP field (+ residual)
after the guard, on top of ``s + c`` (extraction follows ``s + c + smooth``); ``raw`` — per-frame
estimates: each frame's own best shift against the sum of the other frames aligned by
``c + smooth`` (a few damped Newton steps on its cross-correlation), noisy, for display.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize

from gpu import backend
from gpu.local_model import (
    BandSpectra,
    _aligned_chunk,
    _chunk,
    aligned_spectra,
    curvature,
    data_term,
    mask_profile,
    per_particle_term,
    prepare_spectra,
    self_term,
    shift_phases,
)
from gpu.motion import FrameMotion, prior_precision
from gpu.quality import heldout_frc, heldout_signal

MAX_ITER = 300
EVIDENCE_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)  # field prior scales the evidence chooses among (× field_scale)
EVIDENCE_ITER = 3  # L-BFGS iterations of the first fit: the evidence needs the MAP roughly, not to 1e-3 nats
GUARD_Z = 0.0  # standard errors of held-out gain a more complex candidate must win by (0: a better held-out score)


@dataclass(frozen=True)
class LocalParams:
    """The per-particle model's parameters, all explicit (their defaults and help live in one place,
    ``streamer.config.LocalConfig``, which builds this object). Units: Å, e/Å².

    ``band_low``/``band_high``: alignment band (Å); ``bfactor``: extra B-factor on the likelihood
    weights (Å²); ``sigma_field``: prior std of the field's velocity at zero exposure (Å per e/Å²);
    ``burst_exposure``: ``N0`` of its decay ``N0 / (N + N0)``; ``sigma_velocity``: residual velocity
    prior (Å per e/Å²); ``sigma_acceleration``: acceleration prior (Å per (e/Å²)²);
    ``correlation_length``: the field's kernel length (Å); ``kernel``: gaussian | exponential;
    ``auto_smoothing``: pick ``sigma_field`` among ×{0.5, 1, 2} by the held-out score;
    ``first_frame``/``last_frame``: alignment frames (-1 = last); ``guard``: the held-out guard;
    ``common``: fit the common correction ``c_t`` jointly (needs the full-frame posterior);
    ``field_scale``: > 0 gives every field mode's time course the full-frame motion prior
    (:func:`gpu.motion.prior_precision`: burst basis + smooth residual) with all its scales (Å)
    multiplied by ``field_scale`` (``sigma_field`` and ``burst_exposure`` are then unused); 0 = the
    velocity prior of ``sigma_field``/``burst_exposure``; ``field_evidence``: with ``field_scale`` > 0
    (and without ``auto_smoothing``), multiply it per movie by the factor in ``EVIDENCE_FACTORS`` of
    highest Laplace evidence (:func:`field_scale_evidence`).
    """

    band_low: float
    band_high: float
    bfactor: float
    sigma_field: float
    burst_exposure: float
    sigma_velocity: float
    sigma_acceleration: float
    correlation_length: float
    kernel: str
    auto_smoothing: bool
    first_frame: int
    last_frame: int
    guard: bool
    common: bool
    field_scale: float
    field_evidence: bool


@dataclass
class LocalResult:
    """``raw``, ``smooth``: (P, F, 2) local shifts (px, zero-mean over frames) on top of the improved
    full-frame trajectory ``s + common``; ``common``: (F, 2) px, zero-mean over frames; ``info``:
    diagnostics.

    ``candidates``: the guard's options by name ("full-frame", "field", "field+residual"), each
    (P, F, 2) px on top of ``s + common``, from the fit to all alignment frames (for diagnostics
    and benchmarks). ``common_sd``: (F,) px, the posterior standard deviation of ``s + common`` per
    frame (:func:`common_uncertainty`; zeros without the common term).
    """

    raw: Any
    smooth: Any
    common: Any
    info: dict[str, Any] = field(default_factory=dict)
    candidates: dict[str, np.ndarray] = field(default_factory=dict)
    common_sd: np.ndarray = field(default_factory=lambda: np.zeros(0))


# -- spatial basis -------------------------------------------------------------------------------


def spatial_basis(
    positions: np.ndarray,
    apix: float,
    correlation_length: float,
    kernel: str,
    centred: bool = False,
    rel_tol: float = 1e-3,
    max_exact: int = 2000,
) -> np.ndarray:
    """(P, R) float64 ``Ψ`` with ``Ψ Ψᵀ ≈ K`` (module docstring); R = eigenvalues above ``rel_tol·λ_max``.

    ``positions``: (P, 2) px; ``correlation_length``: Å. Above ``max_exact`` particles a Nyström
    approximation on an evenly spaced subset of ``max_exact`` particles is used. ``centred``: the
    basis of the centred kernel ``J K J`` (``J = I - 11ᵀ/P``): every mode sums to zero over the
    particles, so the field holds no common shift (that is the common term's, module docstring).
    """
    pos = np.asarray(positions, dtype=np.float64) * apix / correlation_length
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"spatial_basis: positions must be (P, 2), got {pos.shape}")
    if len(pos) == 0:
        return np.zeros((0, 0))

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        r2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        if kernel == "gaussian":
            return np.exp(-0.5 * r2)
        if kernel == "exponential":
            return np.exp(-np.sqrt(r2))
        raise ValueError(f"spatial_basis: unknown kernel {kernel!r} (gaussian|exponential)")

    sub = pos if len(pos) <= max_exact else pos[np.linspace(0, len(pos) - 1, max_exact).astype(int)]
    lam, vec = np.linalg.eigh(k(sub, sub))
    keep = lam > rel_tol * lam[-1]
    lam, vec = lam[keep], vec[:, keep]
    # Nyström beyond max_exact: Ψ = K_{x,s} V Λ^{-1/2}
    psi = vec * np.sqrt(lam) if len(sub) == len(pos) else k(pos, sub) @ vec / np.sqrt(lam)
    if not centred:
        return psi
    # J Ψ (J Ψ)ᵀ = J K J; its SVD gives orthogonal modes, dropping the (near-)constant one(s)
    u, sv, _ = np.linalg.svd(psi - psi.mean(axis=0, keepdims=True), full_matrices=False)
    keep = sv > np.sqrt(rel_tol) * sv[0] if len(sv) and sv[0] > 0 else np.zeros(len(sv), bool)
    return u[:, keep] * sv[keep]


# -- trajectory model ----------------------------------------------------------------------------


class TrajectoryModel:
    """Whitened parameters ``z`` <-> local shifts ``d`` (P, F, 2) px; Gaussian prior ``½|z|²`` (+ acceleration).

    ``z`` packs ``zf`` (R, F-1, 2) field-mode increments, ``ze`` (P, F-1, 2) residual increments
    (when ``residual``) and ``zc`` (F-1, 2) common increments (px, when ``common`` is given).
    ``field_prior``: an ``(F, F)`` precision (1/px²) of a field mode's zero-mean time course (one axis,
    unit ``Ψ``); the field increments are then in px (scale 1, no ρ) with the prior
    ``½ Σ_m,axis (C zf_m)ᵀ Π_f (C zf_m)`` instead of the whitened one below.
    Increment scales (px per frame): ``s = σ · dose_per_frame / apix · h(N)``, with
    ``h(N) = N0 / (N + N0)`` for the field when ``burst_exposure`` N0 > 0 (beam-induced motion is
    fastest early, docs/physics.md#realistic-motion) and 1 otherwise; N is the exposure between the two frames. The
    acceleration prior is ``½ ρ² Σ_j (z_j - z_{j-1})²`` with ``ρ = σ / (σ_a · dose_per_frame)``.
    ``common``: the full-frame posterior (:class:`gpu.motion.FrameMotion`); the common term
    ``c = C zc`` (C: zero-mean cumulative sum) then has the prior of the module docstring with
    ``β`` = ``background_share``.
    """

    def __init__(
        self,
        psi: np.ndarray,
        n_frames: int,
        apix: float,
        dose_per_frame: float,
        sigma_field: float,
        sigma_velocity: float,
        sigma_acceleration: float,
        residual: bool = True,
        burst_exposure: float = 0.0,
        pre_exposure: float = 0.0,
        common: FrameMotion | None = None,
        background_share: float = 0.0,
        field_prior: np.ndarray | None = None,
    ) -> None:
        self.psi = np.asarray(psi, dtype=np.float64)
        self.P, self.R = self.psi.shape
        self.F = int(n_frames)
        self.residual = residual and sigma_velocity > 0
        n_inc = pre_exposure + dose_per_frame * (np.arange(self.F - 1) + 1.0)
        h = burst_exposure / (n_inc + burst_exposure) if burst_exposure > 0 else np.ones(self.F - 1)
        self.s_f = (sigma_field * dose_per_frame / apix) * h[:, None]
        self.s_e = sigma_velocity * dose_per_frame / apix
        self.rho_f = sigma_field / (sigma_acceleration * dose_per_frame)
        self.rho_e = sigma_velocity / (sigma_acceleration * dose_per_frame)
        self.pi_f = None
        if field_prior is not None:  # increments in px, the dense time-course prior instead of whitening
            self.pi_f = np.asarray(field_prior, dtype=np.float64)
            if self.pi_f.shape != (self.F, self.F):
                raise ValueError(f"TrajectoryModel: field prior {self.pi_f.shape} for {self.F} frames")
            self.s_f = np.ones((self.F - 1, 1))
            self.rho_f = 0.0
        self.nf = self.R * (self.F - 1) * 2
        self.ne = self.P * (self.F - 1) * 2 if self.residual else 0
        self.pi_c = None
        if common is not None:
            if common.shifts.shape[0] != self.F:
                raise ValueError(f"TrajectoryModel: full-frame posterior of {common.shifts.shape[0]} frames for {self.F}")
            f = self.F
            self.pi_p = np.zeros((2 * f, 2 * f))
            self.pi_p[:f, :f] = common.prior
            self.pi_p[f:, f:] = common.prior
            self.pi_b = background_share * common.data_precision()
            self.pi_c = self.pi_p + self.pi_b  # the Hessian of the common prior
            self.offset = (common.shifts - common.shifts.mean(axis=0)).T.ravel()  # s, zero-mean, x then y
            self.lin = -background_share * (self.pi_p @ self.offset)
        self.nc = (self.F - 1) * 2 if self.pi_c is not None else 0

    @property
    def size(self) -> int:
        return self.nf + self.ne + self.nc

    def split(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Views (zf, ze or None, zc or None) into ``z``."""
        zf = z[: self.nf].reshape(self.R, self.F - 1, 2)
        ze = z[self.nf : self.nf + self.ne].reshape(self.P, self.F - 1, 2) if self.ne else None
        zc = z[self.nf + self.ne :].reshape(1, self.F - 1, 2) if self.nc else None
        return zf, ze, zc

    @staticmethod
    def _integrate(z: np.ndarray, scale: Any) -> np.ndarray:
        """(n, F-1, 2) increments (times ``scale``, (F-1, 1) or scalar) -> (n, F, 2) zero-mean positions."""
        y = np.concatenate([np.zeros_like(z[:, :1]), np.cumsum(z * scale, axis=1)], axis=1)
        return y - y.mean(axis=1, keepdims=True)

    @staticmethod
    def _integrate_adjoint(g: np.ndarray, scale: Any) -> np.ndarray:
        """Adjoint of :meth:`_integrate`: (n, F, 2) -> (n, F-1, 2)."""
        g = g - g.mean(axis=1, keepdims=True)
        rev = np.cumsum(g[:, ::-1], axis=1)[:, ::-1]
        return rev[:, 1:] * scale

    def parts(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(common (F, 2), field (P, F, 2), residual (P, F, 2)), px."""
        zf, ze, zc = self.split(z)
        fld = np.einsum("pm,mtk->ptk", self.psi, self._integrate(zf, self.s_f))
        res = self._integrate(ze, self.s_e) if ze is not None else np.zeros_like(fld)
        com = self._integrate(zc, 1.0)[0] if zc is not None else np.zeros((self.F, 2))
        return com, fld, res

    def trajectories(self, z: np.ndarray) -> np.ndarray:
        com, fld, res = self.parts(z)
        return com[None] + fld + res

    def adjoint(self, gd: np.ndarray) -> np.ndarray:
        """Gradient w.r.t. z of a function of d, given its gradient ``gd`` (P, F, 2)."""
        gc = np.einsum("pm,ptk->mtk", self.psi, gd)
        out = [self._integrate_adjoint(gc, self.s_f).ravel()]
        if self.ne:
            out.append(self._integrate_adjoint(gd, self.s_e).ravel())
        if self.nc:
            out.append(self._integrate_adjoint(gd.sum(axis=0, keepdims=True), 1.0).ravel())
        return np.concatenate(out)

    def _integration_matrix(self) -> np.ndarray:
        """(F, F-1) ``C``: positions = C @ increments (cumulative sum from 0, then zero-mean), as :meth:`_integrate`."""
        c = np.tril(np.ones((self.F, self.F - 1)), k=-1)
        return c - c.mean(axis=0, keepdims=True)

    def preconditioner(self, h: np.ndarray) -> BlockPreconditioner:
        """Block-diagonal approximation of the Hessian of J in ``z``, from the data curvature ``h`` (P, F).

        Per residual block (particle p) and per field block (mode m), per axis, the (F-1)² matrix
        ``M = I + ρ² DᵀD + Sᵀ Cᵀ diag(h̄) C S``: the prior (whitening + acceleration, D = first
        difference) plus the data term through the integration C with the increment scales S; h̄ =
        ``h_p`` for a residual and ``Σ_p Ψ_pm² h_p`` for a field mode. The common block is
        ``Cᵀ (Π̄ + diag(Σ_p h_p)) C`` with ``Π̄`` the mean of the x and y blocks of the common
        prior's Hessian ``Π = P ⊕ P + β L`` (couplings between blocks and axes are left out). ``h``: -∂² log L/∂d² per particle and frame (0 for
        frames without data).
        """
        c = self._integration_matrix()
        n = self.F - 1
        dd = np.diff(np.eye(n), axis=0)
        dtd = dd.T @ dd
        cs_f = c * self.s_f[:, 0][None, :]
        h_f = (self.psi**2).T @ h  # (R, F)
        if self.pi_f is None:
            blocks = [np.eye(n) + self.rho_f**2 * dtd + np.einsum("tj,bt,tk->bjk", cs_f, h_f, cs_f)]
        else:  # Cᵀ (Π_f + diag(h̄_m)) C per mode
            m_f = (c.T @ self.pi_f @ c)[None] + np.einsum("tj,bt,tk->bjk", c, h_f, c)
            blocks = [m_f + 1e-9 * np.trace(m_f[0]) / n * np.eye(n)]
        if self.ne:
            cs_e = c * self.s_e
            blocks.append(np.eye(n) + self.rho_e**2 * dtd + np.einsum("tj,bt,tk->bjk", cs_e, h, cs_e))
        if self.nc:
            f = self.F
            pi = 0.5 * (self.pi_c[:f, :f] + self.pi_c[f:, f:]) + np.diag(h.sum(axis=0))
            m = c.T @ pi @ c
            blocks.append((m + 1e-9 * np.trace(m) / n * np.eye(n))[None])
        return BlockPreconditioner(np.concatenate(blocks), self.size)

    def prior(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        """``½|z_f,e|² + ½ρ² Σ (Δz)²`` (acceleration on the field and residual increments) plus the
        common term's ``½ vec(c)ᵀ Π vec(c)``, and the gradient."""
        zf, ze, zc = self.split(z)
        white = slice(self.nf if self.pi_f is not None else 0, self.nf + self.ne)
        value = 0.5 * float(z[white] @ z[white])
        grad = z.copy()
        gf, ge, gcm = self.split(grad)
        if self.pi_f is not None:  # ½ Σ_m,axis f_mᵀ Π_f f_m over the modes' time courses f = C zf
            pos = self._integrate(zf, 1.0)  # (R, F, 2)
            pp = np.einsum("ts,rsk->rtk", self.pi_f, pos)
            value += 0.5 * float((pos * pp).sum())
            gf[...] = self._integrate_adjoint(pp, 1.0)
        for zz, gg, rho in ((zf, gf, self.rho_f), (ze, ge, self.rho_e)):
            if zz is None or zz.shape[1] < 2:
                continue
            dz = np.diff(zz, axis=1)
            value += 0.5 * rho**2 * float((dz**2).sum())
            gg[:, 1:] += rho**2 * dz
            gg[:, :-1] -= rho**2 * dz
        if zc is not None:
            com = self._integrate(zc, 1.0)[0].T.ravel()  # (F, 2) -> x block, then y block
            tot = com + self.offset
            pp = self.pi_p @ tot
            pb = self.pi_b @ com
            value += 0.5 * float(tot @ pp) + float(self.lin @ com) + 0.5 * float(com @ pb)
            pc = pp + pb + self.lin
            gcm[...] = self._integrate_adjoint(pc.reshape(2, self.F).T[None], 1.0)
        return value, grad


class BlockPreconditioner:
    """Change of variables ``z = L^{-T} y`` with ``M = L Lᵀ`` per block (:meth:`TrajectoryModel.preconditioner`).

    In ``y`` the approximate Hessian is the identity, so L-BFGS needs far fewer evaluations. ``m``:
    (B, n, n) SPD blocks, one per (R field modes + P residuals); z packs (B, n, 2) in that order.
    """

    def __init__(self, m: np.ndarray, size: int) -> None:
        self.linv = np.linalg.inv(np.linalg.cholesky(m))  # (B, n, n) lower triangular
        self.linv_t = np.ascontiguousarray(self.linv.transpose(0, 2, 1))
        self.shape = (m.shape[0], m.shape[1], 2)
        if int(np.prod(self.shape)) != size:
            raise ValueError(f"BlockPreconditioner: preconditioner blocks {self.shape} do not cover {size} parameters")

    def to_z(self, y: np.ndarray) -> np.ndarray:
        return np.matmul(self.linv_t, y.reshape(self.shape)).ravel()

    def to_y(self, z: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.linv_t, z.reshape(self.shape)).ravel()

    def gradient(self, gz: np.ndarray) -> np.ndarray:
        """∂J/∂y = L^{-1} ∂J/∂z."""
        return np.matmul(self.linv, gz.reshape(self.shape)).ravel()


# -- fitting ---------------------------------------------------------------------------------


def objective(spec: BandSpectra, model: TrajectoryModel, z: np.ndarray) -> tuple[float, np.ndarray]:
    """``J(z) = -log L(d(z)) + prior(z)`` and its gradient (float64 host arrays)."""
    xp = spec.xp
    d = model.trajectories(z)
    val, g = data_term(spec, xp.asarray(d[:, spec.frames]))
    gd = np.zeros_like(d)
    gd[:, spec.frames] = backend.to_numpy(g)
    pv, pg = model.prior(z)
    return -val + pv, -model.adjoint(gd) + pg


def fit(
    spec: BandSpectra, model: TrajectoryModel, max_iter: int = MAX_ITER, z0: np.ndarray | None = None,
    precondition: bool = True, tol_nats: float = 1e-3, curv: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """MAP parameters by L-BFGS from ``z0`` (default 0 = full-frame motion); returns (z, info).

    ``precondition``: minimise over ``y`` with ``z = L^{-T} y`` (:meth:`TrajectoryModel.preconditioner`,
    curvature from :func:`gpu.local_model.curvature` at the full-frame alignment): same minimum,
    127 -> 10 likelihood evaluations on a simulated 3072² session (benchmarks/local_speed.py).
    ``tol_nats``: stop when an iteration lowers J by less than this (absolute, nats). ``curv``:
    that curvature (P, F) when already computed (:func:`frame_curvature`).
    """
    z0 = np.zeros(model.size) if z0 is None else z0
    j0, _ = objective(spec, model, z0)
    if precondition:
        pc = model.preconditioner(frame_curvature(spec, model.F) if curv is None else curv)
    else:
        pc = None

    def fun(y: np.ndarray) -> tuple[float, np.ndarray]:
        if pc is None:
            return objective(spec, model, y)
        val, gz = objective(spec, model, pc.to_z(y))
        return val, pc.gradient(gz)

    res = minimize(
        fun,
        z0 if pc is None else pc.to_y(z0),
        jac=True,
        method="L-BFGS-B",
        # L-BFGS-B's ftol is relative to |J|, which is arbitrary (the likelihood's constant): make it
        # an absolute decrease per iteration of tol_nats
        options={"maxiter": max_iter, "maxcor": 15, "ftol": tol_nats / max(abs(j0), 1.0), "gtol": 1e-2},
    )
    z = res.x if pc is None else pc.to_z(res.x)
    if not (np.all(np.isfinite(z)) and np.isfinite(res.fun) and res.fun <= j0):
        z = z0  # never return something worse than the start (full-frame)
    return z, {"objective_start": float(j0), "objective": float(min(res.fun, j0)), "iterations": int(res.nit),
               "evaluations": int(res.nfev), "converged": bool(res.success)}


def frame_curvature(spec: BandSpectra, n_frames: int) -> np.ndarray:
    """(P, F) float64 :func:`gpu.local_model.curvature` on the movie's frames (0 outside the alignment frames)."""
    h = np.zeros((spec.x.shape[0], n_frames))
    h[:, spec.frames] = backend.to_numpy(curvature(spec))
    return h


def _zero_mean_basis(n: int) -> np.ndarray:
    """(n, n-1) orthonormal basis of the zero-mean vectors of length n (the gauge of every trajectory)."""
    return np.linalg.qr(np.eye(n) - 1.0 / n)[0][:, : n - 1]


def common_uncertainty(model: TrajectoryModel, h: np.ndarray) -> np.ndarray:
    """(F,) px: the posterior standard deviation of the improved full-frame trajectory ``s + c`` per
    frame (both axes: ``sqrt(var_x + var_y)``), zero-mean gauge, Laplace approximation.

    Hessian of the common term: its prior ``Π = P ⊕ P + β L`` (module docstring) plus the particles'
    data curvature summed over particles per frame (``h`` (P, F), :func:`frame_curvature`; the field
    is centred, so its coupling to ``c`` is left out). A model-based figure: the error to expect where
    the prior and the likelihood's calibration hold (benchmarks/quality.py compares it with the truth).
    """
    f = model.F
    if model.pi_c is None:
        return np.zeros(f)
    hess = model.pi_c + np.diag(np.tile(h.sum(axis=0), 2))
    q2 = np.kron(np.eye(2), _zero_mean_basis(f))  # the zero-mean gauge of each axis (x then y)
    cov = q2 @ np.linalg.inv(q2.T @ hess @ q2) @ q2.T
    var = np.diag(cov)
    return np.sqrt(np.maximum(var[:f] + var[f:], 0.0))


def common_given(spec: BandSpectra, known: np.ndarray, motion: FrameMotion, share: float,
                 max_iter: int = MAX_ITER) -> np.ndarray:
    """(F, 2) px: the common term ``c`` fitted alone, every particle's own displacement ``known``.

    ``known``: (P, F, 2) px, each particle's displacement that is not common to all (field + residual,
    zero-mean over the particles in every frame). The spectra are aligned by it and ``c`` gets the
    same posterior as in :func:`estimate_local` (the particles' likelihood, the prior on ``s + c`` and the
    background's share ``share`` of the motion stage's evidence). With the true displacements this is
    what the data say about the common shift when nothing else is unknown: the limit of any joint fit
    of this model (benchmarks/quality.py scores lmc's ``s + c`` against it).
    """
    known = np.asarray(known, dtype=np.float64)
    if known.shape != (spec.x.shape[0], spec.n_frames, 2):
        raise ValueError(f"common_given: known displacements {known.shape} for {spec.x.shape[0]} particles, "
                         f"{spec.n_frames} frames")
    aligned = replace(spec, x=aligned_spectra(spec, spec.xp.asarray(known[:, spec.frames])), self_power=None)
    model = common_only_model(known.shape[0], spec.n_frames, spec.apix, motion, share)
    z, _ = fit(aligned, model, max_iter)
    return model.parts(z)[0]


def common_only_model(n_particles: int, n_frames: int, apix: float, motion: FrameMotion, share: float) -> TrajectoryModel:
    """The model with the common term ``c`` alone (no field modes, no residual): its prior is the one
    of :func:`estimate_local` (the prior on ``s + c`` and the background's share ``share`` of the motion
    stage's evidence), for :func:`common_given` and :func:`common_uncertainty` on given particles."""
    # the dose and the field's and residual's sigmas scale parameters that do not exist here
    return TrajectoryModel(np.zeros((n_particles, 0)), n_frames, apix, dose_per_frame=1.0, sigma_field=1.0,
                           sigma_velocity=0.0, sigma_acceleration=1.0, residual=False, common=motion,
                           background_share=share)


def scaled_prior_evidence(b: np.ndarray, h: np.ndarray, p: np.ndarray, factors: tuple[float, ...]) -> np.ndarray:
    """Log evidence (nats, up to a constant) of a Gaussian observation under the prior precision ``p / k²``
    for each ``k`` in ``factors``: the latent x ~ N(0, k² p⁻¹) is seen with precision ``h`` and linear term
    ``b = h x̂``: ``½ bᵀ(h + p/k²)⁻¹ b - ½ log det(h + p/k²) + ½ log det(p/k²)`` (the omitted ``-½ x̂ᵀ h x̂``
    and ``½ log det h`` do not depend on k). ``b``: (..., n); ``h``, ``p``: (n, n)."""
    b2 = np.asarray(b, dtype=np.float64).reshape(-1, p.shape[0])
    out = np.zeros(len(factors))
    for i, k in enumerate(factors):
        a = h + p / k**2
        out[i] = 0.5 * float(np.einsum("ij,ji->", b2, np.linalg.solve(a, b2.T)))
        out[i] += len(b2) * 0.5 * (np.linalg.slogdet(p / k**2)[1] - np.linalg.slogdet(a)[1])
    return out


def field_scale_evidence(spec: BandSpectra, model: TrajectoryModel, z: np.ndarray, curv: np.ndarray,
                         factors: tuple[float, ...]) -> np.ndarray:
    """Laplace evidence (nats, up to a constant) of the field prior scaled by each of ``factors``.

    Each field mode's time course ``f_m`` (per axis, zero-mean) is observed through the data as
    ``f̂ = f + g/h̄`` (``f``: the MAP of ``z``; ``g``: the log-likelihood's gradient projected on the
    mode; ``h̄ = Σ_p Ψ_pm² h_p`` from the curvature ``curv`` (P, F)) with precision ``diag(h̄)``;
    :func:`scaled_prior_evidence` under ``Π_f / k²`` on the zero-mean subspace, modes independent.
    A type-II maximum likelihood of the field's size, which differs between movies by a factor of
    ~8 (1-8 Å): on the tuning sessions of benchmarks/quality.py it chose ×0.125-0.25 for weak
    fields (150 kDa, 1-2 Å) and ×0.5-1 for 2.5-5 Å ones (BENCHMARKS.md).
    """
    if model.pi_f is None:
        raise ValueError("field_scale_evidence: the model has no field time-course prior (field_scale 0)")
    xp = spec.xp
    d = model.trajectories(z)
    _, g = data_term(spec, xp.asarray(d[:, spec.frames]))
    gd = np.zeros_like(d)
    gd[:, spec.frames] = backend.to_numpy(g)
    zf, _, _ = model.split(z)
    f = model._integrate(zf, model.s_f)  # (R, F, 2) the modes' time courses
    gm = np.einsum("pm,ptk->mtk", model.psi, gd)
    hm = (model.psi**2).T @ curv  # (R, F)
    q = _zero_mean_basis(model.F)
    p_q = q.T @ model.pi_f @ q
    out = np.zeros(len(factors))
    for m in range(model.R):
        b = (hm[m][:, None] * f[m] + gm[m]).T @ q  # (2 axes, F-1)
        out += scaled_prior_evidence(b, q.T @ (hm[m][:, None] * q), p_q, factors)
    return out


def heldout_gain(spec: BandSpectra, d: np.ndarray) -> float:
    """Log-likelihood gain of shifts d (P, F, 2) over d = 0 on the frames of ``spec``."""
    xp = spec.xp
    v1, _ = data_term(spec, xp.asarray(d[:, spec.frames]), gradient=False)
    v0, _ = data_term(spec, xp.zeros((spec.x.shape[0], len(spec.frames), 2)), gradient=False)
    return v1 - v0


# -- raw per-frame estimates -----------------------------------------------------------------


def per_frame_shifts(spec: BandSpectra, d: np.ndarray, steps: int = 4, max_step: float = 1.0, damping: float = 0.1) -> np.ndarray:
    """(P, F, 2) px: each frame's own best shift against the sum of the others aligned by d.

    Damped Newton on ``c(δ) = Σ_k w Re(G_t e^{2πik·δ} conj(A - G_t))`` from δ = 0, each step
    clipped to ``max_step`` px; ``damping`` (relative to the Hessian trace) keeps flat or
    non-concave cases bounded. Frames outside the alignment range keep d. The gradient and
    Hessian sums over k are one matrix product of the (re, im)-interleaved product spectrum with
    the columns (-2π kx, -2π ky | -(2π)² kx², ky², kx ky); particle chunks run on the CPU threads.
    """
    xp = spec.xp
    p_count, fa, ny, nx = spec.x.shape
    rdtype = spec.rdtype
    out = np.array(d, dtype=np.float64, copy=True)
    dd = xp.asarray(d[:, spec.frames], dtype=rdtype)
    two_pi = 2.0 * math.pi
    kx = np.broadcast_to(backend.to_numpy(spec.kx)[None, :], (ny, nx)).ravel().astype(np.float64)
    ky = np.broadcast_to(backend.to_numpy(spec.ky)[:, None], (ny, nx)).ravel().astype(np.float64)
    cols = np.zeros((ny * nx, 2, 5))  # (K, re|im slot, [gx, gy, hxx, hyy, hxy])
    cols[:, 1, 0] = -two_pi * kx
    cols[:, 1, 1] = -two_pi * ky
    cols[:, 0, 2] = -(two_pi**2) * kx * kx
    cols[:, 0, 3] = -(two_pi**2) * ky * ky
    cols[:, 0, 4] = -(two_pi**2) * kx * ky
    cols = xp.asarray(cols.reshape(2 * ny * nx, 5).astype(rdtype))
    delta = xp.zeros((p_count, fa, 2), dtype=xp.float64)

    def run(sl: slice) -> None:
        g = _aligned_chunk(spec, dd, sl)
        gc = g.sum(axis=1, keepdims=True) - g
        xp.conjugate(gc, out=gc)
        gc *= spec.weight
        gc *= g  # G_t conj(A - G_t) w: the step multiplies it by e^{2πik·δ}
        step_delta = delta[sl]
        for _ in range(steps):
            ey, ex = shift_phases(spec, step_delta)
            prod = gc * ey[..., :, None]
            prod *= ex[..., None, :]
            sums = xp.matmul(prod.reshape(*prod.shape[:2], -1).view(rdtype), cols).astype(xp.float64)
            step_delta += _newton_step(sums, damping, max_step, xp)
        delta[sl] = step_delta

    backend.map_chunks(run, p_count, _chunk(spec), xp)
    out[:, spec.frames] += backend.to_numpy(delta)
    return out - out.mean(axis=1, keepdims=True)


def _newton_step(sums: Any, damping: float, max_step: float, xp: Any) -> Any:
    """(..., 2) damped, clipped ascent step from (..., 5) sums (gx, gy, hxx, hyy, hxy) of a concave-ish score."""
    gx, gy, hxx, hyy, hxy = (sums[..., i] for i in range(5))
    # maximise: step = (-H + shift·I)^-1 g, shift making the system's smallest eigenvalue >= μ
    mu = damping * (xp.abs(hxx) + xp.abs(hyy)) + 1e-30
    a11, a22, a12 = -hxx, -hyy, -hxy
    lam_min = 0.5 * (a11 + a22) - xp.sqrt(0.25 * (a11 - a22) ** 2 + a12**2)
    shift = xp.maximum(mu - lam_min, 0.0)
    a11 = a11 + shift
    a22 = a22 + shift
    det = a11 * a22 - a12 * a12
    ok = det > 0
    det = xp.where(ok, det, 1.0)
    sx = xp.where(ok, (a22 * gx - a12 * gy) / det, 0.0)
    sy = xp.where(ok, (a11 * gy - a12 * gx) / det, 0.0)
    step = xp.stack([sx, sy], axis=-1)
    norm = xp.sqrt((step**2).sum(-1, keepdims=True))
    return step * xp.minimum(1.0, max_step / xp.maximum(norm, 1e-12))


# -- entry point -----------------------------------------------------------------------------


def background_share(positions: np.ndarray, box: int, frame_shape: tuple[int, int], cell: int = 8) -> float:
    """Fraction of the frame ``(h, w)`` outside every ``box``² alignment box around ``positions`` (P, 2) px.

    The share of the motion stage's evidence the common term takes as the background's own
    (module docstring): the rest of that evidence came from the particles, which enter in full
    through their own likelihood. Rasterised on ``cell``-px cells.
    """
    h, w = frame_shape
    ny, nx = -(-h // cell), -(-w // cell)
    covered = np.zeros((ny, nx), dtype=bool)
    half = box / 2.0
    for x, y in np.asarray(positions, dtype=np.float64).reshape(-1, 2):
        x0, x1 = int(max(0, (x - half) // cell)), int(min(nx, -(-(x + half) // cell)))
        y0, y1 = int(max(0, (y - half) // cell)), int(min(ny, -(-(y + half) // cell)))
        covered[y0:y1, x0:x1] = True
    return float(1.0 - covered.mean())


def overlap_weights(positions: np.ndarray, box: int, cells: int = 32) -> np.ndarray:
    """(P,) per-particle likelihood weights ``w_p = Σ_x m_p² / Σ_x m_p M`` for alignment boxes of ``box`` px
    around ``positions`` (P, 2) px: ``m_p`` is particle p's patch mask (:func:`gpu.local_model.soft_mask`)
    and ``M = Σ_q m_q`` the masks of all particles, sampled on a grid of ``box / cells`` px.

    Overlapping patches share pixels: a particle's likelihood is linear in the masked pixels' noise,
    so where masks overlap the particles' scores are correlated, and their sum's variance is
    ``Σ_x M²`` against a curvature of ``Σ_x Σ_p m_p²`` (per unit of the local image information).
    Weighting particle p's log-likelihood by ``w_p`` (a composite likelihood) makes the two agree:
    ``w_p = 1`` for a particle whose mask overlaps no other, ``1/2`` for two identical masks. On the
    simulated sessions of benchmarks/quality.py the score's variance at the true trajectories was
    2-2.5 times its curvature where the boxes covered the frame 3-4 times (0.83 Å/px with 450 px
    boxes; 240 picks on 2048²) and 1.0-1.2 times elsewhere (BENCHMARKS.md).
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if len(pos) == 0:
        return np.ones(0)
    cell = box / cells
    lo = pos.min(axis=0) - box
    shape = tuple(int(v) for v in np.ceil((pos.max(axis=0) - lo + box) / cell)[::-1])  # (ny, nx)
    grid = np.zeros(shape)
    patches = []
    for x, y in (pos - lo) / cell:
        x0, y0 = int(np.floor(x - cells / 2)), int(np.floor(y - cells / 2))
        yy, xx = np.mgrid[y0 : y0 + cells + 1, x0 : x0 + cells + 1]
        r = np.hypot(yy + 0.5 - y, xx + 0.5 - x) / cells  # cell centres, in box units
        m = mask_profile(r)
        grid[y0 : y0 + cells + 1, x0 : x0 + cells + 1] += m
        patches.append((y0, x0, m))
    return np.array([(m * m).sum() / (m * grid[y0 : y0 + cells + 1, x0 : x0 + cells + 1]).sum() for y0, x0, m in patches])


def weight_overlaps(spectra: BandSpectra, positions: np.ndarray) -> np.ndarray:
    """Weight each particle's log-likelihood by :func:`overlap_weights` in place (it scales with
    ``|x|²``: the spectra by the square root) and return the (P,) weights."""
    weights = overlap_weights(positions, spectra.box)
    if len(weights) and weights.min() < 1.0:
        spectra.x *= spectra.xp.asarray(np.sqrt(weights)[:, None, None, None], dtype=spectra.rdtype)
        spectra.self_power = None
    return weights


def _frame_folds(n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n)
    return idx[0::2], idx[1::2]


@dataclass
class CrossValidation:
    """Held-out scores of one model (see :func:`cross_validate`).

    ``gains``: per candidate name, (P,) per-particle held-out log-likelihood gain over full-frame
    (nats, both folds summed); ``base``: (P,) held-out cross-frame log-likelihood term at
    full-frame (the coherent signal the gains are relative to); ``folds``: per fold, the candidate
    trajectories (P, F, 2) px fitted on that fold's training frames; ``params``: the fitted ``z``
    of each fold (their mean starts the fit to all frames).
    """

    gains: dict[str, np.ndarray]
    base: np.ndarray
    folds: list[dict[str, np.ndarray]]
    params: list[np.ndarray] = field(default_factory=list)


def cross_validate(spec: BandSpectra, model: TrajectoryModel, max_iter: int = MAX_ITER) -> CrossValidation:
    """Fit on the even alignment frames and score on the odd ones, and vice versa (module docstring).

    Candidates: "full-frame" (the common term alone: the improved full-frame trajectory; d = 0
    without it), "field" (common + field) and "field+residual"; gains are over d = 0, the motion
    stage's estimate.
    """
    even, odd = _frame_folds(len(spec.frames))
    zeros = np.zeros((model.P, model.F, 2))
    names = ("full-frame", "field", "field+residual") if model.residual else ("full-frame", "field")
    gains = {name: np.zeros(model.P) for name in names}
    base_total = np.zeros(model.P)
    folds: list[dict[str, np.ndarray]] = []
    params: list[np.ndarray] = []
    for train, test in ((even, odd), (odd, even)):
        z, _ = fit(spec.subset(train), model, max_iter)
        params.append(z)
        com, fld, res = model.parts(z)
        full = np.broadcast_to(com[None], zeros.shape)
        traj = {"full-frame": full, "field": full + fld, "field+residual": full + fld + res}
        folds.append(traj)
        held = spec.subset(test)
        base = backend.to_numpy(per_particle_term(held, zeros[:, held.frames]))
        base_total += base
        for name in names:
            gains[name] += backend.to_numpy(per_particle_term(held, traj[name][:, held.frames])) - base
    if not model.residual:
        gains["field+residual"] = gains["field"]
    return CrossValidation(gains, base_total, folds, params)


def guard_choice(gains: dict[str, np.ndarray], z: float = GUARD_Z) -> str:
    """Simplest candidate whose held-out gain is larger: "full-frame", "field" or "field+residual".

    ``gains``: per candidate, (P,) per-particle held-out gains (:class:`CrossValidation`). The start
    is "full-frame" (the improved full-frame trajectory; its own gain is reported, not tested: the
    common term is the joint posterior of the background and all particles, not a more complex
    model). A candidate replaces the current choice only when the sum over particles of its
    per-particle held-out gain difference is positive and exceeds ``z`` standard errors
    (``sqrt(P)·std`` of the differences; ``GUARD_Z`` = 0, module docstring).
    """
    choice = "full-frame"
    current = gains.get("full-frame", np.zeros_like(gains["field"]))
    for name in ("field", "field+residual"):
        diff = gains[name] - current
        se = math.sqrt(len(diff)) * float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0
        if diff.sum() > z * se and diff.sum() > 0:
            choice, current = name, gains[name]
    return choice


def estimate_local(
    patches: Any,
    remainders: Any,
    positions: Any,
    apix: float,
    dose_per_frame: float,
    pre_exposure: float,
    kv: float,
    params: LocalParams,
    *,
    motion: FrameMotion | None,
    quality: bool = True,
    max_iter: int = MAX_ITER,
    spectra: BandSpectra | None = None,
) -> LocalResult:
    """Local trajectories of all particles of one movie (module docstring).

    ``patches``: (P, F, a, a) float32 cut at ``round(c)``; ``remainders``: (P, F, 2) ``c - round(c)``
    px; ``positions``: (P, 2) px (x, y); ``params``: :class:`LocalParams`; ``motion``: the motion
    stage's :class:`gpu.motion.FrameMotion` (its posterior enters the common term; None, or
    ``params.common`` off, or a prior of zero: no common term, and the field keeps its constant
    mode); ``quality`` runs the cross-validation even when ``params.guard`` is off (for the quality
    signal). ``spectra``: precomputed :func:`gpu.local_model.prepare_spectra` output (``patches``
    may then be None); it is weighted in place by :func:`overlap_weights` where patches overlap.

    Returns :class:`LocalResult`: ``common`` (F, 2) px, zero-mean over frames (add it to the
    full-frame shifts: the improved full-frame trajectory); ``raw``/``smooth`` (P, F, 2) px, NumPy,
    zero-mean over frames, on top of it; ``info``: ``fallback`` (bool: no local motion applied),
    ``choice`` (full-frame | field | field+residual), ``heldout_gain`` (nats per candidate),
    ``quality`` (held-out even/odd FRC of the applied trajectories: frc_fullframe, frc_local,
    gain), ``quality_gain``, ``quality_best`` (the same for the best candidate before the guard),
    objective values, iterations, ``sigma_field``, ``common_rms_px``, seconds.
    """
    t0 = time.perf_counter()
    positions = np.asarray(backend.to_numpy(positions), dtype=np.float64).reshape(-1, 2)
    if spectra is None:
        xp = backend.array_module(patches)
        spectra = prepare_spectra(
            patches, xp.asarray(remainders), apix, dose_per_frame, pre_exposure, kv,
            band_low=params.band_low, band_high=params.band_high, bfactor=params.bfactor,
            first_frame=params.first_frame, last_frame=params.last_frame,
        )
    p_count, n_frames = spectra.x.shape[0], spectra.n_frames
    if len(positions) != p_count:
        raise ValueError(f"estimate_local: {len(positions)} positions for {p_count} particles")
    overlap = weight_overlaps(spectra, positions)
    if not np.isfinite(self_term(spectra)):
        raise ValueError("estimate_local: patches contain NaN or Inf values")
    info: dict[str, Any] = {"particles": p_count, "frames": n_frames, "seconds_prepare": round(time.perf_counter() - t0, 3),
                            "overlap_weight": round(float(overlap.mean()), 3) if p_count else 1.0}
    zeros = np.zeros((p_count, n_frames, 2))
    if p_count == 0:
        return LocalResult(zeros, zeros.copy(), np.zeros((n_frames, 2)),
                           {**info, "fallback": True, "choice": "full-frame", "quality_gain": 0.0})

    common = motion if params.common and motion is not None and motion.prior.any() else None
    psi = spatial_basis(positions, apix, params.correlation_length, params.kernel, centred=common is not None)
    share = background_share(positions, spectra.box, common.frame_shape) if common is not None else 0.0
    info["rank"] = int(psi.shape[1])
    info["common"] = common is not None
    info["background_share"] = round(share, 3)

    def make_model(k: float) -> TrajectoryModel:
        """The model with the field's prior scales multiplied by ``k`` (1 = the parameters')."""
        field_prior = None
        if params.field_scale > 0:
            field_prior = prior_precision(n_frames, dose_per_frame, pre_exposure, 1.0 / (k * params.field_scale) ** 2) * apix**2
        return TrajectoryModel(
            psi, n_frames, apix, dose_per_frame, k * params.sigma_field, params.sigma_velocity,
            params.sigma_acceleration, burst_exposure=params.burst_exposure, pre_exposure=pre_exposure,
            common=common, background_share=share, field_prior=field_prior,
        )

    t1 = time.perf_counter()
    scale = 1.0
    curv = frame_curvature(spectra, n_frames)
    if params.field_evidence and params.field_scale > 0 and not params.auto_smoothing:
        # the field's size differs between movies (1-8 Å): its prior scale by the evidence of a first fit
        first = make_model(1.0)
        z1, _ = fit(spectra, first, EVIDENCE_ITER, curv=curv)
        ev = field_scale_evidence(spectra, first, z1, curv, EVIDENCE_FACTORS)
        scale = EVIDENCE_FACTORS[int(np.argmax(ev))]
        info["field_evidence"] = [round(float(v - ev.max()), 2) for v in ev]
    validate = params.guard or quality or params.auto_smoothing
    cv: dict[float, CrossValidation] = {}
    if params.auto_smoothing:
        for k in (0.5, 1.0, 2.0):
            cv[k] = cross_validate(spectra, make_model(k), max_iter)
        scale = max(cv, key=lambda k: max(float(g.sum()) for g in cv[k].gains.values()))
    elif validate:
        cv[scale] = cross_validate(spectra, make_model(scale), max_iter)
    info["seconds_validate"] = round(time.perf_counter() - t1, 3)
    info["sigma_field"] = scale * params.sigma_field
    info["field_scale"] = scale * params.field_scale

    t2 = time.perf_counter()
    model = make_model(scale)
    # the folds' mean is close to the all-frames optimum: ~half the evaluations of a start from 0
    z0 = np.mean(cv[scale].params, axis=0) if scale in cv else None
    z, fit_info = fit(spectra, model, max_iter, z0=z0, curv=curv)
    info.update(fit_info)
    info["seconds_fit"] = round(time.perf_counter() - t2, 3)
    com, fld, res = model.parts(z)
    candidates = {"full-frame": zeros, "field": fld, "field+residual": fld + res}
    info["common_rms_px"] = round(float(np.sqrt((com**2).sum(-1).mean())), 4)

    choice = best = "field+residual" if model.residual else "field"
    if validate:
        val = cv[scale]
        info["heldout_gain"] = {k: round(float(v.sum()), 3) for k, v in val.gains.items()}
        best = max(("field", "field+residual"), key=lambda n: val.gains[n].sum())
        if params.guard:
            choice = guard_choice(val.gains)
        even, odd = _frame_folds(len(spectra.frames))
        for key, name in (("quality", choice), ("quality_best", best)):
            if key == "quality_best" and best == choice:
                info[key] = dict(info["quality"])
                continue
            info[key] = {
                **heldout_signal(val.gains[name], val.base),
                **heldout_frc(spectra, val.folds[0][name], val.folds[1][name], even, odd),
            }
    smooth = candidates[choice]
    info["choice"] = choice
    info["best"] = best
    info["fallback"] = choice == "full-frame"
    info["quality_gain"] = info["quality"]["gain"] if "quality" in info else float("nan")
    raw = per_frame_shifts(spectra, com[None] + smooth) - com[None]
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return LocalResult(raw=raw, smooth=smooth, common=com, info=info, candidates=candidates,
                       common_sd=common_uncertainty(model, curv))
