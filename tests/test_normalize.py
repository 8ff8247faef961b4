from __future__ import annotations

import numpy as np
import pytest

from gpu.normalize import background_mask, default_bg_radius, normalize_background


def test_default_radius_is_relion_75_percent_diameter():
    assert default_bg_radius(128) == 48
    assert default_bg_radius(256) == 96
    assert default_bg_radius(100) == 38  # 37.5 rounds up
    assert default_bg_radius(12) == 5  # 4.5 rounds up (RELION's ROUND), not to even


def test_background_is_strictly_outside_the_circle_about_box_centre():
    m = background_mask(8, 3.0)
    assert not m[4, 4] and not m[4, 7] and not m[1, 4]  # distance 0, 3, 3 -> inside
    assert m[0, 4] and m[7, 7] and m[4, 0]  # distance 4, 4.2, 4 -> background


def test_background_has_zero_mean_unit_std():
    rng = np.random.default_rng(0)
    parts = (rng.normal(3.0, 2.5, (2, 3, 64, 64))).astype(np.float32)
    parts[..., 20:44, 20:44] += 10.0  # particle inside the circle must not enter the statistics
    out = normalize_background(parts)
    assert out.shape == parts.shape and out.dtype == np.float32
    yy, xx = np.mgrid[0:64, 0:64]
    bg = (xx - 32) ** 2 + (yy - 32) ** 2 > 24**2
    np.testing.assert_allclose(out[..., bg].mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[..., bg].std(axis=-1), 1.0, rtol=1e-5)
    ref = (parts[0, 0] - parts[0, 0][bg].mean()) / parts[0, 0][bg].std()
    np.testing.assert_allclose(out[0, 0], ref, atol=1e-5)
    np.testing.assert_allclose(normalize_background(parts, invert=True), -out, atol=1e-6)
    np.testing.assert_array_equal(normalize_background(parts, invert=True, normalize=False), -parts)
    same = normalize_background(parts, normalize=False)
    assert same is not parts and np.array_equal(same, parts)
    bg20 = (xx - 32) ** 2 + (yy - 32) ** 2 > 20**2
    out20 = normalize_background(parts, radius_px=20)
    np.testing.assert_allclose(out20[..., bg20].std(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out20[..., bg20].mean(axis=-1), 0.0, atol=1e-5)
    assert not np.allclose(out20, out)


def test_ramp_removes_a_plane():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float64)
    parts = (5.0 + 0.3 * xx - 0.2 * yy + rng.normal(0.0, 1.0, (4, 48, 48))).astype(np.float32)
    flat = normalize_background(parts, ramp=True)
    bg = background_mask(48, default_bg_radius(48))
    design = np.stack([np.ones(bg.sum()), xx[bg], yy[bg]], axis=1)
    coef, *_ = np.linalg.lstsq(design, flat[0][bg].astype(np.float64), rcond=None)
    assert np.abs(coef).max() < 1e-4  # no plane left
    assert flat[0][bg].std() == pytest.approx(1.0, rel=1e-4)
    assert normalize_background(parts)[0][bg].std() == pytest.approx(1.0, rel=1e-4)
    # mean-only leaves the gradient in place; the ramp removes it
    mean_only = normalize_background(parts)
    assert mean_only[..., -4:].mean() - mean_only[..., :4].mean() > 2.0
    assert abs(flat[..., -4:].mean() - flat[..., :4].mean()) < 0.2


def test_constant_background_and_bad_input():
    out = normalize_background(np.full((2, 16, 16), 4.0, np.float32))
    assert np.isfinite(out).all() and np.abs(out).max() == 0.0
    with pytest.raises(ValueError, match=r"^normalize_background: particles must be"):
        normalize_background(np.zeros((3, 16, 12), np.float32))
    with pytest.raises(ValueError, match=r"^normalize_background: background radius"):
        normalize_background(np.zeros((16, 16), np.float32), radius_px=30)
