"""Scores of per-particle motion correction against a simulated session's truth (streamer/sim/simulate.py).

Used by ``benchmarks/quality.py`` and the tests; importable by anyone who tunes the motion model.

Conventions: trajectories are ``(n, F, 2)`` (particles, frames, (dx, dy)) in Å unless stated, in
the trajectory convention of gpu/__init__.py (a feature at ``p`` in the reference frame is at
``p + s_t`` in frame ``t``). A trajectory's mean over frames is a constant offset of the particle,
which 3-D refinement re-centres, so every error here is *centred*: each trajectory minus its mean
over frames, estimate and truth alike.

* :func:`trajectory_rmse`: RMS over particles and frames of ``|centred(est) - centred(truth)|``.
* :func:`common_mode`: per frame, the mean over particles of that centred error: the part of the
  error shared by every particle of the frame, which no per-particle term corrects. Note that the
  true full-frame trajectory has a (small) common-mode error too whenever the local motion does not
  average to zero over the particles that were picked (the simulated field averages to zero over
  the field of view, not over a few dozen particles).
* :func:`smooth_field_fit`: the best a smooth field without a per-particle term could do: per frame,
  a polynomial of total degree 3 in (x, y) fitted by least squares to the true trajectories.
* :func:`reference_offsets`: where the noise-free truth image of each particle sits in a box that
  was extracted centred on its pick along a trajectory: at ``true position - pick + mean_t(truth_t
  - est_t)``. Shifting the reference there scores each method without its constant offset (as the
  centred error) and without any noisy per-particle alignment.
* :func:`oracle_fraction`: ``(score - baseline) / (oracle - baseline)``.
* :func:`pick_ids`: which simulated particle each position (a pick as read back) belongs to.
"""

from __future__ import annotations

import numpy as np

EDGE_FRAMES = 6  # frames at each end reported apart: a fast start and the last frames are where priors fail


def pick_ids(xy: np.ndarray, truth: dict, tol_px: float) -> np.ndarray:
    """(n,) int: for each ``xy`` (n, 2) movie px, the particle id (``truth["pick_particle"]``) of the
    nearest written pick (``truth["picks"]``) when it lies within ``tol_px``; -1 for junk picks and for
    positions near no pick."""
    picks = np.asarray(truth["picks"], np.float64)
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if len(picks) == 0:
        return np.full(len(xy), -1)
    d = np.hypot(*(xy[:, None, :] - picks[None, :, :]).transpose(2, 0, 1))
    nearest = d.argmin(axis=1)
    return np.where(d[np.arange(len(xy)), nearest] < tol_px, truth["pick_particle"][nearest], -1)


def centred(traj: np.ndarray) -> np.ndarray:
    """Each trajectory of ``(..., F, 2)`` minus its mean over frames."""
    t = np.asarray(traj, np.float64)
    return t - t.mean(axis=-2, keepdims=True)


def centred_error(est: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(n, F, 2) ``centred(est) - centred(truth)``; ``est`` may be (F, 2) (one trajectory for all)."""
    truth = np.asarray(truth, np.float64)
    return centred(np.broadcast_to(est, truth.shape)) - centred(truth)


def trajectory_rmse(est: np.ndarray, truth: np.ndarray) -> float:
    """RMS over particles and frames of the centred error (Å if the inputs are)."""
    e = centred_error(est, truth)
    return float(np.sqrt((e**2).sum(-1).mean())) if e.size else float("nan")


def common_mode(est: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(F, 2) the mean over particles of the centred error, per frame."""
    return centred_error(est, truth).mean(axis=0)


def common_mode_summary(cm: np.ndarray, edge: int = EDGE_FRAMES) -> dict[str, float]:
    """``rms`` over frames of ``|cm_t|``, the ``worst`` frame, and the RMS over the ``first`` and
    ``last`` ``edge`` frames."""
    mag2 = (np.asarray(cm, np.float64) ** 2).sum(-1)
    return {
        "rms": float(np.sqrt(mag2.mean())),
        "worst": float(np.sqrt(mag2.max())),
        "first": float(np.sqrt(mag2[:edge].mean())),
        "last": float(np.sqrt(mag2[-edge:].mean())),
    }


def polynomial_terms(xy: np.ndarray, degree: int = 3) -> np.ndarray:
    """(n, T) monomials ``x^i y^j``, ``i + j <= degree``, of positions ``xy`` (n, 2) scaled to [-1, 1]
    over their own extent (for conditioning; the fitted values do not depend on it)."""
    xy = np.asarray(xy, np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    u = 2 * (xy - lo) / np.where(hi > lo, hi - lo, 1.0) - 1
    return np.stack([u[:, 0] ** i * u[:, 1] ** j for i in range(degree + 1) for j in range(degree + 1 - i)], -1)


def smooth_field_fit(positions: np.ndarray, traj: np.ndarray, degree: int = 3) -> np.ndarray:
    """(n, F, 2) per frame and axis the least-squares polynomial of total ``degree`` in the
    ``positions`` (n, 2) through ``traj`` (n, F, 2), evaluated at the same positions."""
    traj = np.asarray(traj, np.float64)
    n, f, _ = traj.shape
    a = polynomial_terms(positions, degree)
    coef, *_ = np.linalg.lstsq(a, traj.reshape(n, 2 * f), rcond=None)
    return (a @ coef).reshape(n, f, 2)


def reference_offsets(true_pos: np.ndarray, picks: np.ndarray, truth_px: np.ndarray, est_px: np.ndarray) -> np.ndarray:
    """(n, 2) px: where the truth image of each particle sits in its extracted box (module docstring).

    ``true_pos``, ``picks``: (n, 2) px; ``truth_px``: (n, F, 2) true trajectories, px; ``est_px``: the
    trajectories extracted along, (n, F, 2) or (F, 2), px.
    """
    truth_px = np.asarray(truth_px, np.float64)
    drift = (truth_px - np.broadcast_to(est_px, truth_px.shape)).mean(axis=1)
    return np.asarray(true_pos, np.float64) - np.asarray(picks, np.float64) + drift


def oracle_fraction(score: float, baseline: float, oracle: float) -> float:
    """``(score - baseline) / (oracle - baseline)``; NaN when the oracle gains nothing over the baseline."""
    gap = oracle - baseline
    return float((score - baseline) / gap) if gap > 0 else float("nan")
