from __future__ import annotations

import shlex
import warnings

import numpy as np
import pytest
import starfile
from cryosparc.dataset import Dataset

from streamer.config import Config
from streamer.formats import csfile, relion_star


def parse_star(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """A tiny independent STAR reader: {block: (labels, rows)} for loop blocks."""
    blocks: dict[str, tuple[list[str], list[list[str]]]] = {}
    name = None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("data_"):
            name = s[5:]
            blocks[name] = ([], [])
        elif s == "loop_":
            continue
        elif s.startswith("_"):
            blocks[name][0].append(s.split()[0][1:])
        else:
            blocks[name][1].append(shlex.split(s))
    return blocks


def _star(cfg, columns, movies):
    text = relion_star.render_header(cfg, columns)
    for names, mic, x, y, carried in movies:
        text += relion_star.render_rows(columns, names, mic, x, y, carried)
    return text


def test_star_parses_with_starfile_and_an_independent_parser(tmp_path):
    cfg = Config(apix=0.83, box=256, fcrop_box=128, kv=200, cs=1.4, amplitude_contrast=0.07)
    du = np.array([12000.5, 15000.25, 9000.0])
    carried = {"rlnDefocusU": du, "rlnDefocusV": du - 100, "rlnDefocusAngle": np.array([1.5, 2.5, 3.5]),
               "rlnClassNumber": np.array([1, 2, 3]), "rlnCoordinateX": np.zeros(3)}
    columns = relion_star.choose_columns(carried)
    assert [c for c, _ in columns][:5] == relion_star.BASE_COLUMNS
    assert ("rlnClassNumber", "i") in columns and [c for c, _ in columns].count("rlnCoordinateX") == 1
    names1 = relion_star.image_names([("stacks/particles_00001.mrcs", 8, 2), ("stacks/particles_00002.mrcs", 0, 1)])
    assert names1 == ["9@stacks/particles_00001.mrcs", "10@stacks/particles_00001.mrcs",
                      "1@stacks/particles_00002.mrcs"]
    x, y = np.array([100.25, 2000.0, 5759.0]), np.array([3.0, 4091.5, 17.125])
    # second movie lacks rlnDefocusAngle/rlnClassNumber (neutral 0) and has an extra column (dropped)
    carried2 = {"rlnDefocusU": du[:1], "rlnDefocusV": du[:1], "rlnAutopickFigureOfMerit": np.ones(1)}
    assert relion_star.column_mismatch(columns, carried2) == (["rlnDefocusAngle", "rlnClassNumber"],
                                                             ["rlnAutopickFigureOfMerit"])
    names2 = relion_star.image_names([("stacks/particles_00002.mrcs", 1, 1)])
    text = _star(cfg, columns, [(names1, "raw/mov 1.tif", x, y, carried),
                                (names2, "raw/m2.tif", x[:1], y[:1], carried2)])
    path = tmp_path / "particles.star"
    path.write_text(text)

    # starfile
    d = starfile.read(path, always_dict=True)
    optics, parts = d["optics"], d["particles"]
    assert optics["rlnImagePixelSize"][0] == pytest.approx(0.83 * 2)  # Fourier crop 256 -> 128
    assert optics["rlnImageSize"][0] == 128 and optics["rlnMicrographOriginalPixelSize"][0] == pytest.approx(0.83)
    assert optics["rlnVoltage"][0] == 200 and optics["rlnImageDimensionality"][0] == 2
    assert optics["rlnOpticsGroupName"][0] == "opticsGroup1"
    assert list(parts["rlnImageName"]) == names1 + names2
    assert list(parts["rlnMicrographName"]) == ["raw/mov 1.tif"] * 3 + ["raw/m2.tif"]
    np.testing.assert_allclose(parts["rlnCoordinateX"], np.r_[x, x[:1]])
    np.testing.assert_allclose(parts["rlnDefocusU"], np.r_[du, du[:1]])
    assert list(parts["rlnClassNumber"]) == [1, 2, 3, 0]
    assert "rlnAutopickFigureOfMerit" not in parts.columns

    # independent parser
    blocks = parse_star(text)
    labels, rows = blocks["particles"]
    assert labels == [c for c, _ in columns] and len(rows) == 4
    assert all(len(r) == len(labels) for r in rows)
    row = dict(zip(labels, rows[1], strict=True))
    assert row["rlnImageName"] == "10@stacks/particles_00001.mrcs"
    assert float(row["rlnCoordinateY"]) == 4091.5 and float(row["rlnDefocusV"]) == 14900.25
    assert dict(zip(*[blocks["optics"][0], blocks["optics"][1][0]], strict=True))["rlnSphericalAberration"] == "1.4"


def _recs(cfg, movie, ranges, n, ctf=True, dtype=None, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 5760, n), rng.uniform(0, 4092, n)
    carried = {"rlnDefocusU": rng.uniform(1e4, 2e4, n), "rlnDefocusV": rng.uniform(1e4, 2e4, n),
               "rlnDefocusAngle": rng.uniform(0, 180, n)} if ctf else {}
    dtype = dtype or csfile.fit_dtype(None, 27, len(movie), ctf)
    r = csfile.records(dtype, movie, ranges, x, y, (4092, 5760), carried, box=128, psize=1.66,
                       micrograph_psize=0.83, sign=-1.0, import_sig=1234, kv=300, cs_mm=2.7, amp_contrast=0.1)
    return r, x, y, carried


def test_cs_records_read_back_with_cryosparc_tools(tmp_path):
    cfg = Config()
    r1, x, y, carried = _recs(cfg, "raw/a.tif", [("stacks/particles_00001.mrcs", 8, 2),
                                                  ("stacks/particles_00002.mrcs", 0, 3)], 5)
    path = tmp_path / "particles.cs"
    csfile.write_new(path, r1.dtype, [r1])
    d = Dataset.load(path)
    assert len(d) == 5
    assert list(d["blob/path"]) == ["stacks/particles_00001.mrcs"] * 2 + ["stacks/particles_00002.mrcs"] * 3
    assert list(d["blob/idx"]) == [8, 9, 0, 1, 2]
    np.testing.assert_array_equal(d["blob/shape"], [[128, 128]] * 5)
    np.testing.assert_allclose(d["blob/psize_A"], 1.66, rtol=1e-6)
    assert set(d["blob/sign"]) == {-1.0}
    assert list(d["location/micrograph_path"]) == ["raw/a.tif"] * 5
    np.testing.assert_array_equal(d["location/micrograph_shape"], [[4092, 5760]] * 5)
    np.testing.assert_allclose(d["location/center_x_frac"], x / 5760, rtol=1e-6)
    np.testing.assert_allclose(d["location/center_y_frac"], y / 4092, rtol=1e-6)
    np.testing.assert_allclose(d["ctf/df1_A"], carried["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(d["ctf/df_angle_rad"], np.deg2rad(carried["rlnDefocusAngle"]), rtol=1e-6)
    assert len(set(d["uid"])) == 5
    np.testing.assert_array_equal(csfile.particle_uids("raw/a.tif", 5), d["uid"])  # deterministic


def test_cs_append_keeps_data_offset_and_widening_rewrites(tmp_path):
    cfg = Config()
    r1, *_ = _recs(cfg, "raw/a.tif", [("stacks/particles_00001.mrcs", 0, 4)], 4)
    path = tmp_path / "particles.cs"
    csfile.write_new(path, r1.dtype, [r1])
    offset = csfile.read_header(path)[2]
    r2, *_ = _recs(cfg, "raw/b.tif", [("stacks/particles_00001.mrcs", 4, 3)], 3, dtype=r1.dtype, seed=1)
    assert csfile.append_to(path, r1.dtype, 4, [r2]) == 7
    dtype, rows, offset2 = csfile.read_header(path)
    assert (dtype, rows, offset2) == (r1.dtype, 7, offset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr = np.load(path, allow_pickle=False)
    np.testing.assert_array_equal(arr, np.concatenate([r1, r2]))
    assert len(set(arr["uid"])) == 7  # distinct across movies too

    # a much longer movie path widens the dtype; stored blobs are cast to it for the rewrite
    long_movie = "raw/" + "x" * 300 + ".tif"
    wide = csfile.fit_dtype(r1.dtype, 27, len(long_movie), True)
    assert csfile.widths(wide)[1] >= len(long_movie) > csfile.widths(r1.dtype)[1]
    assert csfile.fit_dtype(wide, 27, 10, True) == wide
    r3, *_ = _recs(cfg, long_movie, [("stacks/particles_00002.mrcs", 0, 2)], 2, dtype=wide, seed=2)
    parts = [csfile.from_blob(csfile.to_blob(r), wide) for r in (r1, r2, r3)]
    csfile.write_new(path, wide, parts)
    d = Dataset.load(path)
    assert len(d) == 9 and d["location/micrograph_path"][-1] == long_movie
    assert list(d["location/micrograph_path"][:4]) == ["raw/a.tif"] * 4


def test_cs_without_ctf_has_no_ctf_fields(tmp_path):
    r, *_ = _recs(Config(), "a.tif", [("stacks/particles_00001.mrcs", 0, 2)], 2, ctf=False)
    path = tmp_path / "p.cs"
    csfile.write_new(path, r.dtype, [r])
    assert not any(f.startswith("ctf/") for f in Dataset.load(path).fields())
    with pytest.raises(ValueError, match=r"a\.tif: ranges cover 2 particles, coordinates 3"):
        csfile.records(r.dtype, "a.tif", [("s", 0, 2)], np.zeros(3), np.zeros(3), (10, 10), {}, box=8, psize=1,
                       micrograph_psize=1, sign=-1, import_sig=0, kv=300, cs_mm=2.7, amp_contrast=0.1)
