"""EER writer and reader: our encoder against the independent decoder (imagecodecs, through tifffile), sub-pixel
placement at every upsampling, fractionation, leftovers and damage."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from streamer.formats.eer import (
    MovieError,
    counts_to_events,
    encode_frame,
    read_eer,
    split_counts,
    write_eer,
)

H, W = 12, 16


def _expected(events, shape, upsampling, groups):
    """Independent fraction sums: the first event listed per detector pixel and raw frame counts, binned to
    the upsampled grid by integer division of the 16x-area coordinate."""
    h, w = shape
    f = 4 // upsampling
    out = np.zeros((len(groups), h * upsampling, w * upsampling), np.int64)
    for g, frames in enumerate(groups):
        for i in frames:
            xs, ys = (np.asarray(a) for a in events[i])
            _, first = np.unique((ys // 4) * w + xs // 4, return_index=True)
            np.add.at(out[g], (ys[first] // f, xs[first] // f), 1)
    return out


def _random_events(rng, n_raw, shape, per_frame=40):
    h, w = shape
    return [(rng.integers(0, 4 * w, per_frame), rng.integers(0, 4 * h, per_frame)) for _ in range(n_raw)]


@pytest.mark.parametrize("compression", [65001, 65000, 65002])
def test_round_trip_matches_tifffile_decoder(tmp_path, compression):
    rng = np.random.default_rng(compression)
    events = _random_events(rng, 6, (H, W))
    path = tmp_path / "m.eer"
    write_eer(path, events, (H, W), compression)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_eer and len(tf.pages) == 6 and tf.pages[0].compression == compression
        assert tf.eer_metadata["sensorImageWidth"] == W
    for u, level in ((1, 0), (2, 1), (4, 2)):
        with tifffile.TiffFile(path, superres=level) as tf:
            independent = tf.asarray().astype(np.int64)  # (6, H*u, W*u), decoded by imagecodecs alone
        frames, n_raw, leftover = read_eer(path, u, 6, threads=2)
        assert (n_raw, leftover) == (6, 0)
        np.testing.assert_array_equal(frames, independent)
        np.testing.assert_array_equal(frames, _expected(events, (H, W), u, [[i] for i in range(6)]))


@pytest.mark.parametrize("compression", [65001, 65000])
@pytest.mark.parametrize("upsampling", [1, 2, 4])
def test_event_lands_in_its_upsampled_pixel(tmp_path, compression, upsampling):
    # every one of the 16 sub-pixel cells of detector pixel (x=5, y=2), one per raw frame
    cells = [(4 * 5 + cx, 4 * 2 + cy) for cy in range(4) for cx in range(4)]
    events = [(np.array([x]), np.array([y])) for x, y in cells]
    path = tmp_path / "cells.eer"
    write_eer(path, events, (H, W), compression)
    frames, _, _ = read_eer(path, upsampling, len(cells))
    f = 4 // upsampling
    for (x16, y16), frame in zip(cells, frames, strict=True):
        assert frame.sum() == 1
        assert tuple(np.argwhere(frame)[0]) == (y16 // f, x16 // f)


def test_odd_grid_at_upsampling_2(tmp_path):
    # imagecodecs refuses 2x upsampling of grids that are not multiples of 4; read_eer bins from 4x instead
    shape = (7, 9)
    events = _random_events(np.random.default_rng(3), 4, shape)
    path = tmp_path / "odd.eer"
    write_eer(path, events, shape)
    frames, _, _ = read_eer(path, 2, 2)
    np.testing.assert_array_equal(frames, _expected(events, shape, 2, [[0, 1], [2, 3]]))


@pytest.mark.parametrize("skipbits", [7, 8])
def test_long_skips_and_frame_edges(skipbits):
    import imagecodecs

    run = (1 << skipbits) - 1
    h, w = 9, 2 * run + 5  # rows longer than two continuation codes
    npix = h * w
    cases = [
        [],  # empty frame: continuations to the end
        [0],  # first pixel
        [npix - 1],  # last pixel: the stream ends right after it
        [run, 2 * run, 2 * run + 1, 4 * run + 3],  # gaps of exact multiples of the continuation code
        [npix - 1 - run],  # tail of exactly one continuation
        list(range(0, npix, 97)),
    ]
    for pixels in cases:
        pixels = np.array(pixels, np.int64)
        sub = (np.arange(len(pixels)) * 5) % 16
        data = encode_frame(pixels, sub, npix, skipbits)
        assert len(data) % 2 == 0
        decoded = imagecodecs.eer_decode(data, (h, w), skipbits, 2, 2)
        np.testing.assert_array_equal(np.flatnonzero(decoded), pixels)
        fine = imagecodecs.eer_decode(data, (4 * h, 4 * w), skipbits, 2, 2, superres=2)
        ys, xs = np.nonzero(fine)
        order = np.argsort(ys // 4 * w + xs // 4)
        stored = ((xs[order] & 3) ^ 2) | (((ys[order] & 3) ^ 2) << 2)
        np.testing.assert_array_equal(stored, sub)


@pytest.mark.parametrize("compression", [65001, 65000, 65002])
def test_last_pixel_survives_round_trip(tmp_path, compression):
    # regression: an electron in the last pixel was lost when its code ended exactly on the strip's last bit
    # (about 1 page in 6 at this occupancy); 60 random pages make a miss of that case vanishingly unlikely
    rng = np.random.default_rng(100 + compression)
    shape, n_raw = (16, 16), 60
    h, w = shape
    events = []
    for _ in range(n_raw):
        hit = rng.random(shape) < 0.3
        hit[-1, -1] = True
        ys, xs = np.nonzero(hit)
        events.append((4 * xs + rng.integers(0, 4, len(xs)), 4 * ys + rng.integers(0, 4, len(ys))))
    path = tmp_path / "last.eer"
    assert write_eer(path, events, shape, compression) == 0
    with tifffile.TiffFile(path) as tf:
        independent = tf.asarray()  # (n_raw, h, w), decoded by imagecodecs alone
    assert independent[:, -1, -1].tolist() == [1] * n_raw
    np.testing.assert_array_equal(independent.reshape(n_raw, -1).sum(axis=1), [len(xs) for xs, _ in events])
    frames, _, _ = read_eer(path, 4, n_raw)
    np.testing.assert_array_equal(frames, _expected(events, shape, 4, [[i] for i in range(n_raw)]))
    assert frames[:, 4 * h - 4 :, 4 * w - 4 :].sum() == n_raw


def test_fraction_sums_and_leftovers(tmp_path):
    rng = np.random.default_rng(7)
    n_raw, fractions = 11, 3  # 3 raw frames per fraction, 2 left over
    events = _random_events(rng, n_raw, (H, W))
    path = tmp_path / "frac.eer"
    write_eer(path, events, (H, W))
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    for u in (1, 2, 4):
        frames, got_raw, leftover = read_eer(path, u, fractions, threads=2)
        assert (got_raw, leftover) == (n_raw, 2)
        assert frames.shape == (fractions, H * u, W * u) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frames, _expected(events, (H, W), u, groups))
    # the leftover frames really are excluded: total counts are those of the first 9 raw frames
    everything = _expected(events, (H, W), 1, [list(range(n_raw))])
    assert frames.sum() < everything.sum()
    # same result with one decoding thread
    np.testing.assert_array_equal(read_eer(path, 4, fractions, threads=1)[0], frames)


def test_many_raw_frames_per_fraction_use_uint16(tmp_path):
    n_raw = 260
    events = [(np.array([4 * 3 + 1]), np.array([4 * 1 + 2]))] * n_raw  # the same pixel every raw frame
    path = tmp_path / "long.eer"
    write_eer(path, events, (4, 8))
    frames, _, leftover = read_eer(path, 1, 1)
    assert frames.dtype == np.uint16 and leftover == 0
    assert frames[0, 1, 3] == n_raw and frames.sum() == n_raw


def test_fractions_beyond_raw_frames(tmp_path):
    path = tmp_path / "few.eer"
    write_eer(path, _random_events(np.random.default_rng(0), 3, (H, W)), (H, W))
    with pytest.raises(MovieError, match=r"few\.eer: eer\.fractions = 4 but the movie has 3 raw frames"):
        read_eer(path, 1, 4)
    with pytest.raises(MovieError, match=r"few\.eer: EER upsampling must be 1, 2 or 4"):
        read_eer(path, 3, 1)


def test_corrupt_and_truncated(tmp_path):
    path = tmp_path / "bad.eer"
    write_eer(path, _random_events(np.random.default_rng(1), 4, (H, W)), (H, W))
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[2].dataoffsets[0], tf.pages[2].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = b"\xff" * count  # continuation codes running past the frame's end
    corrupt = tmp_path / "corrupt.eer"
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(MovieError, match=r"corrupt\.eer: raw frame 2: corrupt EER data"):
        read_eer(corrupt, 1, 4)
    short = tmp_path / "short.eer"
    short.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MovieError, match=r"short\.eer: truncated"):
        read_eer(short, 1, 2)


def test_duplicates_in_one_detector_pixel_are_dropped(tmp_path):
    xs = np.array([4 * 2 + 0, 4 * 2 + 3, 4 * 7 + 1])  # two events in detector pixel (x=2, y=1)
    ys = np.array([4 * 1 + 0, 4 * 1 + 3, 4 * 5 + 2])
    path = tmp_path / "dup.eer"
    dropped = write_eer(path, [(xs, ys)], (H, W))
    assert dropped == 1
    frame = read_eer(path, 4, 1)[0][0]
    assert frame.sum() == 2 and frame[4, 8] == 1 and frame[22, 29] == 1  # the first listed event is kept


def test_write_rejects_events_off_the_grid(tmp_path):
    with pytest.raises(ValueError, match=r"off\.eer: raw frame 0: event outside"):
        write_eer(tmp_path / "off.eer", [(np.array([4 * W]), np.array([0]))], (H, W))


def test_counts_to_events():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 20, (H, W))
    for cap in (1, 5, 16):
        xs, ys = counts_to_events(counts, rng, max_per_pixel=cap)
        back = np.zeros((H, W), np.int64)
        np.add.at(back, (ys // 4, xs // 4), 1)
        np.testing.assert_array_equal(back, np.minimum(counts, cap))
        cells = ys * (4 * W) + xs
        assert len(np.unique(cells)) == len(cells)  # distinct sub-pixel positions
    with pytest.raises(ValueError):
        counts_to_events(counts, rng, max_per_pixel=17)


def test_split_counts_then_write_loses_nothing(tmp_path):
    rng = np.random.default_rng(9)
    counts = rng.poisson(2.0, (H, W))
    counts[0, 0] = 50  # more than raw frames: clipped to one per raw frame
    n_raw = 20
    raw_frames = list(split_counts(counts, n_raw, rng))
    assert len(raw_frames) == n_raw and all(f.dtype == bool for f in raw_frames)
    np.testing.assert_array_equal(np.sum(raw_frames, axis=0), np.minimum(counts, n_raw))
    path = tmp_path / "sim.eer"
    dropped = write_eer(path, (counts_to_events(f, rng) for f in raw_frames), (H, W))
    assert dropped == 0
    frames, _, _ = read_eer(path, 1, 1)
    np.testing.assert_array_equal(frames[0], np.minimum(counts, n_raw))
