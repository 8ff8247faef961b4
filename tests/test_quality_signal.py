"""The per-movie reference-free quality signal (gpu/quality.py and the held-out scores of gpu/local.py)."""

from __future__ import annotations

import numpy as np
import pytest
from blob_particles import compact_blobs, counted_moving

from gpu.local import estimate_local
from gpu.local_model import BandSpectra, prepare_spectra
from gpu.quality import band_frc, evenodd_gain, heldout_signal, image_ring_sums, ring_frc, shell_frc
from streamer.config import LocalConfig

APIX = 2.0
CFG = LocalConfig(band_low=300.0, band_high=8.0, bfactor=0.0, correlation_length=4000.0)


def synthetic(rng: np.random.Generator, amplitude_px: float, p: int = 30, f: int = 16, box: int = 48):
    """Patches of compact random blobs (contrast ~0.3, ~2 counts/px/frame, Poisson) that follow a
    smooth local field of ``amplitude_px``, fastest early; plus sub-pixel remainders."""
    pos = rng.uniform(0, 3000, (p, 2))
    t = np.arange(f)
    g = 1.0 - np.exp(-(t + 0.5) / 3.0)
    phase = rng.uniform(0, 2 * np.pi, 2)
    field = np.stack([np.cos(2 * np.pi * pos[:, 0] / 4000 + phase[0]), np.sin(2 * np.pi * pos[:, 1] / 4000 + phase[1])], -1)
    d = amplitude_px * g[None, :, None] * field[:, None, :]
    d -= d.mean(axis=1, keepdims=True)
    blobs = compact_blobs(rng, p, box)
    rem = rng.uniform(-0.5, 0.5, (p, f, 2))
    return counted_moving(rng, blobs, rem + d), rem, pos * 1.0, d


def test_heldout_signal_sees_local_motion_and_its_absence() -> None:
    rng = np.random.default_rng(11)
    patches, rem, pos, d = synthetic(rng, amplitude_px=2.5)
    moving = estimate_local(patches, rem, pos, APIX, 2.0, 0.0, 300.0, CFG.params(), motion=None)
    assert moving.info["choice"] != "full-frame"
    assert moving.info["quality_gain"] > 0.01 and moving.info["quality"]["z"] > 2
    err = lambda s: np.sqrt(((s - d) ** 2).sum(-1).mean())  # noqa: E731
    assert err(moving.smooth) < 0.5 * err(np.zeros_like(d))

    patches, rem, pos, _ = synthetic(rng, amplitude_px=0.0)
    still = estimate_local(patches, rem, pos, APIX, 2.0, 0.0, 300.0, CFG.params(), motion=None)
    assert still.info["quality_best"]["gain"] < 0.005
    if still.info["fallback"]:
        assert still.info["quality_gain"] == 0.0


def test_insample_evenodd_frc_is_biased_where_heldout_is_not() -> None:
    """Without motion, trajectories fitted to all frames raise the even/odd FRC of those same
    frames (they align noise); the held-out score of the same model does not rise."""
    rng = np.random.default_rng(12)
    patches, rem, pos, _ = synthetic(rng, amplitude_px=0.0)
    spec = prepare_spectra(patches, rem, APIX, 2.0, band_low=CFG.band_low, band_high=CFG.band_high)
    res = estimate_local(None, None, pos, APIX, 2.0, 0.0, 300.0, LocalConfig(**{**CFG.__dict__, "guard": False}).params(),
                         motion=None, spectra=spec)
    best = res.info["best"]
    assert evenodd_gain(spec, res.candidates[best]) > 0
    assert res.info["heldout_gain"][best] < 0
    assert res.info["quality_best"]["gain"] < 0


def test_heldout_signal_formula() -> None:
    gain = np.array([1.0, 2.0, 3.0, 2.0])
    base = np.array([10.0, 10.0, 20.0, 60.0])
    out = heldout_signal(gain, base)
    assert out["gain"] == pytest.approx(8.0 / 100.0)
    assert out["z"] == pytest.approx(8.0 / (2.0 * np.std(gain, ddof=1)), rel=1e-3)


def test_shell_frc_equals_full_plane_frc() -> None:
    """Independent check: the half-plane pooled FRC equals numpy's full-plane FRC on the same rings."""
    rng = np.random.default_rng(13)
    box, n, p = 32, 8, 5
    a_img = rng.standard_normal((p, box, box))
    b_img = 0.7 * a_img + rng.standard_normal((p, box, box))
    fa, fb = np.fft.fft2(a_img), np.fft.fft2(b_img)
    iy = np.fft.fftfreq(box, 1.0 / box)[:, None]
    ix = np.fft.fftfreq(box, 1.0 / box)[None, :]
    ring = np.rint(np.hypot(iy, ix)).astype(int)
    rows = np.r_[box - n : box, 0 : n + 1]
    ha, hb = np.fft.rfft2(a_img)[:, rows, : n + 1], np.fft.rfft2(b_img)[:, rows, : n + 1]
    spec = prepare_spectra(np.zeros((1, 2, box, box), np.float32), np.zeros((1, 2, 2)), 1.0, 1.0, band_low=1e6, band_high=box / n)
    assert isinstance(spec, BandSpectra) and spec.shell.shape == ha.shape[1:]
    got = shell_frc(ha, hb, spec.shell, spec.band)
    for j in range(1, n + 1):
        sel = (ring == j) & (np.hypot(iy, ix) <= n)
        num = (fa[:, sel] * np.conj(fb[:, sel])).real.sum()
        want = num / np.sqrt((np.abs(fa[:, sel]) ** 2).sum() * (np.abs(fb[:, sel]) ** 2).sum())
        assert got[j] == pytest.approx(want, rel=1e-9)


def test_pooled_sums_add_up_over_movies() -> None:
    """The pooled FRC of a data set is the FRC of its movies' summed ring sums (how the demo pools)."""
    rng = np.random.default_rng(5)
    truth = rng.standard_normal((12, 32, 32)).astype(np.float32)
    noisy = truth + rng.standard_normal(truth.shape).astype(np.float32)
    whole = image_ring_sums(noisy, truth, 1.0, (20.0, 3.0))
    parts = image_ring_sums(noisy[:5], truth[:5], 1.0, (20.0, 3.0)) + image_ring_sums(noisy[5:], truth[5:], 1.0, (20.0, 3.0))
    np.testing.assert_allclose(parts, whole, rtol=1e-5)
    assert band_frc(whole) == pytest.approx(float(np.nanmean(ring_frc(whole))))
    assert np.isnan(band_frc(np.zeros((3, 5))))
