from __future__ import annotations

import pytest

from gpu.boxsize import electron_wavelength, good_box_size, recommended_box


@pytest.mark.parametrize("kv,lam", [(100, 0.03701), (200, 0.02508), (300, 0.01969)])
def test_relativistic_wavelength(kv, lam):
    assert electron_wavelength(kv) == pytest.approx(lam, abs=5e-6)


def test_rosenthal_henderson_example():
    # 300 kV, r = 3 Å, Δf = 2 µm: 2 λ Δf / r ≈ 262 Å (Rosenthal & Henderson 2003; docs/physics.md#geometry)
    r = recommended_box(diameter_A=150.0, defocus_A=20000.0, resolution_A=3.0, kv=300.0, apix=1.0)
    assert r["delocalisation_A"] == pytest.approx(262.5, abs=0.5)
    assert r["box_A"] == pytest.approx(150.0 + r["delocalisation_A"])
    assert r["box_px_min"] == 413 and r["box_px"] == 420  # 420 = 2² 3 5 7
    assert r["box_px_A"] == pytest.approx(420.0)
    half = recommended_box(150.0, 20000.0, 3.0, 300.0, apix=0.5)
    assert half["box_px_min"] == 826 and half["box_px"] == 840


def test_good_box_sizes_and_errors():
    assert [good_box_size(n) for n in (256, 257, 100.2, 9)] == [256, 270, 108, 10]
    with pytest.raises(ValueError, match=r"^recommended_box: diameter_A"):
        recommended_box(0.0, 1e4, 3.0, 300.0, 1.0)
    with pytest.raises(ValueError, match=r"^electron_wavelength: voltage"):
        electron_wavelength(0.0)
