"""Pick files: stems, every format (written and read back, and hand-written), multi-micrograph
indexing, validation, malformed files and live refresh."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import starfile
from cryosparc.dataset import CSDAT_FORMAT, Dataset

from streamer.config import PicksConfig
from streamer.formats.picks import (
    PickIndex,
    PicksError,
    match_key,
    movie_stem,
    pick_stem,
    read_picks,
    write_box,
    write_cs_picks,
    write_star_coords,
    write_topaz,
)

FRAME = (4092, 5760)  # (h, w) of a K3 movie
EPU = "FoilHole_24681357_Data_13579246_13579248_20240101_123456"


def _only(path: Path, cfg: PicksConfig | None = None, frame=FRAME, movie: str | None = None):
    """Index ``path`` and read the picks for ``movie`` (default: the only stem)."""
    idx = PickIndex(path)
    src = idx.lookup(movie or next(iter(idx.stems())))
    assert src is not None
    return read_picks(src, cfg or PicksConfig(), frame)


# -- stems ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("movie", "stem"),
    [
        (f"/data/Images-Disc1/GridSquare_1/Data/{EPU}_fractions.tiff", EPU),
        (f"{EPU}_Fractions.mrc", EPU),
        (f"{EPU}_EER.eer", EPU),
        (f"{EPU}_fractions_EER.eer", EPU),
        ("raw/movie_0001.mrc.bz2", "movie_0001"),
        ("raw/movie_0001.mrcs", "movie_0001"),
        ("grid3_00012_Sep05_12.34.56.tif", "grid3_00012_Sep05_12.34.56"),  # SerialEM, dots kept
        ("14sep05c_00024sq_00003hl_00002es.frames.tif", "14sep05c_00024sq_00003hl_00002es"),  # Leginon
        ("Movie_A.TIF", "Movie_A"),
    ],
)
def test_movie_stem(movie: str, stem: str) -> None:
    assert movie_stem(movie) == stem


@pytest.mark.parametrize(
    "pick",
    [
        f"{EPU}_autopick.star",
        f"{EPU}_fractions_autopick.star",
        f"AutoPick/job010/Movies/{EPU}_fractions_manualPick.star",
        f"{EPU}_manualpick.star",
        f"{EPU}.box",
        f"{EPU}_fractions.cbox",
        f"{EPU}_topaz.txt",
        f"{EPU}_cryolo.star",
        f"{EPU}_EER_picks.star",
        f"{EPU}_DW.mrc",
        f"{EPU}_fractions_aligned_doseweighted.mrc",
        f"J12/motioncorrected/012345678901234567890_{EPU}_fractions_patch_aligned_doseweighted.mrc",
    ],
)
def test_pick_names_match_the_movie(pick: str) -> None:
    assert pick_stem(pick) == EPU
    assert match_key(f"raw/{EPU}_fractions.tiff") == pick_stem(pick)
    assert match_key(f"raw/{EPU}_EER.eer") == pick_stem(pick)


@pytest.mark.parametrize(
    ("movie", "pick"),
    [
        (f"{EPU}_fractions.tiff", f"{EPU}7_autopick.star"),  # Data id one digit longer
        ("FoilHole_1_Data_2_fractions.tiff", "FoilHole_1_Data_3_autopick.star"),
        ("grid1_0001.tif", "grid1_0010.box"),
        ("grid1_0001.tif", "Grid1_0001.box"),  # case-sensitive base
    ],
)
def test_different_micrographs_do_not_match(movie: str, pick: str) -> None:
    assert match_key(movie) != pick_stem(pick)


def test_index_does_not_match_other_micrograph(tmp_path: Path) -> None:
    write_star_coords(tmp_path / "FoilHole_1_Data_22_autopick.star", [10.0], [20.0])
    idx = PickIndex(tmp_path)
    assert idx.lookup("raw/FoilHole_1_Data_2_fractions.tiff") is None
    assert idx.lookup("raw/FoilHole_1_Data_22_fractions.tiff") is not None


# -- round trips ----------------------------------------------------------------------------


def test_star_round_trip_with_scale_and_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 2800, 50), rng.uniform(0, 2000, 50)
    cols = {"rlnDefocusU": rng.uniform(8000, 20000, 50), "rlnAutopickFigureOfMerit": rng.uniform(0, 1, 50)}
    path = tmp_path / "Movies" / f"{EPU}_fractions_autopick.star"
    path.parent.mkdir()
    write_star_coords(path, x, y, cols)
    # the file is a plain RELION coordinate STAR read by an independent parser
    raw = starfile.read(path)
    np.testing.assert_allclose(raw["rlnCoordinateX"], x, rtol=1e-9)
    picks = _only(tmp_path, PicksConfig(scale=2.0), movie=f"raw/{EPU}_fractions.tiff")
    np.testing.assert_allclose(picks.x, 2 * x, rtol=1e-9)
    np.testing.assert_allclose(picks.y, 2 * y, rtol=1e-9)
    assert set(picks.columns) == set(cols)
    np.testing.assert_allclose(picks.columns["rlnDefocusU"], cols["rlnDefocusU"], rtol=1e-9)
    assert picks.rejected == [] and picks.problems == [] and picks.source == str(path)


def test_hand_written_relion_star(tmp_path: Path) -> None:
    text = (
        "\n# version 30001\n\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
        "_rlnClassNumber #3\n_rlnAutopickFigureOfMerit #4\n_rlnAnglePsi #5\n"
        "  1024.000000  2048.000000            0     1.250000  -999.00000\n"
        "   100.500000   200.250000            0     0.750000  -999.00000\n"
    )
    (tmp_path / "m_autopick.star").write_text(text)
    picks = _only(tmp_path)
    np.testing.assert_array_equal(picks.x, [1024.0, 100.5])
    np.testing.assert_array_equal(picks.y, [2048.0, 200.25])
    np.testing.assert_array_equal(picks.columns["rlnAutopickFigureOfMerit"], [1.25, 0.75])
    # every input column is carried, with its kind: integers stay integers
    np.testing.assert_array_equal(picks.columns["rlnAnglePsi"], [-999.0, -999.0])
    assert picks.columns["rlnClassNumber"].dtype == np.int64


def test_box_round_trip_corner_to_centre(tmp_path: Path) -> None:
    x, y = np.array([100.0, 2000.5, 5000.0]), np.array([300.0, 1500.0, 4000.25])
    path = tmp_path / f"{EPU}.box"
    write_box(path, x, y, 128)
    first = path.read_text().splitlines()[0].split()
    assert [float(v) for v in first] == [36.0, 236.0, 128.0, 128.0]  # lower-left corner = centre - 64
    picks = _only(tmp_path, PicksConfig(scale=1.5), frame=(8000, 8000))
    np.testing.assert_allclose(picks.x, 1.5 * x)
    np.testing.assert_allclose(picks.y, 1.5 * y)


def test_hand_written_box_and_old_cbox(tmp_path: Path) -> None:
    (tmp_path / "a.box").write_text("10\t20\t64\t64\n  100 200 32 48 \n\n")
    (tmp_path / "b.cbox").write_text("10 20 64 64 0.9\n100 200 32 48 0.5\n")
    for name in ("a", "b"):
        picks = read_picks(PickIndex(tmp_path).lookup(f"{name}.tif"), PicksConfig(), FRAME)
        np.testing.assert_array_equal(picks.x, [42.0, 116.0])
        np.testing.assert_array_equal(picks.y, [52.0, 224.0])
    np.testing.assert_allclose(picks.columns["rlnAutopickFigureOfMerit"], [0.9, 0.5])


def test_cryolo_star_cbox(tmp_path: Path) -> None:
    text = (
        "data_global\n\n_version 1.8\n\ndata_cryolo\n\nloop_\n_CoordinateX #1\n_CoordinateY #2\n_CoordinateZ #3\n"
        "_Width #4\n_Height #5\n_Depth #6\n_EstWidth #7\n_EstHeight #8\n_Confidence #9\n_NumBoxes #10\n_Angle #11\n"
        "100.0 200.0 <NA> 220 220 <NA> 210 205 0.81 <NA> <NA>\n"
        "1000 2000 <NA> 180 200 <NA> 170 180 0.55 <NA> <NA>\n"
    )
    (tmp_path / f"{EPU}_fractions.cbox").write_text(text)
    picks = _only(tmp_path, movie=f"{EPU}_fractions.tiff")
    np.testing.assert_allclose(picks.x, [210.0, 1090.0])
    np.testing.assert_allclose(picks.y, [310.0, 2100.0])
    np.testing.assert_allclose(picks.columns["rlnAutopickFigureOfMerit"], [0.81, 0.55])


def test_topaz_multi_micrograph(tmp_path: Path) -> None:
    rows = [("0001", 10.0, 20.0, 1.5), ("0002", 30.0, 40.0, -0.5), ("0001", 50.0, 60.0, 0.25)]
    path = tmp_path / "predicted_particles_all.txt"
    write_topaz(path, rows)
    assert path.read_text().splitlines()[0].split("\t") == ["image_name", "x_coord", "y_coord", "score"]
    idx = PickIndex(tmp_path)
    assert idx.stems() == {"0001", "0002"}  # names like 0001 stay text, not numbers
    one = read_picks(idx.lookup("raw/0001.tif"), PicksConfig(scale=4.0), FRAME)
    np.testing.assert_allclose(one.x, [40.0, 200.0])
    np.testing.assert_allclose(one.y, [80.0, 240.0])
    np.testing.assert_allclose(one.columns["rlnAutopickFigureOfMerit"], [1.5, 0.25])
    two = read_picks(idx.lookup("raw/0002.tif"), PicksConfig(scale=4.0), FRAME)
    np.testing.assert_allclose(two.x, [120.0])


def test_topaz_single_micrograph_without_image_name(tmp_path: Path) -> None:
    (tmp_path / "mic7.txt").write_text("x_coord\ty_coord\tscore\n12\t34\t0.5\n")
    picks = _only(tmp_path, movie="mic7.eer")
    np.testing.assert_array_equal(picks.x, [12.0])
    np.testing.assert_array_equal(picks.y, [34.0])


def test_cs_round_trip_with_ctf(tmp_path: Path) -> None:
    x, y = np.array([100.0, 2500.0, 5000.0]), np.array([50.0, 2000.0, 4000.0])
    cols = {"rlnDefocusU": np.array([12000.0, 15000.0, 9000.0]), "rlnDefocusAngle": np.array([10.0, 45.0, -30.0])}
    mic = f"J3/motioncorrected/012345678901234567890_{EPU}_fractions_patch_aligned_doseweighted.mrc"
    path = tmp_path / "P1_J7_picked_particles.cs"
    write_cs_picks(path, mic, (2046, 2880), x / 2, y / 2, cols)
    arr = np.load(path)  # plain NumPy, as cryoSPARC's default format
    np.testing.assert_allclose(arr["location/center_x_frac"], x / 2 / 2880, rtol=1e-6)
    np.testing.assert_allclose(arr["ctf/df_angle_rad"], np.deg2rad(cols["rlnDefocusAngle"]), rtol=1e-6)
    picks = _only(tmp_path, PicksConfig(scale=2.0), movie=f"raw/{EPU}_fractions.tiff")
    np.testing.assert_allclose(picks.x, x, atol=1e-3)
    np.testing.assert_allclose(picks.y, y, atol=1e-3)
    np.testing.assert_allclose(picks.columns["rlnDefocusU"], cols["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(picks.columns["rlnDefocusAngle"], cols["rlnDefocusAngle"], rtol=1e-5)
    assert picks.problems == []
    # picks from a 2x binned micrograph read without picks.scale: flagged, not silent
    unscaled = _only(tmp_path, movie=f"raw/{EPU}_fractions.tiff")
    assert unscaled.problems == ["micrograph_shape 2880x2046 times picks.scale 1 does not match the 5760x4092 frame"]


def _cryosparc_dataset(paths: list[str], shape, fx, fy, with_shape: bool = True) -> Dataset:
    fields = [("location/micrograph_path", "O"), ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4")]
    fields += [("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4")]
    if with_shape:
        fields.append(("location/micrograph_shape", "<u4", (2,)))
    ds = Dataset.allocate(len(paths), fields)
    ds["location/micrograph_path"] = paths
    ds["location/center_x_frac"] = fx
    ds["location/center_y_frac"] = fy
    ds["ctf/df1_A"] = np.arange(len(paths)) * 1000.0 + 10000
    ds["ctf/df2_A"] = np.arange(len(paths)) * 1000.0 + 9000
    if with_shape:
        ds["location/micrograph_shape"] = np.tile(np.asarray(shape, np.uint32), (len(paths), 1))
    return ds


@pytest.mark.parametrize("fmt", ["numpy", "csdat"])
def test_cs_multi_micrograph_written_by_cryosparc_tools(tmp_path: Path, fmt: str) -> None:
    paths = [
        "J2/motioncorrected/000000000000000000001_mic_A_fractions_patch_aligned_doseweighted.mrc",
        "J2/motioncorrected/000000000000000000002_mic_B_fractions_patch_aligned_doseweighted.mrc",
        "J2/motioncorrected/000000000000000000001_mic_A_fractions_patch_aligned_doseweighted.mrc",
    ]
    ds = _cryosparc_dataset(paths, (1000, 2000), [0.25, 0.5, 0.75], [0.1, 0.2, 0.3])
    path = tmp_path / "particles.cs"
    ds.save(str(path), format=CSDAT_FORMAT if fmt == "csdat" else 1)
    idx = PickIndex(tmp_path)
    assert idx.stems() == {"mic_A", "mic_B"}
    a = read_picks(idx.lookup("mic_A_fractions.tiff"), PicksConfig(), (1000, 2000))
    np.testing.assert_allclose(a.x, [500.0, 1500.0], atol=1e-3)
    np.testing.assert_allclose(a.y, [100.0, 300.0], atol=1e-3)
    np.testing.assert_allclose(a.columns["rlnDefocusU"], [10000.0, 12000.0])
    np.testing.assert_allclose(a.columns["rlnDefocusV"], [9000.0, 11000.0])
    b = read_picks(idx.lookup("mic_B_fractions.tiff"), PicksConfig(), (1000, 2000))
    assert len(b) == 1


def test_cs_without_shape_uses_frame(tmp_path: Path) -> None:
    ds = _cryosparc_dataset(["m1.mrc"], None, [0.5], [0.25], with_shape=False)
    ds.save(str(tmp_path / "p.cs"))
    picks = _only(tmp_path, PicksConfig(scale=3.0), frame=(400, 800), movie="m1.tif")
    np.testing.assert_allclose(picks.x, [400.0], atol=1e-4)  # fractions need no scale
    np.testing.assert_allclose(picks.y, [100.0], atol=1e-4)


def test_multi_micrograph_star(tmp_path: Path) -> None:
    names = [f"MotionCorr/job002/Movies/FoilHole_1_Data_{k}_fractions.mrc" for k in (2, 3, 2, 2)]
    df = np.array([1.0, 2.0, 3.0, 4.0]) * 1e4
    write_star_coords(tmp_path / "particles.star", [1, 2, 3, 4], [5, 6, 7, 8], {"rlnDefocusV": df}, names)
    idx = PickIndex(tmp_path)
    assert idx.stems() == {"FoilHole_1_Data_2", "FoilHole_1_Data_3"}
    src = idx.lookup("raw/FoilHole_1_Data_2_fractions.tiff")
    assert src.micrograph == names[0]
    picks = read_picks(src, PicksConfig(), FRAME)
    np.testing.assert_array_equal(picks.x, [1.0, 3.0, 4.0])
    np.testing.assert_array_equal(picks.columns["rlnDefocusV"], [1e4, 3e4, 4e4])


def test_single_file_beats_multi_file_for_the_same_stem(tmp_path: Path) -> None:
    write_star_coords(tmp_path / "all.star", [1, 2], [1, 2], micrograph_name=["mic_1.mrc", "mic_2.mrc"])
    write_box(tmp_path / "mic_1.box", [500.0], [600.0], 100)
    idx = PickIndex(tmp_path)
    assert idx.lookup("mic_1.tif").path == str(tmp_path / "mic_1.box")
    assert idx.lookup("mic_2.tif").micrograph == "mic_2.mrc"
    assert "mic_1" in idx.conflicts


# -- validation -----------------------------------------------------------------------------


def test_validation_rejects_with_reasons(tmp_path: Path) -> None:
    x = np.array([10.0, np.nan, -1.0, 5760.0, 100.0, 5759.5])
    y = np.array([10.0, 5.0, 10.0, 10.0, 4092.0, 4091.9])
    write_star_coords(tmp_path / "m.star", x, y, {"rlnDefocusU": np.arange(6.0)})
    picks = _only(tmp_path)
    np.testing.assert_array_equal(picks.x, [10.0, 5759.5])
    np.testing.assert_array_equal(picks.columns["rlnDefocusU"], [0.0, 5.0])
    reasons = [r for _, _, r in picks.rejected]
    assert reasons == [
        "NaN coordinate",
        "negative coordinate",
        "outside the 5760x4092 frame",
        "outside the 5760x4092 frame",
    ]
    assert picks.rejected[1][:2] == (-1.0, 10.0)


def test_scale_applies_before_frame_check(tmp_path: Path) -> None:
    write_box(tmp_path / "m.box", [3000.0], [100.0], 64)  # 3000 * 2 = 6000 >= 5760
    picks = _only(tmp_path, PicksConfig(scale=2.0))
    assert len(picks) == 0 and picks.rejected == [(6000.0, 200.0, "outside the 5760x4092 frame")]


@pytest.mark.parametrize("name", ["m.star", "m.box", "m.txt", "m.cs", "m.cbox"])
def test_empty_file_reports_no_picks(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    picks = _only(tmp_path, movie="m.tif")
    assert len(picks) == 0 and picks.problems == ["no picks in file"]


def test_star_with_empty_loop(tmp_path: Path) -> None:
    write_star_coords(tmp_path / "m_autopick.star", np.zeros(0), np.zeros(0))
    picks = _only(tmp_path, movie="m.tif")
    assert len(picks) == 0 and picks.problems == ["no picks in file"]


# -- malformed files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("m.star", "data_\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n1 2\n3 abc\n", "row 2: rlnCoordinateY"),
        ("m.star", "data_\nloop_\n_rlnCoordinateX #1\n_rlnMicrographName #2\n1 a.mrc\n", "rlnCoordinateY"),
        ("m.box", "10 20 64 64\n10 20 64\n", "line 2"),
        ("m.box", "10 20 64 64\nten 20 64 64\n", "line 2"),
        ("m.txt", "image_name\tx_coord\ty_coord\tscore\nm\t1\tq\t0.5\n", "y_coord"),
        ("m.txt", "image_name\tx_coord\ty_coord\tscore\nm\t1\t2\t0.5\t9\t9\n", "line 2: 6 fields"),
        ("m.cs", "this is not numpy", "cryoSPARC"),
        ("m.star", "\x00\x01binary\xff", "m.star"),
    ],
)
def test_malformed_file_raises_picks_error_with_path(tmp_path: Path, name: str, content: str, what: str) -> None:
    from streamer.formats.picks import PickSource

    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    fmt = {".star": "star", ".box": "box", ".txt": "topaz", ".cs": "cs"}[path.suffix]
    st = path.stat()
    with pytest.raises(PicksError) as info:
        read_picks(PickSource(str(path), fmt, st.st_mtime, st.st_size), PicksConfig(), FRAME)
    msg = str(info.value)
    assert msg.startswith(str(path)) and what in msg and "\n" not in msg


def test_malformed_multi_file_is_listed_not_raised(tmp_path: Path) -> None:
    (tmp_path / "all.cs").write_bytes(b"\x93NUMPY garbage")
    write_box(tmp_path / "ok.box", [10.0], [10.0], 8)
    idx = PickIndex(tmp_path)
    assert idx.stems() == {"ok"}
    assert str(tmp_path / "all.cs") in idx.unusable
    assert idx.unusable[str(tmp_path / "all.cs")].startswith(str(tmp_path / "all.cs"))


def test_missing_file_after_indexing(tmp_path: Path) -> None:
    write_box(tmp_path / "m.box", [10.0], [10.0], 8)
    src = PickIndex(tmp_path).lookup("m.tif")
    os.remove(src.path)
    with pytest.raises(PicksError, match="not found"):
        read_picks(src, PicksConfig(), FRAME)


# -- live refresh -----------------------------------------------------------------------------


def test_refresh_sees_new_and_rewritten_files(tmp_path: Path) -> None:
    idx = PickIndex(tmp_path / "picks")  # folder not created yet
    assert idx.stems() == set() and idx.refresh() == []
    sub = tmp_path / "picks" / "GridSquare_7"
    sub.mkdir(parents=True)
    write_star_coords(sub / "FoilHole_1_Data_2_autopick.star", [10.0], [20.0])
    assert idx.refresh() == ["FoilHole_1_Data_2"]
    assert idx.refresh() == []  # unchanged: nothing to report
    src1 = idx.lookup("FoilHole_1_Data_2_fractions.tiff")
    write_star_coords(sub / "FoilHole_1_Data_2_autopick.star", [10.0, 30.0], [20.0, 40.0])
    os.utime(sub / "FoilHole_1_Data_2_autopick.star", ns=(int(src1.mtime * 1e9) + 10**9,) * 2)
    assert idx.refresh() == ["FoilHole_1_Data_2"]
    src2 = idx.lookup("FoilHole_1_Data_2_fractions.tiff")
    assert src2.stamp != src1.stamp
    assert len(read_picks(src2, PicksConfig(), FRAME)) == 2
    # same size, new content and mtime (a picker re-run): still seen as changed
    write_star_coords(sub / "FoilHole_1_Data_2_autopick.star", [10.0, 31.0], [20.0, 40.0])
    os.utime(sub / "FoilHole_1_Data_2_autopick.star", ns=(int(src2.mtime * 1e9) + 10**9,) * 2)
    assert (sub / "FoilHole_1_Data_2_autopick.star").stat().st_size == src2.size
    assert idx.refresh() == ["FoilHole_1_Data_2"]
    np.testing.assert_array_equal(read_picks(idx.lookup("FoilHole_1_Data_2"), PicksConfig(), FRAME).x, [10.0, 31.0])
    write_topaz(sub / "other.txt", [("FoilHole_1_Data_3", 1.0, 2.0, 0.0)])
    (sub / ".FoilHole_1_Data_4.box.partial").write_text("1 2 3 4\n")  # hidden: in transfer
    assert idx.refresh() == ["FoilHole_1_Data_3"]
    os.remove(sub / "FoilHole_1_Data_2_autopick.star")
    assert idx.refresh() == []
    assert idx.lookup("FoilHole_1_Data_2_fractions.tiff") is None


def test_single_file_index_and_format_filter(tmp_path: Path) -> None:
    write_box(tmp_path / "m.box", [10.0], [10.0], 8)
    write_star_coords(tmp_path / "n.star", [10.0], [10.0])
    assert PickIndex(tmp_path, format="box").stems() == {"m"}
    assert PickIndex(tmp_path / "n.star").stems() == {"n"}
    with pytest.raises(PicksError):
        PickIndex(tmp_path, format="xml")
