"""Gain references (orientation, multiply/divide/auto, upsampling, shape errors) and defect maps, from real files."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import tifffile

from streamer.config import GainConfig
from streamer.formats.gainref import GainError, read_defects, read_gain

H, W = 3, 4  # non-square, so a quarter turn changes the shape
MARK = 5.0


def _marked_gain() -> np.ndarray:
    """Ones with the top-left corner (row 0, column 0) marked."""
    g = np.ones((H, W), np.float32)
    g[0, 0] = MARK
    return g


def _tif(path, image):
    tifffile.imwrite(path, image)
    return path


# Where the top-left corner ends up, worked out by hand from the stated convention (not with numpy):
# a quarter turn counter-clockwise carries the top-left corner to the bottom-left; a half turn to the
# bottom-right; three quarter turns (= one clockwise) to the top-right; flip_x mirrors left-right, flip_y
# top-bottom, both applied after the rotation.
CASES = [
    (dict(), (H, W), (0, 0)),
    (dict(rotate=1), (W, H), (W - 1, 0)),
    (dict(rotate=2), (H, W), (H - 1, W - 1)),
    (dict(rotate=3), (W, H), (0, H - 1)),
    (dict(rotate=-1), (W, H), (0, H - 1)),
    (dict(flip_x=True), (H, W), (0, W - 1)),
    (dict(flip_y=True), (H, W), (H - 1, 0)),
    (dict(rotate=1, flip_x=True), (W, H), (W - 1, H - 1)),
    (dict(rotate=1, flip_y=True), (W, H), (0, 0)),
    (dict(rotate=3, flip_x=True, flip_y=True), (W, H), (W - 1, 0)),
]


@pytest.mark.parametrize(("options", "shape", "corner"), CASES)
def test_orientation_moves_the_marked_corner(tmp_path, options, shape, corner):
    path = _tif(tmp_path / "gain.tif", _marked_gain())
    m = read_gain(path, GainConfig(mode="multiply", **options), shape)
    assert m.shape == shape and m.dtype == np.float32
    assert tuple(np.argwhere(m == MARK)[0]) == corner
    assert np.count_nonzero(m != 1) == 1


@pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")
def test_modes(tmp_path):
    g = np.array([[2.0, 4.0, 0.0, np.nan], [0.5, 1.0, np.inf, 8.0]], np.float32)
    tif = _tif(tmp_path / "gain.tif", g)
    eer_gain = _tif(tmp_path / "gain.gain", g)  # EER gains are TIFFs named .gain
    mrc = tmp_path / "gain.mrc"
    with mrcfile.new(mrc) as f:
        f.set_data(g)
    inverse = np.array([[0.5, 0.25, 0.0, 0.0], [2.0, 1.0, 0.0, 0.125]], np.float32)
    same = np.array([[2.0, 4.0, 0.0, 0.0], [0.5, 1.0, 0.0, 8.0]], np.float32)
    for path, mode, expected in [
        (tif, "multiply", same),
        (tif, "divide", inverse),
        (tif, "auto", same),
        (mrc, "auto", same),
        (mrc, "divide", inverse),
        (eer_gain, "auto", inverse),
        (eer_gain, "multiply", same),
    ]:
        m = read_gain(path, GainConfig(mode=mode), (2, 4))
        assert m.dtype == np.float32
        np.testing.assert_allclose(m, expected, rtol=1e-6, err_msg=f"{path.name} {mode}")


def test_detector_grid_gain_is_repeated_for_upsampled_eer(tmp_path):
    g = np.arange(1, H * W + 1, dtype=np.float32).reshape(H, W)
    path = _tif(tmp_path / "gain.gain", g)
    for u in (2, 4):
        m = read_gain(path, GainConfig(), (H * u, W * u), upsampling=u)
        rows, cols = np.indices((H * u, W * u))
        np.testing.assert_allclose(m, 1.0 / g[rows // u, cols // u])
    # already at the frame grid: used as it is
    assert read_gain(path, GainConfig(), (H, W), upsampling=2).shape == (H, W)


def test_shape_mismatch_messages(tmp_path):
    path = _tif(tmp_path / "gain.tif", _marked_gain())
    with pytest.raises(GainError) as err:
        read_gain(path, GainConfig(), (W, H))
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "3x4" in msg and "4x3" in msg and "try gain.rotate: 1" in msg
    with pytest.raises(GainError, match=r"gain\.tif: gain reference is 3x4 .* frames are 5x5$"):
        read_gain(path, GainConfig(), (5, 5))


def test_single_section_3d_gain_and_bad_files(tmp_path):
    mrc = tmp_path / "gain3d.mrc"
    with mrcfile.new(mrc) as f:
        f.set_data(_marked_gain()[None] * 2)
    m = read_gain(mrc, GainConfig(mode="multiply"), (H, W))
    assert m[0, 0] == 2 * MARK
    two = tmp_path / "two.mrc"
    with mrcfile.new(two) as f:
        f.set_data(np.ones((2, H, W), np.float32))
    with pytest.raises(GainError, match=r"two\.mrc: gain reference must be one 2-D image"):
        read_gain(two, GainConfig(), (H, W))
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(GainError, match=r"junk\.tif: gain reference not readable"):
        read_gain(junk, GainConfig(), (H, W))
    with pytest.raises(GainError, match=r"missing\.gain: gain reference not found"):
        read_gain(tmp_path / "missing.gain", GainConfig(), (H, W))
    zeros = _tif(tmp_path / "zeros.tif", np.zeros((H, W), np.float32))
    with pytest.raises(GainError, match=r"zeros\.tif: gain reference is zero everywhere"):
        read_gain(zeros, GainConfig(mode="divide"), (H, W))


def test_defects_from_image(tmp_path):
    image = np.zeros((6, 8), np.uint8)
    image[2, 5] = 1
    image[:, 7] = 255
    for path in (_tif(tmp_path / "defects.tif", image), tmp_path / "defects.mrc"):
        if path.suffix == ".mrc":
            with mrcfile.new(path) as f:
                f.set_data(image.astype(np.int16))
        mask = read_defects(path, (6, 8))
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, image != 0)
    up = read_defects(tmp_path / "defects.tif", (12, 16), upsampling=2)
    assert up[4:6, 10:12].all() and up.sum() == 4 * (image != 0).sum()
    with pytest.raises(GainError, match=r"defects\.tif: defect map is 6x8"):
        read_defects(tmp_path / "defects.tif", (8, 6))


def test_defects_from_text(tmp_path):
    path = tmp_path / "defects.txt"
    path.write_text("# x y [w h], 0-based\n5 2\n\n0,0,1,3  # a short column\n6 4 2 1\n")
    mask = read_defects(path, (6, 8))
    expected = np.zeros((6, 8), bool)
    expected[2, 5] = True  # x is the column, y the row
    expected[0:3, 0] = True
    expected[4, 6:8] = True
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("1 1\n2 two\n", 2, "expected 'x y' or 'x y w h'"),
        ("1 1\n1 2 3\n", 2, "expected 'x y' or 'x y w h'"),
        ("8 0\n", 1, "outside"),
        ("6 4 3 1\n", 1, "outside"),
        ("1 1 0 2\n", 1, "outside"),
    ],
)
def test_malformed_defect_lists_name_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "bad_defects.txt"
    path.write_text(text)
    with pytest.raises(GainError) as err:
        read_defects(path, (6, 8))
    assert str(err.value).startswith(f"{path}:{line}: ") and what in str(err.value)
