from __future__ import annotations

import numpy as np
import pytest

from gpu.gain import _gain_by_frame_chunks, apply_gain, gain_multiplier, hot_pixel_mask, orient_gain, replace_pixels


def test_orient_gain_rotates_ccw_then_flips():
    g = np.arange(6).reshape(2, 3)  # [[0 1 2] [3 4 5]]
    np.testing.assert_array_equal(orient_gain(g, rotate=1), [[2, 5], [1, 4], [0, 3]])
    np.testing.assert_array_equal(orient_gain(g, rotate=1, flip_x=True), [[5, 2], [4, 1], [3, 0]])
    np.testing.assert_array_equal(orient_gain(g, rotate=1, flip_y=True), [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(orient_gain(g, rotate=-1), np.rot90(g, 3))


def _oriented_by_hand(g: np.ndarray, rotate: int, flip_x: bool, flip_y: bool) -> np.ndarray:
    """The convention applied pixel by pixel, without numpy's rot90 or slicing: one counter-clockwise
    quarter turn of an (h, w) image puts its pixel (r, c) at (w - 1 - c, r) of a (w, h) image."""
    img = [list(row) for row in g]
    for _ in range(rotate % 4):
        h, w = len(img), len(img[0])
        turned = [[0.0] * h for _ in range(w)]
        for r in range(h):
            for c in range(w):
                turned[w - 1 - c][r] = img[r][c]
        img = turned
    if flip_x:
        img = [row[::-1] for row in img]
    if flip_y:
        img = img[::-1]
    return np.array(img)


@pytest.mark.parametrize("rotate", [0, 1, 2, 3, -1, 5])
@pytest.mark.parametrize("flip_x", [False, True])
@pytest.mark.parametrize("flip_y", [False, True])
def test_orient_gain_matches_the_convention_pixel_by_pixel(rotate: int, flip_x: bool, flip_y: bool) -> None:
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = orient_gain(g, rotate, flip_x, flip_y)
    np.testing.assert_array_equal(out, _oriented_by_hand(g, rotate, flip_x, flip_y))
    assert out.flags.c_contiguous


def test_gain_multiplier_zero_where_not_finite_or_undefined() -> None:
    g = np.array([[2.0, 0.0, np.nan, np.inf], [-np.inf, 0.5, 3.0, -4.0]], np.float32)
    flat = [float(v) for v in g.ravel()]
    finite = [v == v and v not in (float("inf"), float("-inf")) for v in flat]
    times = [v if ok else 0.0 for v, ok in zip(flat, finite, strict=True)]
    over = [1.0 / v if ok and v != 0 else 0.0 for v, ok in zip(flat, finite, strict=True)]
    for mode, want in (("multiply", times), ("divide", over)):
        m = gain_multiplier(g, mode)
        assert m.dtype == np.float32 and m.shape == g.shape and np.isfinite(m).all()
        np.testing.assert_allclose(m.ravel(), want, rtol=1e-7, err_msg=mode)


def test_gain_multiplier_modes():
    g = np.array([[2.0, 0.0], [0.5, 4.0]], np.float32)
    np.testing.assert_array_equal(gain_multiplier(g, "multiply"), g)
    np.testing.assert_array_equal(gain_multiplier(g, "divide"), [[0.5, 0.0], [2.0, 0.25]])
    with pytest.raises(ValueError, match=r"^gain_multiplier: gain mode"):
        gain_multiplier(g, "add")


def test_apply_gain_casts_and_multiplies_in_chunks():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 6, size=(7, 30, 40)).astype(np.uint8)
    gain = rng.uniform(0.8, 1.2, size=(30, 40)).astype(np.float32)
    out = apply_gain(frames, gain, chunk=3)
    assert out.dtype == np.float32 and out.shape == frames.shape
    np.testing.assert_array_equal(out, frames.astype(np.float32) * gain)
    np.testing.assert_array_equal(apply_gain(frames, None), frames.astype(np.float32))
    already = frames.astype(np.float32)
    assert apply_gain(already, None) is already
    with pytest.raises(ValueError, match=r"^apply_gain: gain of shape \(40, 30\)"):
        apply_gain(frames, gain.T)


def test_apply_gain_frame_sum_on_threads_equals_the_sum_of_the_output():
    """sum_out accumulated block by block on 2 threads == the output summed over frames afterwards."""
    from gpu import backend

    rng = np.random.default_rng(11)
    frames = rng.integers(0, 9, size=(9, 700, 500)).astype(np.uint8)  # several 1 MiB row blocks
    gain = rng.uniform(0.8, 1.2, size=(700, 500)).astype(np.float32)
    backend.set_threads(2)
    try:
        total = np.empty((700, 500), np.float32)
        out = apply_gain(frames, gain, sum_out=total)
    finally:
        backend.set_threads(0)
    np.testing.assert_array_equal(out, frames.astype(np.float32) * gain)
    np.testing.assert_allclose(total, out.astype(np.float64).sum(axis=0), rtol=1e-6)
    same = frames.astype(np.float32)
    total2 = np.empty((700, 500), np.float32)
    assert apply_gain(same, None, sum_out=total2) is same
    np.testing.assert_allclose(total2, same.sum(axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"^apply_gain: sum_out"):
        apply_gain(frames, gain, sum_out=np.empty((5, 5), np.float32))


def test_apply_gain_with_explicit_xp_and_the_frame_chunk_loop():
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 9, size=(9, 24, 35)).astype(np.uint8)
    gain = rng.uniform(0.8, 1.2, size=(24, 35)).astype(np.float32)
    expected = frames.astype(np.float32) * gain  # independent: one whole-array cast and product
    np.testing.assert_array_equal(apply_gain(frames, gain, xp=np), expected)
    buf = np.full(frames.shape, np.nan, np.float32)
    assert apply_gain(frames, gain, out=buf, xp=np) is buf
    np.testing.assert_array_equal(buf, expected)
    # the GPU loop (host chunks uploaded one at a time) run with numpy: chunk 4 leaves a last chunk of 1
    for chunk in (1, 4, 9, 20):
        got = _gain_by_frame_chunks(frames, gain, np.full(frames.shape, np.nan, np.float32), chunk, np)
        np.testing.assert_array_equal(got, expected)
    got = _gain_by_frame_chunks(frames, None, np.full(frames.shape, np.nan, np.float32), 4, np)
    np.testing.assert_array_equal(got, frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"^apply_gain: out is \(9, 24, 35\) float64"):
        apply_gain(frames, gain, out=np.empty(frames.shape), xp=np)


@pytest.mark.gpu
def test_apply_gain_uploads_host_frames_in_chunks_on_the_device():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 9, size=(9, 64, 80)).astype(np.uint8)
    gain = rng.uniform(0.8, 1.2, size=(64, 80)).astype(np.float32)
    whole = apply_gain(cp.asarray(frames), cp.asarray(gain))  # the whole raw movie on the device
    for chunk in (1, 4, 9):
        got = apply_gain(frames, gain, chunk=chunk, xp=cp)
        assert isinstance(got, cp.ndarray) and got.dtype == cp.float32
        assert bool((got == whole).all())
    np.testing.assert_array_equal(cp.asnumpy(whole), apply_gain(frames, gain))
    buf = cp.empty(frames.shape, cp.float32)
    assert apply_gain(frames, gain, out=buf, xp=cp) is buf and bool((buf == whole).all())
    f32 = frames.astype(np.float32)
    up = apply_gain(f32, None, xp=cp)  # host float32, no gain: still lands on the device
    assert isinstance(up, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(up), f32)
    with pytest.raises(ValueError, match=r"^apply_gain: frames are on the device"):
        apply_gain(cp.asarray(frames), gain, xp=np)


@pytest.mark.parametrize("lam,shape", [(40.0, (4092, 5760)), (0.5, (2048, 2048))])
def test_no_false_positives_on_pure_poisson_counts(lam, shape):
    # a K3 frame sum at 40 e/px, and a low-dose sum where λ + 6√λ would flag thousands of pixels
    x = np.random.default_rng(1).poisson(lam, shape).astype(np.float32)
    assert int(hot_pixel_mask(x, 6.0).sum()) == 0


def test_planted_hot_pixels_found_on_a_dose_gradient():
    rng = np.random.default_rng(2)
    h, w = 1024, 1024
    level = np.linspace(30.0, 50.0, w)[None, :] * np.ones((h, 1))
    x = rng.poisson(level).astype(np.float32)
    truth = np.zeros((h, w), bool)
    ys, xs = rng.integers(0, h, 40), rng.integers(0, w, 40)
    truth[ys, xs] = True
    truth[500:503, 700:703] = True  # a cluster
    x[truth] += rng.uniform(100.0, 5000.0, size=int(truth.sum())).astype(np.float32)
    np.testing.assert_array_equal(hot_pixel_mask(x, 6.0), truth)
    # gain-normalised data (not integer counts): the dispersion is estimated, still exact
    np.testing.assert_array_equal(hot_pixel_mask(x * np.float32(1.7), 6.0), truth)
    assert not hot_pixel_mask(x, 0.0).any()


def test_replace_pixels_uses_local_level_per_frame():
    rng = np.random.default_rng(3)
    frames = rng.poisson(5.0, size=(6, 40, 50)).astype(np.float32)
    mask = np.zeros((40, 50), bool)
    mask[10, 20] = mask[10, 21] = mask[0, 0] = True
    before = frames.copy()
    out = replace_pixels(frames, mask)
    assert out is frames
    np.testing.assert_array_equal(frames[:, ~mask], before[:, ~mask])
    nb = before[:, 8:13, 18:23].copy()  # 5x5 around (10, 20), without the two masked pixels
    nb_mask = mask[8:13, 18:23]
    expected = nb[:, ~nb_mask].mean(axis=1)
    np.testing.assert_allclose(frames[:, 10, 20], expected, rtol=1e-6)
    np.testing.assert_allclose(frames[:, 0, 0], before[:, 0:3, 0:3].reshape(6, 9)[:, 1:].mean(axis=1), rtol=1e-6)


def test_replace_pixels_poisson_draws_differ_between_frames():
    frames = np.full((200, 20, 20), 3.0, np.float32)
    mask = np.zeros((20, 20), bool)
    mask[5, 5] = True
    replace_pixels(frames, mask, rng=np.random.default_rng(4))
    vals = frames[:, 5, 5]
    assert np.array_equal(vals, np.round(vals)) and len(np.unique(vals)) > 3
    assert vals.mean() == pytest.approx(3.0, abs=0.4)
    assert (frames[:, 4, 4] == 3.0).all()
