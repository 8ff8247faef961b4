"""lmc speaks RELION's and cryoSPARC's language in both directions: a refined RELION 5 STAR and a
cryoSPARC refinement export go in as picks, and every output is read back by the real readers
(starfile, cryosparc-tools, mrcfile, yaml) and compared with the layouts those programs write.

Reference layouts (facts from the programs' sources, restated here so the test stands alone):
* RELION 5 particle extraction's optics labels, in order (src/preprocessing.cpp writes the
  micrographs' optics group, then image pixel size/size/dimensionality and
  rlnCtfDataAreCtfPremultiplied), and the ``# version 50001`` line (src/metadata_table.h);
* RELION's motion STAR (src/micrograph_model.cpp ``Micrograph::write``): data_general and
  data_global_shift with rlnMicrographFrameNumber/ShiftX/ShiftY;
* cryoSPARC 4's particle fields and dtypes (cryosparc-tools tests/conftest.py, T20S particles and
  passthrough; docs/guides/jobs.ipynb) and its exported ``.csg`` result group.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import yaml
from cryosparc.dataset import Dataset
from lmc_cli import lmc

from streamer.formats.picks import movie_stem
from streamer.sim.simulate import SimParams, load_truth, simulate_session

RELION5_EXTRACT_OPTICS = [
    "rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
    "rlnImageDimensionality", "rlnCtfDataAreCtfPremultiplied",
]
# cryoSPARC 4 particle outputs (T20S): blob from Extract, ctf and location from its passthrough
CRYOSPARC_PARTICLE_FIELDS = {
    "uid": "<u8", "blob/path": "S", "blob/idx": "<u4", "blob/shape": ("<u4", (2,)), "blob/psize_A": "<f4",
    "blob/sign": "<f4", "blob/import_sig": "<u8", "ctf/type": "S", "ctf/exp_group_id": "<u4",
    "ctf/accel_kv": "<f4", "ctf/cs_mm": "<f4", "ctf/amp_contrast": "<f4", "ctf/df1_A": "<f4", "ctf/df2_A": "<f4",
    "ctf/df_angle_rad": "<f4", "ctf/phase_shift_rad": "<f4", "ctf/scale": "<f4", "ctf/scale_const": "<f4",
    "ctf/shift_A": ("<f4", (2,)), "ctf/tilt_A": ("<f4", (2,)), "ctf/trefoil_A": ("<f4", (2,)),
    "ctf/tetra_A": ("<f4", (4,)), "ctf/anisomag": ("<f4", (4,)), "ctf/bfactor": "<f4",
    "location/micrograph_uid": "<u8", "location/exp_group_id": "<u4", "location/micrograph_path": "S",
    "location/micrograph_shape": ("<u4", (2,)), "location/micrograph_psize_A": "<f4",
    "location/center_x_frac": "<f4", "location/center_y_frac": "<f4", "location/min_dist_A": "<f4",
}
APIX = 1.0




@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interop")
    simulate_session(root / "s", SimParams(movies=2, frames=10, shape=(384, 384), particles=6, seed=5,
                                           local_A=0.0, junk_picks=0, edge_particles=0))
    return root


def _truth(session: Path) -> dict[str, np.ndarray]:
    return {m.name: load_truth(session / "s", m.name)["picks"] for m in sorted((session / "s" / "movies").iterdir())}


def write_refined_star(session: Path, path: Path) -> pd.DataFrame:
    """A RELION 5 Refine3D run_data.star (layout as RELION writes it) over the simulated movies: each
    pick stored as coordinate + origin, so that RELION's re-centring gives the pick back."""
    rng = np.random.default_rng(2)
    rows = []
    for movie, picks in _truth(session).items():
        for i, (x, y) in enumerate(picks):
            ox, oy = rng.uniform(-6, 6, 2)
            rows.append({
                "rlnCoordinateX": round(x + ox / APIX), "rlnCoordinateY": round(y + oy / APIX),
                "rlnAutopickFigureOfMerit": 0.8, "rlnClassNumber": 1, "rlnAnglePsi": 10.0 * i,
                "rlnImageName": f"{i + 1:06d}@Extract/job007/movies/{movie_stem(movie)}.mrcs",
                "rlnMicrographName": f"MotionCorr/job002/movies/{movie_stem(movie)}.mrc", "rlnOpticsGroup": 1,
                "rlnCtfMaxResolution": 4.1, "rlnCtfFigureOfMerit": 0.2, "rlnDefocusU": 15000.0 + i,
                "rlnDefocusV": 14800.0 + i, "rlnDefocusAngle": 30.0, "rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0,
                "rlnPhaseShift": 0.0, "rlnGroupNumber": 1, "rlnAngleRot": 5.0 * i, "rlnAngleTilt": 90.0 - i,
                "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0, "rlnNormCorrection": 1.0,
                "rlnLogLikeliContribution": 12345.6, "rlnMaxValueProbDistribution": 0.3,
                "rlnNrOfSignificantSamples": 3, "rlnRandomSubset": 1 + i % 2,
                "_true": (x, y),
            })
            # the origin makes coordinate - origin / apix the true pick exactly
            rows[-1]["rlnOriginXAngst"] = (rows[-1]["rlnCoordinateX"] - x) * APIX
            rows[-1]["rlnOriginYAngst"] = (rows[-1]["rlnCoordinateY"] - y) * APIX
    parts = pd.DataFrame(rows)
    optics = pd.DataFrame([{"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
                            "rlnMicrographOriginalPixelSize": APIX, "rlnVoltage": 300.0,
                            "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.07, "rlnImagePixelSize": APIX,
                            "rlnImageSize": 96, "rlnImageDimensionality": 2, "rlnCtfDataAreCtfPremultiplied": 0}])
    text = starfile.to_string({"optics": optics, "particles": parts.drop(columns="_true")}, float_format="%12.6f")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("# Created by the starfile Python package", "# version 50001"))
    return parts


def _run(session: Path, picks: Path, out: str) -> subprocess.CompletedProcess:
    s = session / "s"
    res = lmc("run", "--movies", str(s / "movies"), "--picks", str(picks), "--gain", str(s / "gain.mrc"),
              "--out", str(session / out), "--box", "96", "--fcrop-box", "64", "--workers", "1",
              "--settle-seconds", "0", "--no-local-enabled", "--apix", str(APIX), "--dose-per-frame", "1",
              cwd=session)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def relion_run(session: Path) -> tuple[Path, pd.DataFrame]:
    refined = write_refined_star(session, session / "refined" / "run_data.star")
    _run(session, session / "refined" / "run_data.star", "out_relion")
    return session / "out_relion", refined


def test_particles_star_is_relion5_with_every_input_column(relion_run: tuple[Path, pd.DataFrame]) -> None:
    out, refined = relion_run
    text = (out / "particles.star").read_text()
    assert text.count("# version 50001") == 2 and "30001" not in text
    star = starfile.read(out / "particles.star")
    assert list(star["optics"].columns) == RELION5_EXTRACT_OPTICS
    opt = star["optics"].iloc[0]
    assert opt["rlnImageSize"] == 64 and opt["rlnImagePixelSize"] == pytest.approx(1.5)
    assert opt["rlnMicrographOriginalPixelSize"] == pytest.approx(APIX) and opt["rlnCtfDataAreCtfPremultiplied"] == 0
    parts = star["particles"]
    assert len(parts) == len(refined)  # every pick is a particle (no junk, no edge picks)
    carried = set(refined.columns) - {"_true", "rlnImageName"}
    assert carried | {"rlnImageOriginalName"} <= set(parts.columns)
    # re-centred: the written coordinate is the refined centre, the origin is reset
    by_name = parts.set_index("rlnImageOriginalName")
    for _, row in refined.iterrows():
        got = by_name.loc[row["rlnImageName"]]
        assert (got["rlnCoordinateX"], got["rlnCoordinateY"]) == pytest.approx(row["_true"], abs=1e-4)
        assert got["rlnOriginXAngst"] == 0 and got["rlnOriginYAngst"] == 0
        assert got["rlnAngleRot"] == pytest.approx(row["rlnAngleRot"])
        assert got["rlnRandomSubset"] == row["rlnRandomSubset"] and got["rlnDefocusU"] == pytest.approx(row["rlnDefocusU"])
    # stacks are valid MRC and hold what the STAR references
    for f in (out / "stacks").glob("*.mrcs"):
        assert mrcfile.validate(str(f))


def test_relion_motion_star_and_micrographs_star(relion_run: tuple[Path, pd.DataFrame]) -> None:
    out, _ = relion_run
    from streamer.formats.trajectories import read_trajectories

    mics = starfile.read(out / "micrographs.star")
    assert list(mics["optics"].columns)[:2] == ["rlnOpticsGroupName", "rlnOpticsGroup"]
    assert "rlnMicrographPixelSize" in mics["optics"].columns
    table = mics["micrographs"]
    assert list(table.columns) == ["rlnMicrographName", "rlnMicrographMetadata", "rlnOpticsGroup",
                                   "rlnAccumMotionTotal", "rlnAccumMotionEarly", "rlnAccumMotionLate"]
    particles = starfile.read(out / "particles.star")["particles"]
    assert set(particles["rlnMicrographName"]) == set(table["rlnMicrographName"])  # RELION pairs them by name
    for _, row in table.iterrows():
        motion = starfile.read(row["rlnMicrographMetadata"], always_dict=True)
        general, shifts = motion["general"], motion["global_shift"]
        assert list(shifts.columns) == ["rlnMicrographFrameNumber", "rlnMicrographShiftX", "rlnMicrographShiftY"]
        assert general["rlnMicrographMovieName"] == row["rlnMicrographName"]
        assert general["rlnImageSizeX"] == 384 and general["rlnImageSizeZ"] == 10 == len(shifts)
        assert general["rlnMotionModelVersion"] == 0 and general["rlnMicrographOriginalPixelSize"] == APIX
        assert general["rlnMicrographDoseRate"] == 1.0
        ours = read_trajectories(out / "trajectories" / f"{movie_stem(row['rlnMicrographName'])}.star")
        # RELION's shift is the one applied to align a frame: minus lmc's trajectory, in pixels
        np.testing.assert_allclose(shifts["rlnMicrographShiftX"], -ours["frame_shifts"][:, 0] / APIX, atol=1e-5)
        np.testing.assert_allclose(shifts["rlnMicrographShiftY"], -ours["frame_shifts"][:, 1] / APIX, atol=1e-5)
        assert row["rlnAccumMotionTotal"] > 0
        # against the simulation's true drift (independent of lmc's convention): RELION's applied shift
        # undoes the drift, up to a constant (the reference frame)
        true = load_truth(out.parent / "s", Path(row["rlnMicrographName"]).name)["frame_shifts"] / APIX
        undo = shifts[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy() + true
        undo -= undo.mean(axis=0)
        assert np.sqrt((undo**2).sum(-1).mean()) < 1.0, undo
        assert np.abs(true - true.mean(axis=0)).max() > 3  # a drift big enough for the sign to matter


def test_cryosparc_outputs_read_as_cryosparc_writes_them(relion_run: tuple[Path, pd.DataFrame]) -> None:
    out, refined = relion_run
    ds = Dataset.load(str(out / "particles.cs"))
    arr = np.load(out / "particles.cs")
    for name, spec in CRYOSPARC_PARTICLE_FIELDS.items():
        assert name in arr.dtype.names, name
        dt, shape = spec if isinstance(spec, tuple) else (spec, ())
        base = arr.dtype[name].base
        assert base.kind == "S" if dt == "S" else base.str == dt, name
        assert arr.dtype[name].shape == shape, name
    assert len(ds) == len(refined)
    np.testing.assert_allclose(np.sort(arr["ctf/df1_A"]), np.sort(refined["rlnDefocusU"]), rtol=1e-6)
    assert set(arr["ctf/type"]) == {b"imported"} and np.all(arr["ctf/scale"] == 1) and np.all(arr["ctf/anisomag"] == 0)
    assert np.all(arr["location/exp_group_id"] == 1) and np.all(arr["blob/psize_A"] == np.float32(1.5))
    csg = yaml.safe_load((out / "particles.csg").read_text())
    assert csg["group"]["type"] == "particle" and set(csg["results"]) == {"blob", "ctf", "location"}
    for group, entry in csg["results"].items():
        assert entry == {"metafile": ">particles.cs", "num_items": len(ds), "type": f"particle.{group}"}


def test_cryosparc_export_in_cryosparc_out(session: Path) -> None:
    """A cryoSPARC refinement export as picks: re-centred on alignments3D/shift, poses and CTF carried."""
    from test_picks_refined import cryosparc_refine_export

    truth = _truth(session)
    movies = list(truth)
    n = [len(truth[m]) for m in movies]
    arr = np.concatenate([cryosparc_refine_export(k, f"J2/motioncorrected/000000000000000000{j:03d}_{movie_stem(m)}_patch_aligned_doseweighted.mrc",
                                                  (384, 384), APIX, seed=j) for j, (m, k) in enumerate(zip(movies, n, strict=True))])
    picks = np.concatenate([truth[m] for m in movies])
    shift_A = arr["alignments3D/shift"].astype(np.float64) * arr["alignments3D/psize_A"][:, None]
    arr["location/center_x_frac"] = (picks[:, 0] + shift_A[:, 0] / APIX) / 384
    arr["location/center_y_frac"] = (picks[:, 1] + shift_A[:, 1] / APIX) / 384
    (session / "csin").mkdir()
    with open(session / "csin" / "P1_J9_particles_exported.cs", "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    _run(session, session / "csin" / "P1_J9_particles_exported.cs", "out_cs")
    got = np.load(session / "out_cs" / "particles.cs")
    assert len(got) == len(arr)
    order = np.lexsort((got["location/center_y_frac"], got["location/center_x_frac"]))
    want = np.lexsort((picks[:, 1], picks[:, 0]))
    np.testing.assert_allclose(got["location/center_x_frac"][order] * 384, picks[want, 0], atol=2e-3)
    # carried: poses as they were (matched through the defocus, unique per particle), shifts reset
    match = {round(float(d), 1): i for i, d in enumerate(arr["ctf/df1_A"])}
    idx = np.array([match[round(float(d), 1)] for d in got["ctf/df1_A"]])
    np.testing.assert_allclose(got["alignments3D/pose"], arr["alignments3D/pose"][idx], rtol=1e-6)
    assert got["alignments3D/split"].dtype == np.dtype("<u4")
    np.testing.assert_array_equal(got["alignments3D/split"], arr["alignments3D/split"][idx])
    assert np.all(got["alignments3D/shift"] == 0)
    np.testing.assert_allclose(got["ctf/anisomag"], arr["ctf/anisomag"][idx])
    assert set(got["ctf/type"]) == {b"spline"}
    csg = yaml.safe_load((session / "out_cs" / "particles.csg").read_text())
    assert set(csg["results"]) == {"blob", "ctf", "location", "alignments3D"}
    Dataset.load(str(session / "out_cs" / "particles.cs"))  # cryosparc-tools reads it
