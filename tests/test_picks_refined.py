"""Picks from refinements: RELION particle STARs (3.1+/5 optics, 3.0 pixel origins) and cryoSPARC
particle exports are re-centred on the refined centre, scaled by the pixel size the file states,
and carry every per-particle column.

Inputs reproduce the real layouts (label order, version line, optics table, dtypes):
``tests/data/relion5_refine3d_run_data.star`` is hand-written in the layout RELION 5's Refine3D
writes (run_data.star: extraction's optics labels, the refinement's particle labels, RELION's
``%12.6f`` numbers); the cryoSPARC export below uses the field names, order and dtypes of
cryoSPARC 4 particle outputs as listed in cryosparc-tools' tests/conftest.py (T20S dataset) and
docs/guides/jobs.ipynb (BSD-3-Clause, Structura Biotechnology), with our own values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import starfile

from streamer.config import PicksConfig
from streamer.formats.picks import PickIndex, PicksError, pick_summary, picks_pixel_size, read_picks

DATA = Path(__file__).parent / "data"
RUN_DATA = DATA / "relion5_refine3d_run_data.star"
STEM = "FoilHole_24681357_Data_13579246_13579248_20240101_123456"
MOVIE = f"raw/{STEM}_fractions.tiff"
FRAME = (4092, 5760)
APIX = 0.83


def _read(folder: Path, cfg: PicksConfig | None = None, apix: float | None = APIX, movie: str = MOVIE):
    src = PickIndex(folder).lookup(movie)
    assert src is not None
    return read_picks(src, cfg or PicksConfig(), FRAME, apix=apix), src


def test_relion5_refined_star_is_recentred_and_carried(tmp_path: Path) -> None:
    (tmp_path / "run_data.star").write_text(RUN_DATA.read_text())
    raw = starfile.read(RUN_DATA)["particles"]
    picks, src = _read(tmp_path)
    # RELION's re-extraction: centre = coordinate - origin(Å) / micrograph pixel size
    np.testing.assert_allclose(picks.x, raw["rlnCoordinateX"] - raw["rlnOriginXAngst"] / APIX, atol=1e-9)
    np.testing.assert_allclose(picks.y, raw["rlnCoordinateY"] - raw["rlnOriginYAngst"] / APIX, atol=1e-9)
    assert any("re-centred 5 of 6 picks" in n and "rlnOriginXAngst/YAngst" in n for n in picks.notes)
    # every per-particle column travels; lmc's own (image, micrograph, coordinates, optics group) do not
    carried = set(raw.columns) - {"rlnCoordinateX", "rlnCoordinateY", "rlnMicrographName", "rlnOpticsGroup",
                                  "rlnImageName"}
    assert set(picks.columns) == carried | {"rlnImageOriginalName"}
    np.testing.assert_array_equal(picks.columns["rlnOriginXAngst"], 0.0)  # reset after re-centring
    np.testing.assert_allclose(picks.columns["rlnAngleRot"], raw["rlnAngleRot"])
    np.testing.assert_array_equal(picks.columns["rlnRandomSubset"], raw["rlnRandomSubset"])
    assert picks.columns["rlnRandomSubset"].dtype == np.int64
    assert list(picks.columns["rlnImageOriginalName"]) == list(raw["rlnImageName"])
    rows, kinds = pick_summary(src)
    assert rows == 6 and kinds == {k: ("s" if v.dtype == object else "i" if v.dtype.kind == "i" else "f")
                                   for k, v in picks.columns.items()}
    assert picks_pixel_size(src) == (pytest.approx(0.83), "rlnMicrographOriginalPixelSize")


def test_binned_micrograph_pixel_size_scales_automatically(tmp_path: Path) -> None:
    text = RUN_DATA.read_text().replace(
        "_rlnCtfDataAreCtfPremultiplied #10 \nopticsGroup1 ", "_rlnCtfDataAreCtfPremultiplied #10 \n"
        "_rlnMicrographPixelSize #11 \nopticsGroup1 ").replace("          0 \n \n", "          0     1.660000 \n \n", 1)
    (tmp_path / "particles.star").write_text(text)
    raw = starfile.read(tmp_path / "particles.star")
    assert float(raw["optics"]["rlnMicrographPixelSize"][0]) == 1.66
    raw = raw["particles"]
    picks, _ = _read(tmp_path)
    np.testing.assert_allclose(picks.x, 2 * raw["rlnCoordinateX"] - raw["rlnOriginXAngst"] / APIX, atol=1e-9)
    assert any("scaled by 2" in n and "rlnMicrographPixelSize" in n for n in picks.notes)
    assert _read(tmp_path, PicksConfig(scale=2.0))[0].x.shape == picks.x.shape  # agreeing flag: fine
    with pytest.raises(PicksError, match=r"particles\.star: rlnMicrographPixelSize = 1\.66 .* --picks-scale is 3"):
        _read(tmp_path, PicksConfig(scale=3.0))
    with pytest.raises(PicksError, match="movie pixel size is needed"):
        _read(tmp_path, apix=None)


RELION30 = """
data_

loop_
_rlnMicrographName #1
_rlnCoordinateX #2
_rlnCoordinateY #3
_rlnImageName #4
_rlnDefocusU #5
_rlnVoltage #6
_rlnDetectorPixelSize #7
_rlnMagnification #8
_rlnOriginX #9
_rlnOriginY #10
_rlnAngleRot #11
Micrographs/{stem}.mrc  1000.000000  800.000000 000001@Particles/Micrographs/{stem}_particles.mrcs 15000.0 300.0 {det} 50000.0   2.500000  -1.000000 12.0
Micrographs/{stem}.mrc  2000.000000  900.000000 000002@Particles/Micrographs/{stem}_particles.mrcs 15000.0 300.0 {det} 50000.0  -3.000000   0.500000 24.0
"""


def test_relion30_pixel_origins(tmp_path: Path) -> None:
    # 5 µm detector pixel / 50000x = 1.0 Å per particle-image pixel: origins 2.5 px = 2.5 Å
    (tmp_path / "data.star").write_text(RELION30.format(stem=STEM, det="5.0"))
    picks, _ = _read(tmp_path, apix=0.5)
    np.testing.assert_allclose(picks.x, [1000.0 - 2.5 / 0.5, 2000.0 + 3.0 / 0.5])
    np.testing.assert_allclose(picks.y, [800.0 + 1.0 / 0.5, 900.0 - 0.5 / 0.5])
    assert "rlnVoltage" not in picks.columns and "rlnMagnification" not in picks.columns  # optics: lmc's own
    np.testing.assert_array_equal(picks.columns["rlnOriginXAngst"], 0.0)
    assert any("rlnOriginX/Y (pixels, RELION 3.0)" in n for n in picks.notes)


def test_relion30_origins_without_image_pixel_size_are_coordinate_pixels(tmp_path: Path) -> None:
    text = RELION30.format(stem=STEM, det="5.0").replace("_rlnDetectorPixelSize #7\n", "_rlnX #7\n")
    (tmp_path / "data.star").write_text(text.replace("_rlnX #7", "_rlnCtfFigureOfMerit #7"))
    picks, _ = _read(tmp_path, PicksConfig(scale=2.0), apix=None)
    np.testing.assert_allclose(picks.x, [2 * 1000.0 - 2 * 2.5, 2 * 2000.0 + 2 * 3.0])


def cryosparc_refine_export(n: int, mic_path: str, shape: tuple[int, int], psize: float, seed: int = 3) -> np.ndarray:
    """A cryoSPARC 4 refinement's particle export (blob + ctf + alignments3D + location), with the
    field names, order and dtypes cryoSPARC writes."""
    dtype = [
        ("uid", "<u8"), ("blob/path", "S96"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("blob/import_sig", "<u8"),
        ("ctf/type", "S9"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"), ("ctf/scale_const", "<f4"), ("ctf/shift_A", "<f4", (2,)),
        ("ctf/tilt_A", "<f4", (2,)), ("ctf/trefoil_A", "<f4", (2,)), ("ctf/tetra_A", "<f4", (4,)),
        ("ctf/anisomag", "<f4", (4,)), ("ctf/bfactor", "<f4"),
        ("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)), ("alignments3D/pose", "<f4", (3,)),
        ("alignments3D/psize_A", "<f4"), ("alignments3D/error", "<f4"), ("alignments3D/cross_cor", "<f4"),
        ("alignments3D/weight", "<f4"), ("alignments3D/class_posterior", "<f4"), ("alignments3D/class", "<u4"),
        ("location/micrograph_uid", "<u8"), ("location/exp_group_id", "<u4"), ("location/micrograph_path", "S192"),
        ("location/micrograph_shape", "<u4", (2,)), ("location/micrograph_psize_A", "<f4"),
        ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4"), ("location/min_dist_A", "<f4"),
    ]
    rng = np.random.default_rng(seed)
    a = np.zeros(n, dtype=dtype)
    a["uid"] = rng.integers(1, 2**63, n, dtype=np.uint64)
    a["blob/path"] = b"J30/extract/particles.mrc"
    a["blob/idx"] = np.arange(n)
    a["blob/shape"] = (256, 256)
    a["blob/psize_A"] = 1.3
    a["blob/sign"] = -1
    a["ctf/type"] = b"spline"
    a["ctf/exp_group_id"] = 2
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = 300, 2.7, 0.1
    a["ctf/df1_A"] = rng.uniform(9000, 20000, n)
    a["ctf/df2_A"] = a["ctf/df1_A"] - 150
    a["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
    a["ctf/scale"], a["ctf/scale_const"] = 1, 1
    a["ctf/anisomag"] = (0.01, 0.002, 0.002, -0.01)
    a["alignments3D/split"] = np.arange(n) % 2
    a["alignments3D/shift"] = rng.uniform(-6, 6, (n, 2))
    a["alignments3D/pose"] = rng.uniform(-3, 3, (n, 3))
    a["alignments3D/psize_A"] = 1.3
    a["alignments3D/class_posterior"] = 1
    a["location/micrograph_uid"] = 12951868257382468663
    a["location/exp_group_id"] = 2
    a["location/micrograph_path"] = mic_path.encode()
    a["location/micrograph_shape"] = shape
    a["location/micrograph_psize_A"] = psize
    a["location/center_x_frac"] = rng.uniform(0.05, 0.95, n)
    a["location/center_y_frac"] = rng.uniform(0.05, 0.95, n)
    a["location/min_dist_A"] = 100
    return a


def test_cryosparc_refinement_export_is_recentred_scaled_and_carried(tmp_path: Path) -> None:
    mic = f"J14/motioncorrected/012951868257382468663_{STEM}_fractions_patch_aligned_doseweighted.mrc"
    # the micrographs were binned by 2 in Patch Motion: shape halved, pixel size doubled
    arr = cryosparc_refine_export(7, mic, (FRAME[0] // 2, FRAME[1] // 2), 2 * APIX)
    with open(tmp_path / "P3_J42_particles_exported.cs", "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    picks, src = _read(tmp_path)
    shift_A = arr["alignments3D/shift"].astype(np.float64) * 1.3
    h, w = FRAME[0] // 2, FRAME[1] // 2
    np.testing.assert_allclose(picks.x, arr["location/center_x_frac"] * w * 2 - shift_A[:, 0] / APIX, atol=2e-3)
    np.testing.assert_allclose(picks.y, arr["location/center_y_frac"] * h * 2 - shift_A[:, 1] / APIX, atol=2e-3)
    assert picks.problems == []
    assert any("alignments3D/shift" in n for n in picks.notes) and any("scaled by 2" in n for n in picks.notes)
    np.testing.assert_allclose(picks.columns["rlnDefocusU"], arr["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_allclose(picks.columns["rlnDefocusAngle"], np.rad2deg(arr["ctf/df_angle_rad"]), rtol=1e-5)
    for k in range(3):
        np.testing.assert_allclose(picks.columns[f"cs:alignments3D/pose#{k}"], arr["alignments3D/pose"][:, k])
    np.testing.assert_array_equal(picks.columns["cs:alignments3D/shift#0"], 0.0)  # re-centred
    assert list(picks.columns["cs:ctf/type"]) == ["spline"] * 7
    np.testing.assert_array_equal(picks.columns["cs:alignments3D/split"], arr["alignments3D/split"])
    assert not any(k.startswith(("cs:blob/", "cs:location/", "cs:uid")) for k in picks.columns)
    assert pick_summary(src)[0] == 7


def test_cs_without_locations_names_the_fields_and_jobs(tmp_path: Path) -> None:
    arr = cryosparc_refine_export(3, "m.mrc", (100, 100), 1.0)
    fields = [f for f in arr.dtype.names if not f.startswith("location/")]
    path = tmp_path / f"{STEM}_particles.cs"
    with open(path, "wb") as fh:
        np.save(fh, arr[fields], allow_pickle=False)
    idx = PickIndex(tmp_path)
    (reason,) = idx.unusable.values()
    assert reason.count(str(path)) == 1 and "\n" not in reason
    assert "location/center_x_frac" in reason and "Extract From Micrographs" in reason
    assert "groups: alignments3D, blob, ctf" in reason


def test_duplicate_picks_are_skipped_with_a_reason(tmp_path: Path) -> None:
    from streamer.formats.picks import write_star_coords

    write_star_coords(tmp_path / f"{STEM}.star", [100.0, 100.2, 300.0, 100.0], [50.0, 50.1, 60.0, 50.0])
    picks, _ = _read(tmp_path)
    np.testing.assert_allclose(picks.x, [100.0, 300.0])
    assert [r for _, _, r in picks.rejected] == ["duplicate of an earlier pick"] * 2
