from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import tifffile
from scipy.ndimage import fourier_shift
from scipy.stats import poisson

from gpu.dose import critical_exposure
from streamer.config import from_dict
from streamer.sim import motion as sim_motion
from streamer.sim import specimen as sim_specimen
from streamer.sim.simulate import (
    SimParams,
    _Particles,
    load_truth,
    poisson_counts,
    render_movie,
    simulate_session,
    truth_particles,
    write_movie,
)

# small and fast: 150 kDa particles, few frames; a high dose per frame keeps the SNR of a short movie usable
SMALL = SimParams(
    movies=2,
    frames=12,
    shape=(384, 384),
    particles=6,
    mass_kda=150,
    dose_per_frame=3.0,
    seed=3,
    junk_picks=2,
    drift_A=(25.0, 35.0),
)
BLANK = dict(particles=0, edge_particles=0, junk_picks=0, ice_texture=0.0, hot_pixels=0)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_session(tmp_path_factory.mktemp("sim"), SMALL)


def _movie(session: Path, index: int) -> Path:
    info = json.loads((session / "session.json").read_text())
    return session / info["movies"][index]["movie"]


def test_session_layout_and_json(session: Path) -> None:
    info = json.loads((session / "session.json").read_text())
    assert [Path(m["movie"]).name for m in info["movies"]] == [
        "FoilHole_1_Data_1_fractions.tiff",
        "FoilHole_1_Data_2_fractions.tiff",
    ]
    for m in info["movies"]:
        assert (
            (session / m["movie"]).is_file() and (session / m["picks"]).is_file() and (session / m["truth"]).is_file()
        )
        assert m["picks"].endswith("_fractions_autopick.star")
    rec = info["recommended"]
    assert rec["apix"] == 1.0 and rec["dose_per_frame"] == 3.0 and rec["kv"] == 300.0
    assert rec["gain"] == {"file": "gain.mrc", "mode": "multiply"}
    cfg = from_dict(rec)  # the recommended settings are a valid lmc configuration
    assert cfg.box == rec["box"] and cfg.gain.mode == "multiply" and cfg.picks.format == "star"
    assert "--apix 1.0" in info["flags"] and "--gain gain.mrc --gain-mode multiply" in info["flags"]
    truth = load_truth(session, "FoilHole_1_Data_1")
    assert rec["box"] == truth["box"] and rec["box"] % 2 == 0
    assert rec["box"] >= 1.5 * truth["diameter_A"] / SMALL.apix
    assert SimParams.from_dict(info["params"]) == SMALL


def test_file_matches_render_and_is_reproducible(session: Path) -> None:
    counts, truth = render_movie(SMALL, 1)
    on_disk = tifffile.imread(_movie(session, 1))
    assert on_disk.dtype == np.uint8 and on_disk.shape == (SMALL.frames, *SMALL.shape)
    np.testing.assert_array_equal(on_disk, counts)
    with tifffile.TiffFile(_movie(session, 1)) as tf:
        assert len(tf.pages) == SMALL.frames and tf.pages[0].compression == 5  # LZW
    np.testing.assert_array_equal(load_truth(session, "FoilHole_1_Data_2")["positions"], truth["positions"])
    other, _ = render_movie(SimParams(**{**SMALL.to_dict(), "seed": 4}), 1)
    assert not np.array_equal(other, counts)


def test_counts_mean_and_poisson_variance() -> None:
    params = SimParams(movies=1, frames=6, shape=(256, 256), gain_sigma=0.0, dose_per_frame=1.5, apix=1.2, **BLANK)
    counts, _ = render_movie(params, 0)
    expected = params.dose_per_frame * params.apix**2
    c = counts.astype(np.float64)
    assert c.mean() == pytest.approx(expected, rel=0.01)
    assert c.var() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("lam", [0.3, 1.0, 3.5, 40.0])
def test_poisson_sampler_distribution(lam: float) -> None:
    rng = np.random.default_rng(7)
    x = poisson_counts(np.full(200_000, lam, np.float32), rng)
    ks = np.arange(int(lam + 6 * np.sqrt(lam) + 6))
    freq = np.bincount(x, minlength=len(ks))[: len(ks)] / x.size
    pmf = poisson.pmf(ks, lam)
    assert np.all(np.abs(freq - pmf) <= 5 * np.sqrt(pmf / x.size) + 1e-4), (freq, pmf)


def test_gain_reference_flattens_blank_frames(tmp_path: Path) -> None:
    params = SimParams(movies=1, frames=30, shape=(256, 256), gain_sigma=0.15, format="mrc", **BLANK)
    simulate_session(tmp_path, params)
    with mrcfile.open(tmp_path / "movies" / "FoilHole_1_Data_1_fractions.mrc") as m:
        total = m.data.astype(np.float64).sum(axis=0)
        assert m.data.dtype == np.int8 and m.voxel_size.x == pytest.approx(params.apix)
    with mrcfile.open(tmp_path / "gain.mrc") as m:
        gain = m.data.astype(np.float64)
    sens = 1.0 / gain
    assert np.corrcoef(total.ravel(), sens.ravel())[0, 1] > 0.5
    flat = total * gain  # multiply convention, no flip or rotation
    assert abs(np.corrcoef(flat.ravel(), sens.ravel())[0, 1]) < 0.02
    # a mis-oriented gain does not flatten
    assert np.corrcoef((total * gain[::-1]).ravel(), sens.ravel())[0, 1] > 0.3
    # what is left is Poisson noise of the expected counts
    expected = params.frames * params.dose_per_frame
    assert flat.var() == pytest.approx(expected, rel=0.05)


def test_eer_movie_and_divide_gain(tmp_path: Path) -> None:
    from streamer.formats import eer

    params = SimParams(movies=1, frames=6, shape=(128, 128), format="eer", gain_sigma=0.15, particles=2, mass_kda=100)
    simulate_session(tmp_path, params)
    counts, _ = render_movie(params, 0)
    movie = tmp_path / "movies" / "FoilHole_1_Data_1_EER.eer"
    frames, n_raw, leftover = eer.read_eer(movie, 1, params.frames)
    assert n_raw == params.frames * params.eer_raw_per_frame + params.eer_leftover
    assert leftover == params.eer_leftover
    with tifffile.TiffFile(movie) as tf:  # an EER TIFF: one page per raw frame, EER compression
        assert len(tf.pages) == n_raw and tf.pages[0].compression in (65000, 65001, 65002)
    want = np.minimum(counts, params.eer_raw_per_frame)  # at most one electron per pixel per raw page
    np.testing.assert_array_equal(frames, want)
    g = tifffile.imread(tmp_path / "gain.gain")  # divide convention: the sensitivity itself
    blank = SimParams(**{**params.to_dict(), **BLANK, "frames": 40, "format": "tiff"})
    total = render_movie(blank, 0)[0].astype(np.float64).sum(axis=0)
    assert np.corrcoef(total.ravel(), g.ravel())[0, 1] > 0.4
    assert abs(np.corrcoef((total / g).ravel(), g.ravel())[0, 1]) < 0.04
    info = json.loads((tmp_path / "session.json").read_text())
    assert info["recommended"]["gain"]["mode"] == "divide" and info["recommended"]["eer"]["fractions"] == params.frames


def test_mrc_bz2_and_progressive_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (7, 64, 96)).astype(np.uint8)
    for fmt, name in (("tiff", "m.tiff"), ("mrc", "m.mrc"), ("mrc.bz2", "m.mrc.bz2")):
        path = tmp_path / name
        seen: list[tuple[int, int]] = []

        def partial(done: int, total: int, path: Path = path, fmt: str = fmt, seen: list = seen) -> None:
            seen.append((done, total))
            if fmt == "tiff":
                with tifffile.TiffFile(path) as tf:
                    assert len(tf.pages) == done
            elif fmt == "mrc":
                assert path.stat().st_size == 1024 + done * 64 * 96
                with mrcfile.open(path, permissive=True, header_only=True) as m:
                    assert int(m.header.nz) == 7  # the header states the whole movie from the start

        write_movie(path, counts, fmt, partial, chunk_frames=3, apix=1.1)
        assert seen == [(3, 7), (6, 7), (7, 7)]
        data = tifffile.imread(path) if fmt == "tiff" else mrcfile.read(path)
        np.testing.assert_array_equal(data, counts)
    assert mrcfile.validate(str(tmp_path / "m.mrc"))
    with pytest.raises(ValueError, match=r"m\.xyz: unknown movie format"):
        write_movie(tmp_path / "m.xyz", counts, "xyz")


def test_parallel_workers_give_identical_files(tmp_path: Path) -> None:
    params = SimParams(movies=2, frames=3, shape=(128, 128), particles=2, mass_kda=40, format="mrc")
    simulate_session(tmp_path / "a", params, workers=1)
    done: list[int] = []
    simulate_session(tmp_path / "b", params, movie_callback=lambda i, p: done.append(i), workers=2)
    assert done == [0, 1]
    for name in ("movies/FoilHole_1_Data_1_fractions.mrc", "movies/FoilHole_1_Data_2_fractions.mrc", "gain.mrc"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_trajectories_zero_at_reference_and_sum(session: Path) -> None:
    t = load_truth(session, "FoilHole_1_Data_1_fractions.tiff")
    ref = SMALL.frames // 2
    assert t["reference_frame"] == ref
    for key in ("frame_shifts", "local", "residual", "trajectories"):
        np.testing.assert_allclose(t[key][..., ref, :], 0.0, atol=1e-9)
    np.testing.assert_allclose(t["trajectories"], t["frame_shifts"][None] + t["local"] + t["residual"], atol=1e-9)
    path = np.linalg.norm(np.diff(t["frame_shifts"], axis=0), axis=1).sum()
    assert SMALL.drift_A[0] - 1e-6 <= path <= SMALL.drift_A[1] + 1e-6


def test_fullframe_burst_is_early() -> None:
    for seed in range(5):
        s = sim_motion.fullframe_trajectory(40, 1.0, 20.0, 20, np.random.default_rng(seed))
        steps = np.linalg.norm(np.diff(s, axis=0), axis=1)
        assert steps.sum() == pytest.approx(20.0)
        assert steps[:4].sum() > 0.5 * steps.sum()  # most of it in the first 4 e/Å²
        assert steps[-10:].mean() > 0  # slow linear drift continues


def test_local_field_smooth_zero_mean_and_scaled() -> None:
    shape, apix = (2000, 2000), 1.0
    field = sim_motion.local_field(shape, apix, 40, 1.0, 3.0, 1500.0, 20, np.random.default_rng(1))
    gy, gx = np.meshgrid(np.arange(0, 2000, 50.0), np.arange(0, 2000, 50.0), indexing="ij")
    disp = field.at(gx, gy)  # (40, 40, F, 2)
    net = disp[..., -1, :] - disp[..., 0, :]
    assert np.sqrt((net**2).sum(-1).mean()) == pytest.approx(3.0, rel=0.1)
    np.testing.assert_allclose(disp[..., 20, :], 0.0, atol=1e-12)
    # smooth in space: neighbours 50 Å apart move alike; the field-of-view mean is removed (full-frame part)
    step = np.abs(np.diff(net, axis=1)).mean()
    assert step < 0.1 * np.abs(net).mean()
    dense = field.grids(np.arange(0, 2000, 4.0), np.arange(0, 2000, 4.0))
    assert np.abs(dense.mean(axis=(-2, -1))).max() < 0.02 * np.abs(dense).max()
    # grids() (separable) agrees with at()
    fields_at = field.fields(gx[:3, :3], gy[:3, :3])  # (2, 3, 3, 2)
    via_grid = field.grids(gx[0, :3], gy[:3, 0])  # (2 fields, 2 comps, 3, 3)
    np.testing.assert_allclose(np.moveaxis(via_grid, 1, -1), fields_at, atol=1e-5)
    # fastest early
    speed = np.linalg.norm(np.diff(disp, axis=-2), axis=-1).mean(axis=(0, 1))
    assert speed[:5].mean() > 2 * speed[-5:].mean()


def test_neighbouring_particles_share_local_motion() -> None:
    params = SimParams(movies=1, frames=10, shape=(1024, 1024), particles=40, mass_kda=50, edge_particles=0)
    from streamer.sim.simulate import _geometry

    geo = _geometry(params, 0)
    pos, local, resid = geo["positions"], geo["local"], geo["residual"]
    d = np.hypot(*(pos[:, None] - pos[None]).transpose(2, 0, 1))
    near, far = (d > 0) & (d < 200), d > 600
    assert near.sum() > 10 and far.sum() > 10

    def ratio(a: np.ndarray) -> float:
        # structure function of the net displacement over the movie: near pairs vs far pairs
        v = a[:, -1] - a[:, 0]
        diff = np.linalg.norm(v[:, None] - v[None], axis=-1)
        return float(diff[near].mean() / diff[far].mean())

    assert ratio(local) < 0.4  # smooth: neighbours move together, distant particles less so
    assert ratio(resid) > 0.7  # independent: no dependence on distance
    rms = np.sqrt(((resid[:, -1] - resid[:, 0]) ** 2).sum(-1).mean())
    assert rms == pytest.approx(params.particle_A, rel=1e-6)


def test_picks_match_truth(session: Path) -> None:
    t = load_truth(session, "FoilHole_1_Data_1")
    star = starfile.read(session / "picks" / "FoilHole_1_Data_1_fractions_autopick.star")
    assert {"rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"} <= set(star.columns)
    xy = star[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    assert len(xy) == SMALL.particles + SMALL.junk_picks
    np.testing.assert_allclose(xy, t["picks"], atol=1e-6)
    real = t["pick_particle"] >= 0
    err = xy[real] - t["positions"][t["pick_particle"][real]]
    assert np.abs(err).max() < 5 * SMALL.pick_jitter_A / SMALL.apix
    assert t["pick_is_junk"].sum() == SMALL.junk_picks
    np.testing.assert_array_equal(t["pick_is_edge"][real], t["is_edge"][t["pick_particle"][real]])
    junk = xy[t["pick_is_junk"]]
    assert np.hypot(*(junk[:, None] - t["positions"][None]).transpose(2, 0, 1)).min() > 0.5 * t["diameter_A"]
    np.testing.assert_allclose(star["rlnDefocusU"], t["micrograph_defocus"][0])
    # edge particles sit within half a diameter of an edge
    e = t["positions"][t["is_edge"]]
    h, w = SMALL.shape
    dist = np.minimum.reduce([e[:, 0], e[:, 1], w - 1 - e[:, 0], h - 1 - e[:, 1]])
    assert t["is_edge"].sum() == SMALL.edge_particles and (dist < 0.5 * t["diameter_A"] / SMALL.apix).all()


@pytest.mark.parametrize("fmt", ["box", "topaz", "cs"])
def test_other_pick_formats(tmp_path: Path, fmt: str) -> None:
    params = SimParams(movies=1, frames=2, shape=(256, 256), particles=3, mass_kda=60, pick_format=fmt)
    simulate_session(tmp_path, params)
    t = load_truth(tmp_path, "FoilHole_1_Data_1")
    (pick,) = list((tmp_path / "picks").iterdir())
    if fmt == "box":
        rows = np.loadtxt(pick, ndmin=2)
        xy = rows[:, :2] + rows[:, 2:4] / 2
    elif fmt == "topaz":
        rows = np.loadtxt(pick, skiprows=1, usecols=(1, 2), ndmin=2)
        xy = rows
    else:
        arr = np.load(pick)
        xy = np.stack([arr["location/center_x_frac"] * 256, arr["location/center_y_frac"] * 256], -1)
    np.testing.assert_allclose(xy, t["picks"], atol=1e-3)


def test_truth_particles_centred(session: Path) -> None:
    t = load_truth(session, "FoilHole_1_Data_1")
    box = t["box"]
    yy, xx = np.mgrid[0:box, 0:box]
    bare = -truth_particles(session, "FoilHole_1_Data_1", box, SMALL.apix, ctf=False)  # 2 × projected phase
    assert bare.shape == (SMALL.particles, box, box) and bare.dtype == np.float32
    m = bare.sum(axis=(1, 2))
    np.testing.assert_allclose((bare * xx).sum(axis=(1, 2)) / m, box // 2, atol=0.05)
    np.testing.assert_allclose((bare * yy).sum(axis=(1, 2)) / m, box // 2, atol=0.05)
    # integral of 2φ = 2 × residue phase × residues (the pseudo-atoms all fit in the box)
    n_res = len(t["atoms"])
    np.testing.assert_allclose(m, 2 * sim_specimen.residue_phase(SMALL.kv) * n_res, rtol=3e-3)
    img = truth_particles(session, "FoilHole_1_Data_1", box, SMALL.apix, ids=[0, 2])
    assert img.shape == (2, box, box)
    a = np.abs(img)
    for c in ((a * xx).sum(axis=(1, 2)) / a.sum(axis=(1, 2)), (a * yy).sum(axis=(1, 2)) / a.sum(axis=(1, 2))):
        np.testing.assert_allclose(c, box // 2, atol=2.0)
    # the image's DC is -2 A Σφ (CTF(0) = A): protein is dark at low resolution, as in the movie
    rb = t["render_box"]
    whole = truth_particles(session, "FoilHole_1_Data_1", rb, SMALL.apix, ids=[0, 2])
    np.testing.assert_allclose(whole.sum(axis=(1, 2)), -SMALL.amplitude_contrast * m[[0, 2]], rtol=1e-3)
    # another pixel size: the same physical box, Fourier-cropped (compare below the coarse Nyquist)
    b4 = 4 * (box // 4)
    fine = truth_particles(session, "FoilHole_1_Data_1", b4, SMALL.apix, ids=[0])[0]
    coarse = truth_particles(session, "FoilHole_1_Data_1", b4 // 2, 2 * SMALL.apix, ids=[0])[0]
    assert coarse.shape == (b4 // 2, b4 // 2)
    np.testing.assert_allclose(_lowpass(coarse, 5.0), _lowpass(fine, 10.0)[::2, ::2], atol=0.02 * np.abs(fine).max())


def _lowpass(a: np.ndarray, res_px: float) -> np.ndarray:
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(a.shape[-1]), np.fft.fftfreq(a.shape[-2])))
    return np.real(np.fft.ifft2(np.fft.fft2(a) * (k < 1 / res_px)))


def test_movie_particles_follow_true_trajectories(session: Path) -> None:
    """Extract each particle along +trajectory, along -trajectory and without motion: only the true
    direction reproduces truth_particles (checks positions, shift signs and the truth images together)."""
    t = load_truth(session, "FoilHole_1_Data_1")
    gain = mrcfile.read(session / "gain.mrc").astype(np.float64)
    movie = tifffile.imread(_movie(session, 0)).astype(np.float64)
    box = t["box"]
    pad = box
    contrast = np.pad(movie * gain / (SMALL.dose_per_frame * SMALL.apix**2) - 1, ((0, 0), (pad, pad), (pad, pad)))
    ids = np.nonzero(~t["is_edge"])[0]
    truth = truth_particles(session, "FoilHole_1_Data_1", box, SMALL.apix, ids=ids)
    scores = {+1: [], -1: [], 0: []}
    for n, p in enumerate(ids):
        for sign in scores:
            acc = np.zeros((box, box))
            for f in range(SMALL.frames):
                x, y = t["positions"][p] + sign * t["trajectories"][p, f] / SMALL.apix + pad
                ix, iy = round(x), round(y)
                cut = contrast[f, iy - box // 2 : iy - box // 2 + box, ix - box // 2 : ix - box // 2 + box]
                acc += np.real(np.fft.ifft2(fourier_shift(np.fft.fft2(cut), (iy - y, ix - x))))
            a, b = _lowpass(acc, 7.0), _lowpass(truth[n], 7.0)
            scores[sign].append(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    good, wrong, still = (np.array(scores[s]) for s in (+1, -1, 0))
    assert good.mean() > 0.2
    assert (good > wrong).all() and good.mean() > wrong.mean() + 0.05
    assert good.mean() > still.mean() + 0.02


def test_radiation_damage_per_frame() -> None:
    """The noise-free particle signal of frame t is the undamaged one times exp(-N_t / (2 Ne(k)))."""
    kw = dict(movies=1, frames=40, particles=1, edge_particles=0, mass_kda=60, defocus_um=(0.8, 0.8))
    from streamer.sim.simulate import _geometry

    box = _Particles(SimParams(**kw), {**_geometry(SimParams(**kw), 0), "positions": np.zeros((1, 2))}).box
    # a frame the size of the render box with the particle at its centre: frame FFT = box FFT
    params = SimParams(shape=(box, box), **kw)
    geo = _geometry(params, 0)
    geo.pop("_field")
    geo["positions"][:] = box // 2
    parts = _Particles(params, geo)
    assert parts.box == box
    ref = params.frames // 2
    early, late = parts.frames(np.array([ref, ref]), np.array([0.5, 30.5]))
    fe, fl = np.abs(np.fft.rfft2(early)), np.abs(np.fft.rfft2(late))
    k = np.hypot(np.fft.fftfreq(box)[:, None], np.fft.rfftfreq(box)[None]) / params.apix
    band = (k > 1 / 12) & (k < 1 / 4) & (fe > 0.05 * fe.max())
    expect = np.exp(-30.0 / (2 * critical_exposure(k[band], params.kv)))
    np.testing.assert_allclose(fl[band] / fe[band], expect, rtol=1e-3, atol=1e-4)


def test_protein_model_is_compact_and_not_spherical() -> None:
    atoms = sim_specimen.protein_model(300, np.random.default_rng(0))
    n = len(atoms)
    assert n == round(300_000 / 110)
    np.testing.assert_allclose(atoms.mean(axis=0), 0.0, atol=1e-3)
    rg = sim_specimen.radius_of_gyration(atoms)
    assert 2.47 * n ** (1 / 3) < rg < 1.5 * 2.2 * n**0.38
    ev = np.linalg.eigvalsh(np.cov(atoms.T))
    assert ev[-1] / ev[0] > 1.5


def test_single_frame_tiny_movie() -> None:
    params = SimParams(movies=1, frames=1, shape=(64, 80), particles=1, edge_particles=0, mass_kda=20, junk_picks=1)
    counts, truth = render_movie(params, 0)
    assert counts.shape == (1, 64, 80)
    assert truth["trajectories"].shape == (1, 1, 2) and not truth["trajectories"].any()
    assert truth["picks"].shape == (2, 2)


def test_bad_params_and_missing_truth(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^simulate: format 'png'"):
        SimParams(format="png")
    with pytest.raises(ValueError, match=r"^simulate: edge_particles"):
        SimParams(particles=1, edge_particles=2)
    (tmp_path / "truth").mkdir()
    with pytest.raises(FileNotFoundError, match="no truth for movie"):
        load_truth(tmp_path, "FoilHole_9_Data_9")


def test_ice_texture_moves_with_full_frame_motion() -> None:
    """The last frame of a texture-only movie is the first frame moved by s_last - s_first."""
    params = SimParams(
        movies=1,
        frames=8,
        shape=(256, 256),
        dose_per_frame=5.0,
        local_A=0.0,
        particle_A=0.0,
        gain_sigma=0.0,
        drift_A=(20.0, 20.0),
        **{**BLANK, "ice_texture": 0.3},
    )
    counts, truth = render_movie(params, 0)
    first, last = (_lowpass(counts[i].astype(np.float64), 12.0) for i in (0, -1))
    move = (truth["frame_shifts"][-1] - truth["frame_shifts"][0]) / params.apix
    assert np.hypot(*move) > 5

    def match(d: np.ndarray) -> float:
        moved = np.real(np.fft.ifft2(fourier_shift(np.fft.fft2(first), (d[1], d[0]))))
        inner = (slice(40, -40), slice(40, -40))
        return float(np.corrcoef(moved[inner].ravel(), last[inner].ravel())[0, 1])

    right, wrong, still = match(move), match(-move), match(np.zeros(2))
    assert right > 0.8 and right > max(wrong, still) + 0.3
