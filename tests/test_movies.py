"""Movie readers on real files: MRC modes, bzip2, TIFF (LZW and raw), EER via read_movie, damage and readiness."""

from __future__ import annotations

import bz2
import pickle
import struct
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from streamer.config import EerConfig
from streamer.formats.eer import write_eer
from streamer.formats.movies import MovieError, is_movie, movie_header, movie_is_whole, read_movie

F, H, W = 5, 12, 10


def _frames(dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(3.0, 2.0, (F, H, W)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 1000), (F, H, W), endpoint=True).astype(dtype)


def _write_mrc(path: Path, data: np.ndarray) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
    return path


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12)],
)
def test_mrc_modes_round_trip(tmp_path, dtype, mode):
    data = _frames(dtype)
    path = _write_mrc(tmp_path / "mov.mrcs", data)
    with mrcfile.open(path, header_only=True) as mrc:
        assert int(mrc.header.mode) == mode
    movie = read_movie(path)
    assert movie.kind == "mrc"
    assert movie.frames.dtype == np.dtype(dtype)  # native dtype, no float conversion
    np.testing.assert_array_equal(movie.frames, data)
    assert (movie.n_raw_frames, movie.leftover_raw_frames, movie.upsampling) == (F, 0, 1)
    assert movie_header(path) == (F, H, W)
    assert movie_is_whole(path) == (True, "")


def test_big_endian_mrc_becomes_native(tmp_path):
    data = _frames(np.int16).astype(">i2")
    path = _write_mrc(tmp_path / "be.mrc", data)
    with mrcfile.open(path, header_only=True) as mrc:
        assert mrc.header.mode.dtype.byteorder == ">"
    frames = read_movie(path).frames
    assert frames.dtype == np.int16 and frames.dtype.isnative
    np.testing.assert_array_equal(frames, data)


@pytest.mark.parametrize(("flags", "dtype"), [(0, np.uint8), (1, np.int8)])
def test_mode0_imod_unsigned_bytes(tmp_path, flags, dtype):
    counts = np.random.default_rng(1).integers(0, 256, (F, H, W)).astype(np.uint8)
    path = _write_mrc(tmp_path / "mov.mrc", counts.view(np.int8))
    raw = bytearray(path.read_bytes())
    raw[152:160] = struct.pack("<ii", 1146047817, flags)  # IMOD stamp; flag bit 0 = signed bytes
    path.write_bytes(bytes(raw))
    frames = read_movie(path).frames
    assert frames.dtype == dtype
    np.testing.assert_array_equal(frames.view(np.uint8), counts)


def test_mrc_bz2_single_and_multi_stream(tmp_path):
    data = _frames(np.uint16)
    raw = _write_mrc(tmp_path / "plain.mrc", data).read_bytes()
    single = tmp_path / "a.mrc.bz2"
    single.write_bytes(bz2.compress(raw))
    multi = tmp_path / "b.mrc.bz2"  # pbzip2 writes concatenated streams
    multi.write_bytes(bz2.compress(raw[:700]) + bz2.compress(raw[700:]))
    for path in (single, multi):
        movie = read_movie(path)
        assert movie.kind == "mrc.bz2"
        np.testing.assert_array_equal(movie.frames, data)
        assert movie_header(path) == (F, H, W)
        assert movie_is_whole(path) == (True, "")


def test_truncated_mrc_names_frame_counts(tmp_path):
    data = _frames(np.float32)
    raw = _write_mrc(tmp_path / "full.mrc", data).read_bytes()
    cut = tmp_path / "cut.mrc"
    cut.write_bytes(raw[: 1024 + int(3.5 * H * W * 4)])
    with pytest.raises(MovieError, match=r"cut\.mrc: truncated: header says 5 frames, file holds 3"):
        read_movie(cut)


def test_corrupt_and_truncated_bz2(tmp_path):
    comp = bz2.compress(_write_mrc(tmp_path / "p.mrc", _frames(np.int16)).read_bytes())
    corrupt = tmp_path / "corrupt.mrc.bz2"
    corrupt.write_bytes(comp[:40] + bytes(b ^ 0x5A for b in comp[40:80]) + comp[80:])
    short = tmp_path / "short.mrc.bz2"
    short.write_bytes(comp[: len(comp) // 2])
    for path in (corrupt, short):
        with pytest.raises(MovieError) as err:
            read_movie(path)
        assert str(err.value).startswith(str(path) + ": ")
        assert movie_is_whole(path)[0] is False


@pytest.mark.parametrize(("compression", "tag"), [(None, 1), ("lzw", 5)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_round_trip(tmp_path, compression, tag, dtype):
    data = _frames(dtype)
    path = tmp_path / "mov.tif"
    tifffile.imwrite(path, data, compression=compression, photometric="minisblack")
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == F and tf.pages[0].compression == tag
    movie = read_movie(path, threads=2)
    assert movie.kind == "tiff" and movie.frames.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(movie.frames, data)
    assert movie_header(path) == (F, H, W)


def test_tiff_pages_must_share_a_shape(tmp_path):
    path = tmp_path / "mixed.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.zeros((H, W), np.uint8), photometric="minisblack")
        tw.write(np.zeros((H, W + 2), np.uint8), photometric="minisblack")
    with pytest.raises(MovieError, match=r"mixed\.tiff: page 1 is \(12, 12\)"):
        read_movie(path)


@pytest.mark.parametrize("compression", [None, "lzw"])
def test_truncated_tiff(tmp_path, compression):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, _frames(np.uint8), compression=compression, photometric="minisblack")
    raw = full.read_bytes()
    for fraction in (0.3, 0.6, 0.9):
        cut = tmp_path / f"cut{fraction}.tif"
        cut.write_bytes(raw[: int(len(raw) * fraction)])
        with pytest.raises(MovieError) as err:
            read_movie(cut)
        assert str(err.value).startswith(f"{cut}: ")


def test_corrupt_lzw_strip(tmp_path):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, _frames(np.uint8), compression="lzw", photometric="minisblack")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[1].dataoffsets[0], tf.pages[1].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(raw))
    with pytest.raises(MovieError, match=r"bad\.tif: corrupt TIFF data"):
        read_movie(path)


def _eer_file(path: Path, n_raw: int, seed: int = 0) -> tuple[Path, list]:
    rng = np.random.default_rng(seed)
    events = [(rng.integers(0, 4 * W, 30), rng.integers(0, 4 * H, 30)) for _ in range(n_raw)]
    write_eer(path, events, (H, W))
    return path, events


def test_eer_through_read_movie_reports_leftovers(tmp_path):
    path, _ = _eer_file(tmp_path / "mov.eer", 11)
    movie = read_movie(path, EerConfig(upsampling=2, fractions=3), threads=2)
    assert movie.kind == "eer" and movie.upsampling == 2
    assert movie.frames.shape == (3, 2 * H, 2 * W) and movie.frames.dtype == np.uint8
    assert (movie.n_raw_frames, movie.leftover_raw_frames) == (11, 2)
    assert any("2 of 11 raw EER frames not used" in w for w in movie.warnings)
    assert movie_header(path) == (11, H, W)
    # an EER movie named .tif is still decoded as EER
    renamed = tmp_path / "mov.tif"
    renamed.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(read_movie(renamed, EerConfig(upsampling=2, fractions=3)).frames, movie.frames)


def test_eer_fractions_beyond_raw_frames(tmp_path):
    path, _ = _eer_file(tmp_path / "few.eer", 4)
    with pytest.raises(MovieError, match=r"few\.eer: eer\.fractions = 5 but the movie has 4 raw frames"):
        read_movie(path, EerConfig(upsampling=1, fractions=5))


def _whole_files(tmp_path: Path) -> list[Path]:
    mrc = _write_mrc(tmp_path / "w.mrc", _frames(np.float32))
    bz = tmp_path / "w.mrc.bz2"
    bz.write_bytes(bz2.compress(mrc.read_bytes()))
    tif = tmp_path / "w.tif"
    tifffile.imwrite(tif, _frames(np.uint8), compression="lzw", photometric="minisblack")
    raw_tif = tmp_path / "w_raw.tiff"
    tifffile.imwrite(raw_tif, _frames(np.uint16), photometric="minisblack")
    eer, _ = _eer_file(tmp_path / "w.eer", 9)
    return [mrc, bz, tif, raw_tif, eer]


def test_movie_is_whole_on_half_written_files(tmp_path):
    for full in _whole_files(tmp_path):
        assert movie_is_whole(full) == (True, ""), full
        half = full.with_name("half_" + full.name)
        half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        whole, reason = movie_is_whole(half)
        assert whole is False and reason, half


def test_movie_is_whole_never_raises(tmp_path):
    empty = tmp_path / "empty.mrc"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00" + b"\xff" * 13)
    header_only = tmp_path / "h.eer"
    header_only.write_bytes(b"II+\x00\x08\x00\x00\x00")
    for path in (empty, junk, header_only, tmp_path / "missing.eer", tmp_path / "x.mrc.bz2"):
        whole, reason = movie_is_whole(path)
        assert whole is False and reason


def test_is_movie():
    yes = ["a.mrc", "b.MRCS", "c.mrc.bz2", "d.TIF", "e.tiff", "f.eer", "/x/y/FoilHole_1_fractions.tiff"]
    no = [".a.mrc", "a.mrc.tmp", "a.tiff.part", "a_downloading.eer", "a.mrc.bz2.part", "a.jpg", "a.star", "a.mrc~"]
    assert all(is_movie(p) for p in yes)
    assert not any(is_movie(p) for p in no)


def test_movie_error_pickles(tmp_path):
    err = MovieError(tmp_path / "m.mrc", "truncated: header says 4 frames, file holds 2")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is MovieError and str(back) == str(err) and back.what == err.what


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(MovieError, match=r"a\.jpg: not a movie file"):
        read_movie(tmp_path / "a.jpg")
    with pytest.raises(MovieError, match=r"nope\.mrc: no such file"):
        read_movie(tmp_path / "nope.mrc")
