"""Exposure weighting against the published Grant & Grigorieff numbers (eLife 4:e06980, 2015; docs/physics.md#dose-weighting)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu.dose import (
    alignment_bfactor,
    critical_exposure,
    cumulative_exposure,
    dose_weights,
    optimal_exposure,
    voltage_factor,
)


@pytest.mark.parametrize(("res_A", "ne"), [(10.0, 14.1), (5.0, 6.4), (3.0, 4.3), (2.0, 3.6)])
def test_critical_exposure_sanity_values(res_A: float, ne: float) -> None:
    assert critical_exposure(1.0 / res_A) == pytest.approx(ne, abs=0.06)


def test_formula_independently() -> None:
    k = 0.21
    assert critical_exposure(k) == pytest.approx(0.24499 * k**-1.6649 + 2.8141, rel=1e-12)
    assert optimal_exposure(k) == pytest.approx(2.51284 * critical_exposure(k))


def test_voltage_scaling_cistem_points() -> None:
    assert voltage_factor(300) == 1.0 and voltage_factor(200) == 0.8 and voltage_factor(100) == 0.532
    assert voltage_factor(250) == pytest.approx(0.9)
    assert critical_exposure(0.2, kv=200) == pytest.approx(0.8 * critical_exposure(0.2, kv=300))


def test_cumulative_exposure_is_end_of_frame() -> None:
    assert np.allclose(cumulative_exposure(3, 1.5, pre_exposure=2.0), [3.5, 5.0, 6.5])


def test_weights_formula_and_normalisation() -> None:
    k = np.array([0.0, 0.05, 0.2, 0.4])
    n_frames, dose, pre = 30, 1.2, 0.5
    w = dose_weights(k, n_frames, dose, pre_exposure=pre)
    assert w.shape == (n_frames, 4) and w.dtype == np.float32
    # sum of squares is one at every frequency
    assert np.allclose((w.astype(np.float64) ** 2).sum(0), 1.0, atol=1e-5)
    # DC: equal weights 1/sqrt(F)
    assert np.allclose(w[:, 0], 1 / math.sqrt(n_frames), atol=1e-6)
    # ratio between frames follows exp(-ΔN / (2 Ne)) computed by hand
    ne = 0.24499 * 0.2**-1.6649 + 2.8141
    expected = math.exp(-(pre + dose * 11 - (pre + dose * 1)) / (2 * ne))
    assert w[10, 2] / w[0, 2] == pytest.approx(expected, rel=1e-5)
    # later frames weigh less at high resolution
    assert np.all(np.diff(w[:, 3]) < 0)


def test_unnormalised_weights() -> None:
    w = dose_weights(np.array([0.25]), 5, 1.0, normalize=False)
    ne = 0.24499 * 0.25**-1.6649 + 2.8141
    assert np.allclose(w[:, 0], np.exp(-np.arange(1, 6) / (2 * ne)), rtol=1e-6)


def test_alignment_bfactor_is_the_characteristic_function_of_a_gaussian_error() -> None:
    """exp(-B k²/4) with B from the 2-D standard deviation equals the Monte-Carlo mean of the phase
    factor exp(-2πi k·u) over an isotropic Gaussian error u (an independent computation)."""
    rng = np.random.default_rng(0)
    sd = 0.8  # Å, sqrt(var_x + var_y)
    u = rng.normal(scale=sd / math.sqrt(2), size=(400_000, 2))
    for k in ([0.25, 0.0], [0.1, 0.2], [0.0, 0.4]):
        measured = np.mean(np.exp(-2j * np.pi * (u @ np.array(k)))).real
        b = alignment_bfactor(sd)
        assert measured == pytest.approx(math.exp(-b * float(np.dot(k, k)) / 4), abs=4e-3)
    assert alignment_bfactor(np.array([0.0, 1.0])).tolist() == pytest.approx([0.0, 4 * math.pi**2])


def test_frame_bfactors_multiply_each_frame_before_the_normalisation() -> None:
    k = np.array([0.0, 0.1, 0.3])
    b = np.array([20.0, 5.0, 0.0, 0.0, 0.0])
    plain = dose_weights(k, 5, 1.0, normalize=False).astype(np.float64)
    expected = plain * np.exp(-b[:, None] * k[None] ** 2 / 4)
    expected /= np.sqrt((expected**2).sum(0))
    w = dose_weights(k, 5, 1.0, frame_bfactors=b)
    assert np.allclose(w, expected, rtol=1e-5)
    assert np.allclose((w.astype(np.float64) ** 2).sum(0), 1.0, atol=1e-5)
    assert w[0, 2] < dose_weights(k, 5, 1.0)[0, 2]  # the uncertain first frame counts less at 3 Å
    assert np.allclose(dose_weights(k, 5, 1.0, frame_bfactors=np.zeros(5)), dose_weights(k, 5, 1.0))
    for bad in (np.zeros(4), np.array([1.0, -1, 0, 0, 0]), np.array([np.nan, 0, 0, 0, 0])):
        with pytest.raises(ValueError, match="frame_bfactors"):
            dose_weights(k, 5, 1.0, frame_bfactors=bad)
