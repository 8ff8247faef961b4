from __future__ import annotations

import io

import mrcfile
import numpy as np
import pytest

from streamer.formats import mrcstack


def _valid(path) -> bool:
    return mrcfile.validate(str(path), print_file=io.StringIO())


@pytest.mark.parametrize("dtype,mode", [(np.float32, 2), (np.float16, 12)])
def test_append_creates_and_extends_a_valid_stack(tmp_path, dtype, mode):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 12, 12)).astype(dtype)
    b = rng.standard_normal((5, 12, 12)).astype(dtype)
    path = tmp_path / "s.mrcs"
    assert mrcstack.append(path, a, 1.25) == (0, 3)
    assert _valid(path)
    assert mrcstack.append(path, b, 1.25) == (3, 5)
    assert mrcstack.count(path) == 8
    assert _valid(path)
    with mrcfile.open(path, permissive=False) as m:
        assert m.header.mode == mode
        assert m.is_image_stack()
        assert (int(m.header.nx), int(m.header.ny), int(m.header.nz)) == (12, 12, 8)
        assert m.voxel_size.x == pytest.approx(1.25) and m.voxel_size.y == pytest.approx(1.25)
        assert (int(m.header.mapc), int(m.header.mapr), int(m.header.maps)) == (1, 2, 3)
        assert m.data.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(m.data, np.concatenate([a, b]))
    np.testing.assert_array_equal(mrcstack.read(path, 2, 3), np.concatenate([a, b])[2:5])


def test_header_bytes_match_mrc2014_layout(tmp_path):
    path = tmp_path / "s.mrcs"
    mrcstack.append(path, np.zeros((2, 8, 8), np.float32), 2.0)
    raw = path.read_bytes()
    words = np.frombuffer(raw[:1024], dtype="<i4")
    floats = np.frombuffer(raw[:1024], dtype="<f4")
    assert list(words[:4]) == [8, 8, 2, 2]  # nx, ny, nz, mode (MRC2014 words 1-4)
    assert list(words[7:10]) == [8, 8, 1]  # mx, my, mz (image stack: mz = 1)
    assert list(floats[10:13]) == [16.0, 16.0, 2.0]  # cella
    assert words[22] == 0  # ispg
    assert raw[208:212] == b"MAP " and raw[212:214] == b"\x44\x44"
    assert floats[20] < floats[19] and floats[54] < 0  # stats marked "not computed"
    assert len(raw) == 1024 + 2 * 8 * 8 * 4


def test_interrupted_append_tail_is_detected_truncated_and_overwritten(tmp_path):
    path = tmp_path / "s.mrcs"
    a = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
    mrcstack.append(path, a, 1.0)
    with open(path, "ab") as f:  # a crash after the data fsync, before NZ was raised
        f.write(np.full((2, 6, 6), 7, np.float32).tobytes() + b"\x01\x02")
    with pytest.raises(mrcstack.StackError, match=r"s\.mrcs: header says 4 images"):
        mrcstack.count(path)
    assert mrcstack.images_on_disk(path) == 6
    b = -np.ones((1, 6, 6), np.float32)
    assert mrcstack.append(path, b, 1.0) == (4, 1)  # written after NZ, garbage cut
    assert mrcstack.count(path) == 5
    with mrcfile.open(path) as m:
        np.testing.assert_array_equal(m.data, np.concatenate([a, b]))
    mrcstack.truncate(path, 2)
    assert mrcstack.count(path) == 2 and _valid(path)
    with mrcfile.open(path) as m:
        np.testing.assert_array_equal(m.data, a[:2])


def test_bad_inputs_name_the_file(tmp_path):
    path = tmp_path / "s.mrcs"
    mrcstack.append(path, np.zeros((1, 8, 8), np.float32), 1.0)
    with pytest.raises(mrcstack.StackError, match=r"^.*s\.mrcs: holds 8x8 images, cannot append 10x10"):
        mrcstack.append(path, np.zeros((1, 10, 10), np.float32), 1.0)
    with pytest.raises(mrcstack.StackError, match=r"s\.mrcs: is MRC mode 2, cannot append float16"):
        mrcstack.append(path, np.zeros((1, 8, 8), np.float16), 1.0)
    with pytest.raises(mrcstack.StackError, match=r"s\.mrcs: pixel size 1 Å"):
        mrcstack.append(path, np.zeros((1, 8, 8), np.float32), 1.5)
    with pytest.raises(mrcstack.StackError, match="cannot keep 5 images, the file holds only 1"):
        mrcstack.truncate(path, 5)
    junk = tmp_path / "junk.mrcs"
    junk.write_bytes(b"x" * 2000)
    with pytest.raises(mrcstack.StackError, match=r"^.*junk\.mrcs: not an MRC2014 file"):
        mrcstack.count(junk)
    assert mrcstack.count(path) == 1  # failed appends changed nothing
