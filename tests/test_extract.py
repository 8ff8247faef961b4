from __future__ import annotations

import numpy as np
import pytest

from gpu.crop import crop_window, fold_window, fourier_crop_rfft
from gpu.dose import dose_weights
from gpu.extract import EDGE_REASON, chunk_shape, cut_patches, extract_particles, window_ramps, window_sum
from gpu.shift import phase_ramp


def blob(x, y, s=1.0):
    """Smooth asymmetric particle (effectively band-limited), centred at the origin; ``s`` scales its size."""
    return np.exp(-(x**2 + y**2) / (2 * (3.0 * s) ** 2)) + 0.5 * np.exp(
        -((x - 4 * s) ** 2 + (y + 2 * s) ** 2) / (2 * (2.5 * s) ** 2)
    )


def make_movie(pos, traj, shape, s=1.0):
    """Frames ``(F, h, w)`` with particle p at ``pos_p + traj_{p,t}`` in frame t, evaluated analytically."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = np.zeros((traj.shape[1], h, w), np.float32)
    for t in range(traj.shape[1]):
        for p in range(len(pos)):
            c = pos[p] + traj[p, t]
            frames[t] += blob(xx - c[0], yy - c[1], s).astype(np.float32)
    return frames


@pytest.fixture(scope="module")
def movie():
    n_f = 6
    pos = np.array([[40.3, 40.8], [120.45, 90.1], [60.0, 125.0]])
    traj = np.cumsum(np.random.default_rng(0).normal(0.0, 0.7, (3, n_f, 2)), axis=1)
    return make_movie(pos, traj, (160, 192)), pos, traj


def test_cut_patches_matches_slicing_and_padding():
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((4, 50, 60)).astype(np.float32)
    centres = np.stack([rng.integers(8, 42, (5, 4)), rng.integers(8, 42, (5, 4))], axis=-1)
    centres[..., 0] += 5
    got = cut_patches(frames, centres, 16)
    assert got.shape == (5, 4, 16, 16)
    for p in range(5):
        for t in range(4):
            x, y = centres[p, t]
            np.testing.assert_array_equal(got[p, t], frames[t, y - 8 : y + 8, x - 8 : x + 8])
    edge = np.array([[[3, 45]] * 4])  # box spills over the left and bottom edges
    with pytest.raises(ValueError, match=r"^cut_patches: 1 boxes leave"):
        cut_patches(frames, edge, 16)
    padded = cut_patches(frames, edge, 16, fill="mean")
    means = frames.mean(axis=(1, 2))
    for t in range(4):
        ref = np.full((16, 16), means[t], np.float32)
        ref[: 50 - 37, 5:] = frames[t, 37:50, 0:11]
        np.testing.assert_allclose(padded[0, t], ref, rtol=1e-6)


def test_moving_particles_are_recovered_centred(movie):
    frames, pos, traj = movie
    parts, kept, skipped = extract_particles(frames, pos, traj, 64, 64, apix=1.0)
    assert parts.shape == (3, 64, 64) and parts.dtype == np.float32
    assert kept.tolist() == [0, 1, 2] and skipped == []
    by, bx = np.mgrid[0:64, 0:64].astype(np.float64)
    ref = 6 * blob(bx - 32, by - 32)  # plain sum of 6 frames, centred on pixel box // 2
    for p in range(3):
        np.testing.assert_allclose(parts[p], ref, atol=1e-5 * ref.max())
    # without the per-frame trajectory the particle is off-centre/blurred
    wrong, _, _ = extract_particles(frames, pos, np.zeros_like(traj), 64, 64, apix=1.0)
    assert np.abs(wrong[0] - ref).max() > 0.05 * ref.max()


def test_dose_weighting_against_direct_fourier_computation(movie):
    frames, pos, traj = movie
    dose = {"dose_per_frame": 4.0, "pre_exposure": 1.0, "kv": 300.0}
    apix = 1.2
    parts, _, _ = extract_particles(frames, pos, traj, 64, 64, apix=apix, dose=dose)
    by, bx = np.mgrid[0:64, 0:64].astype(np.float64)
    k = np.hypot(np.fft.fftfreq(64)[:, None], np.fft.rfftfreq(64)[None, :]) / apix
    total = dose_weights(k, 6, 4.0, 1.0, 300.0).astype(np.float64).sum(axis=0)  # Σ_f q_f(k)
    ref = np.fft.irfft2(np.fft.rfft2(blob(bx - 32, by - 32)) * total, s=(64, 64))
    np.testing.assert_allclose(parts[1], ref, atol=2e-5 * ref.max())
    assert np.abs(parts[1] - 6 * blob(bx - 32, by - 32)).max() > 0.1  # weighting changed it
    # precomputed weights on the full (F, box, box//2+1) grid give the same
    full = dose_weights(k, 6, 4.0, 1.0, 300.0)
    again, _, _ = extract_particles(frames, pos, traj, 64, 64, apix=apix, dose=full)
    np.testing.assert_allclose(again, parts, atol=1e-5)
    with pytest.raises(ValueError, match=r"^extract_particles: dose weights must be"):
        extract_particles(frames, pos, traj, 64, 64, apix=apix, dose=full[:, :10])


def test_fourier_crop_equals_the_reference_on_the_coarse_grid():
    pos = np.array([[60.7, 64.2], [140.1, 70.55]])
    traj = np.cumsum(np.random.default_rng(2).normal(0.0, 0.8, (2, 5, 2)), axis=1)
    frames = make_movie(pos, traj, (140, 200), s=1.6)  # broad enough to be band-limited at 2x binning
    parts, _, _ = extract_particles(frames, pos, traj, 64, 32, apix=1.0, chunk=1)
    assert parts.shape == (2, 32, 32)
    cy, cx = np.mgrid[0:32, 0:32].astype(np.float64)
    ref = 5 * blob(2 * cx - 32, 2 * cy - 32, s=1.6)  # coarse pixel i sits at fine 2i; centre 16 -> 32
    for p in range(2):
        np.testing.assert_allclose(parts[p], ref, atol=1e-5 * ref.max())


def test_skip_and_pad_at_the_frame_edges():
    rng = np.random.default_rng(3)
    n_f, h, w, box = 5, 100, 120, 32
    frames = rng.standard_normal((n_f, h, w)).astype(np.float32) + np.arange(n_f, dtype=np.float32)[:, None, None]
    pos = np.array([[60.0, 50.0], [20.0, 50.0], [60.0, 5.0], [200.0, 50.0]])
    traj = np.zeros((4, n_f, 2))
    traj[1, -1] = [-5.0, 0.0]  # leaves the frame in the last frame only
    parts, kept, skipped = extract_particles(frames, pos, traj, box, box, 1.0, edge="skip")
    assert kept.tolist() == [0] and parts.shape == (1, box, box)
    assert skipped == [(1, EDGE_REASON), (2, EDGE_REASON), (3, EDGE_REASON)]
    padded, kept_p, skipped_p = extract_particles(frames, pos, traj, box, box, 1.0, edge="pad")
    assert kept_p.tolist() == [0, 1, 2, 3] and skipped_p == []
    np.testing.assert_allclose(padded[0], parts[0], atol=1e-4)
    # pad == extracting from frames padded with each frame's mean
    big = np.broadcast_to(frames.mean(axis=(1, 2))[:, None, None], (n_f, h + 200, w + 200)).copy()
    big[:, 100:-100, 100:-100] = frames
    ref, _, _ = extract_particles(big, pos + 100.0, traj, box, box, 1.0, edge="skip")
    np.testing.assert_allclose(padded, ref, atol=1e-4)


def test_chunking_and_shared_trajectory_give_identical_results(movie):
    frames, pos, traj = movie
    shared = traj[1]
    a, _, _ = extract_particles(frames, pos, shared, 48, 40, 1.0, chunk=1)
    b, _, _ = extract_particles(frames, pos, np.broadcast_to(shared, traj.shape), 48, 40, 1.0, memory_budget=1 << 34)
    np.testing.assert_allclose(a, b, atol=1e-5)
    empty, kept, _ = extract_particles(frames, np.zeros((0, 2)), np.zeros((0, 6, 2)), 48, 40, 1.0)
    assert empty.shape == (0, 40, 40) and kept.size == 0
    with pytest.raises(ValueError, match=r"^extract_particles: edge must be"):
        extract_particles(frames, pos, traj, 48, 40, 1.0, edge="wrap")


@pytest.mark.parametrize(("box", "out_box"), [(48, 48), (48, 24), (48, 27), (50, 32)])
def test_window_sum_equals_per_frame_shifted_weighted_and_cropped_spectra(box, out_box):
    # Σ_f q_f(k) e^{+2πik·frac_f} FFT(patch_f), Fourier-cropped, with every patch transformed on its own in float64
    rng = np.random.default_rng(8)
    n_p, n_f = 3, 4
    patches = rng.standard_normal((n_p, n_f, box, box)).astype(np.float32)
    frac = rng.uniform(-0.5, 0.5, (n_p, n_f, 2))
    win = crop_window(box, box, out_box, out_box)
    k = np.hypot(win.ky[:, None], win.kx[None, :])
    weights = dose_weights(k, n_f, 3.0)
    ramps = window_ramps(frac, win, np)
    got = fold_window(window_sum(patches, ramps, win, weights), win)
    assert got.shape == (n_p, out_box, out_box // 2 + 1) and got.dtype == np.complex64
    full_w = dose_weights(np.hypot(np.fft.fftfreq(box)[:, None], np.fft.rfftfreq(box)[None, :]), n_f, 3.0)
    spec = np.fft.rfft2(patches.astype(np.float64)) * phase_ramp(-frac, box, box).astype(np.complex128)
    want = fourier_crop_rfft((spec * full_w).sum(axis=1), (out_box, out_box), box)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    plain = fourier_crop_rfft(spec.sum(axis=1), (out_box, out_box), box)
    np.testing.assert_allclose(fold_window(window_sum(patches, ramps, win), win), plain, atol=2e-5 * np.abs(plain).max())
    # in frame steps, added up
    steps = window_sum(patches[:, :3], (ramps[0][:, :3], ramps[1][:, :3]), win, weights[:3])
    window_sum(patches[:, 3:], (ramps[0][:, 3:], ramps[1][:, 3:]), win, weights[3:], out=steps)
    np.testing.assert_allclose(fold_window(steps, win), want, atol=2e-5 * np.abs(want).max())


def test_chunk_shape_splits_frames_only_when_one_particle_does_not_fit():
    per = 64 * 64 * 4 + 64 * 33 * 8 + 2 * 33 * 17 * 8  # one patch's working set, box 64 -> 32
    assert chunk_shape(10, 64, 32, 25 * per) == (2, 10)
    assert chunk_shape(10, 64, 32, 4 * per) == (1, 4)  # 3 equal steps of at most 4 frames
    assert chunk_shape(40, 64, 32, 12 * per) == (1, 10)
    assert chunk_shape(10, 64, 32, 4 * per, particles=2) == (2, 2)
    assert chunk_shape(10, 64, 32, 1) == (1, 1)
