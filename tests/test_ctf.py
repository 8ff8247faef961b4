from __future__ import annotations

import math

import numpy as np
import pytest

from gpu.ctf import ctf_1d, ctf_2d, electron_wavelength, frequency_grid


def test_wavelength_matches_reference_values() -> None:
    assert electron_wavelength(100) == pytest.approx(0.03701, abs=2e-5)
    assert electron_wavelength(200) == pytest.approx(0.02508, abs=2e-5)
    assert electron_wavelength(300) == pytest.approx(0.01969, abs=2e-5)


def _numeric_zeros(k: np.ndarray, values: np.ndarray) -> np.ndarray:
    s = np.sign(values)
    i = np.nonzero(s[:-1] * s[1:] < 0)[0]
    return k[i] - values[i] * (k[i + 1] - k[i]) / (values[i + 1] - values[i])


@pytest.mark.parametrize("phase_deg", [0.0, 90.0])
def test_1d_zeros_at_analytic_positions(phase_deg: float) -> None:
    """Zeros where χ = nπ - atan(A/sqrt(1-A²)), χ(u = k²) = πλΔf u - π/2 Cs λ³ u² + φ: the smaller root
    of a quadratic in u."""
    kv, cs_mm, amp, defocus = 300.0, 2.7, 0.1, 10000.0
    lam = electron_wavelength(kv)
    cs = cs_mm * 1e7
    alpha = math.atan(amp / math.sqrt(1 - amp * amp))
    phi = math.radians(phase_deg)
    expected = []
    for n in range(0, 12):
        c = n * math.pi - alpha - phi
        a, b = 0.5 * math.pi * cs * lam**3, -math.pi * lam * defocus
        disc = b * b - 4 * a * c
        u = (-b - math.sqrt(disc)) / (2 * a)
        if u > 0:
            expected.append(math.sqrt(u))
    expected = np.array(expected[:8])
    k = np.linspace(1e-4, expected[-1] + 0.005, 400_001)
    found = _numeric_zeros(k, ctf_1d(k, defocus, kv, cs_mm, amp, phase_shift_deg=phase_deg).astype(np.float64))
    assert len(found) >= len(expected)
    np.testing.assert_allclose(found[: len(expected)], expected, atol=2e-6)


def test_low_frequency_sign_is_relion() -> None:
    # RELION: CTF(0) = +A, rising towards +1 before the first zero when underfocused
    v = ctf_1d(np.array([0.0, 0.03]), 15000.0, 300.0, 2.7, 0.07)
    assert v[0] == pytest.approx(0.07, abs=1e-6)
    assert v[1] > 0.5


def _relion_literal(h, w, apix, du, dv, ang_deg, kv, cs_mm, q0, ps_deg, rfft):
    """RELION's CTF::getCTF written out per frequency (src/ctf.cpp initialise + src/ctf.h getCTF)."""
    volts = kv * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))
    k1 = math.pi / 2 * 2 * lam
    k2 = math.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    k5 = math.radians(ps_deg)
    avg, dev = -(du + dv) * 0.5, -(du - dv) * 0.5
    rad_az = math.radians(ang_deg)
    ncol = w // 2 + 1 if rfft else w
    out = np.zeros((h, ncol))
    for i in range(h):
        ip = i if i < (h + 1) // 2 else i - h
        for j in range(ncol):
            jp = j if (rfft or j < (w + 1) // 2) else j - w
            x, y = jp / (w * apix), ip / (h * apix)
            u2 = x * x + y * y
            deltaf = 0.0 if (x == 0 and y == 0) else avg + dev * math.cos(2 * (math.atan2(y, x) - rad_az))
            arg = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
            out[i, j] = -math.sin(arg)
    return out


@pytest.mark.parametrize("rfft", [True, False])
def test_2d_matches_relion_formula(rfft: bool) -> None:
    args = (24, 30, 1.3, 15000.0, 12000.0, 30.0, 300.0, 2.7, 0.1, 20.0)
    got = ctf_2d(*args[:9], phase_shift_deg=args[9], rfft=rfft)
    want = _relion_literal(*args, rfft)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_astigmatism_direction() -> None:
    # rlnDefocusAngle is the angle from the x axis (columns) to U: along x (row 0) the defocus is U
    h = w = 64
    k = np.fft.rfftfreq(w) / 1.0
    for ang, along_x in ((0.0, 20000.0), (90.0, 10000.0)):
        c = ctf_2d(h, w, 1.0, 20000.0, 10000.0, ang, 300.0, 2.7, 0.07)
        np.testing.assert_allclose(c[0], ctf_1d(k, along_x, 300.0, 2.7, 0.07), atol=1e-5)


def test_batched_defocus() -> None:
    du = np.array([9000.0, 15000.0, 21000.0])
    batch = ctf_2d(32, 32, 1.0, du, du - 500, np.array([0.0, 40.0, 80.0]), 300.0, 2.7, 0.07)
    assert batch.shape == (3, 32, 17)
    for i in range(3):
        one = ctf_2d(32, 32, 1.0, du[i], du[i] - 500, [0.0, 40.0, 80.0][i], 300.0, 2.7, 0.07)
        np.testing.assert_array_equal(batch[i], one)


def test_frequency_grid_units() -> None:
    kx, ky = frequency_grid(8, 8, 2.0)
    assert kx.shape == (8, 5)
    assert kx[0, 4] == pytest.approx(0.25)  # Nyquist of 2 Å pixels
    assert ky[4, 0] == pytest.approx(-0.25)


def test_bad_amplitude_contrast() -> None:
    with pytest.raises(ValueError, match="amplitude_contrast"):
        ctf_1d(np.array([0.1]), 10000.0, 300.0, 2.7, 1.2)


@pytest.mark.gpu
def test_gpu_matches_cpu() -> None:
    import cupy

    cpu = ctf_2d(48, 40, 1.1, 14000.0, 13000.0, 12.0, 300.0, 2.7, 0.07)
    gpu = ctf_2d(48, 40, 1.1, 14000.0, 13000.0, 12.0, 300.0, 2.7, 0.07, xp=cupy)
    np.testing.assert_allclose(cupy.asnumpy(gpu), cpu, atol=1e-5)
