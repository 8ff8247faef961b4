"""Each stage of streamer/pipeline.py on its own, against an independent computation, and their
composition (``process_movie``): stage order, timings, the caller's Workspace."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from gpu.extract import boxes_inside
from streamer import pipeline as pl
from streamer.config import Config, from_dict
from streamer.formats.movies import read_movie
from streamer.sim.simulate import SimParams, load_truth, simulate_session

BOX = 96
STAGES = ["decode", "gain", "motion", "picks", "local", "extract", "micrograph"]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stages")
    params = SimParams(movies=1, frames=16, shape=(512, 512), particles=8, seed=3, mass_kda=600.0,
                       drift_A=(20.0, 25.0), junk_picks=1, edge_particles=2, format="mrc")
    simulate_session(root, params)
    return root


@pytest.fixture(scope="module")
def movie(session: Path) -> Path:
    return next((session / "movies").iterdir())


def _cfg(session: Path, **extra: object) -> Config:
    data = {"apix": 1.0, "dose_per_frame": 1.0, "box": BOX, "device": "cpu", "gain": {"file": str(session / "gain.mrc")},
            "picks": {"dir": str(session / "picks")}, "local": {"align_box": 96}}
    data.update(extra)
    return from_dict(data)


def test_decode_reads_the_file_or_passes_the_preloaded_movie(session: Path, movie: Path) -> None:
    cfg = _cfg(session)
    mov = pl.decode(cfg, str(movie))
    assert mov.frames.shape == (16, 512, 512)
    with mrcfile.open(movie, permissive=True) as m:
        assert np.array_equal(mov.frames, m.data)
    assert pl.decode(cfg, str(movie), preloaded=mov) is mov


def test_gain_stage_multiplies_releases_the_raw_movie_and_reuses_the_workspace(session: Path, movie: Path) -> None:
    cfg = _cfg(session, gain={"file": str(session / "gain.mrc"), "hot_pixel_sigma": 0})
    with mrcfile.open(session / "gain.mrc", permissive=True) as m:
        gain = np.asarray(m.data, np.float32)
    raw = read_movie(str(movie)).frames.astype(np.float32)
    ws = pl.Workspace()
    mov = read_movie(str(movie))
    frames = pl.correct_gain(cfg, mov, xp=np, gain=None, workspace=ws)
    assert np.allclose(frames.data, raw * gain, rtol=1e-6)
    assert frames.shape == (16, 512, 512) and frames.phys_shape == (512, 512) and frames.apix == cfg.apix
    assert mov.frames.size == 0 and frames.reusable and frames.n_bad == 0
    # a kept buffer of the right shape is written into; one of another shape is not used
    ws.keep("frames", frames.data)
    again = pl.correct_gain(cfg, read_movie(str(movie)), xp=np, gain=None, workspace=ws)
    assert again.data is frames.data and ws.frames is None
    ws.keep("binned", np.zeros((3, 4, 4), np.float32))
    assert ws.take("binned", (16, 256, 256)) is None and ws.binned is None


def test_hot_pixels_are_found_and_replaced(session: Path, movie: Path) -> None:
    truth = load_truth(session, movie.name)
    frames = pl.correct_gain(_cfg(session), read_movie(str(movie)), xp=np, gain=None, workspace=pl.Workspace())
    assert frames.n_bad >= len(truth["hot_pixels"])
    total = frames.data.sum(axis=0)
    for x, y in truth["hot_pixels"]:
        assert total[y, x] < total.mean() + 6 * total.std()


def test_full_frame_motion_follows_the_true_drift_with_or_without_the_2x2_sums(session: Path, movie: Path) -> None:
    cfg = _cfg(session)
    truth = load_truth(session, movie.name)
    frames = pl.correct_gain(cfg, read_movie(str(movie)), xp=np, gain=None, workspace=pl.Workspace())
    plain = pl.full_frame_motion(cfg, frames)
    err = plain.shifts_px * cfg.apix - truth["frame_shifts"]
    err -= err.mean(axis=0)
    assert np.sqrt((err**2).sum(-1).mean()) < 1.0
    assert plain.shifts_px.shape == (16, 2) and plain.shifts_px.dtype == np.float64
    summed = pl.full_frame_motion(cfg, frames, sums2=pl.binned_sums(frames, pl.Workspace()))
    assert np.allclose(summed.shifts_px, plain.shifts_px, atol=0.05)
    image, binning = pl.micrograph(plain)
    assert binning >= 1 and abs(image.shape[0] * binning - 512) <= 2 * binning


def test_locate_picks_maps_physical_pixels_onto_upsampled_frames(session: Path, movie: Path) -> None:
    cfg = _cfg(session)
    truth = load_truth(session, movie.name)
    for u in (1, 2):
        frames = pl.Frames(None, (16, 512 * u, 512 * u), u, cfg.apix / u, 0, False)
        located = pl.locate_picks(cfg, str(movie), None, frames)
        assert located.n_picks == len(truth["picks"])
        order = np.lexsort(truth["picks"].T)
        got = located.positions[np.lexsort(located.positions.T)]
        assert np.allclose(got, truth["picks"][order] * u + (u - 1) / 2, atol=1e-3)


def test_local_stage_counts_edge_particles_and_is_zero_when_disabled(session: Path, movie: Path) -> None:
    cfg = _cfg(session)
    frames = pl.correct_gain(cfg, read_movie(str(movie)), xp=np, gain=None, workspace=pl.Workspace())
    motion = pl.full_frame_motion(cfg, frames)
    located = pl.locate_picks(cfg, str(movie), None, frames)
    off = pl.local_trajectories(_cfg(session, local={"enabled": False}), frames, located.positions, motion)
    assert not off.smooth.any() and not off.raw.any() and off.info == {}
    on = pl.local_trajectories(cfg, frames, located.positions, motion)
    centres = np.rint(located.positions[:, None] + motion.shifts_px[None])
    inside = boxes_inside(centres, 96, (512, 512)).all(axis=1)
    assert on.n_outside == int((~inside).sum()) >= 1
    assert on.smooth.shape == (len(located.positions), 16, 2) and np.isfinite(on.smooth).all()
    assert not on.smooth[~inside].any() and "choice" in on.info


def test_local_patches_are_binned_only_with_enough_particles(session: Path, movie: Path) -> None:
    """``local.bin_min_particles``: at or above it the band spectra are those of the 2x2-summed patches
    (cut from the motion stage's sums), below it those of the full-resolution patches."""
    from gpu.local_model import spectra_from_frames

    cfg = _cfg(session, local={"align_box": 96, "band_high": 24.0})  # band index 4 <= 96/8: binnable
    frames = pl.correct_gain(cfg, read_movie(str(movie)), xp=np, gain=None, workspace=pl.Workspace())
    motion = pl.full_frame_motion(cfg, frames, sums2=pl.binned_sums(frames, pl.Workspace()))
    located = pl.locate_picks(cfg, str(movie), None, frames)
    n_inside = int(pl.local_spectra(cfg, frames, located.positions, motion)[1].sum())
    assert n_inside >= 4
    kw = {"apix": 1.0, "dose_per_frame": 1.0, "band_high": 24.0}
    for threshold, binned in ((n_inside, True), (n_inside + 1, False), (0, True)):
        c = _cfg(session, local={"align_box": 96, "band_high": 24.0, "bin_min_particles": threshold})
        spec, inside = pl.local_spectra(c, frames, located.positions, motion)
        centres = (located.positions[:, None] + motion.shifts_px[None])[inside]
        expected = (spectra_from_frames(frames.data, centres, 96, binned_frames=motion.sums2, **kw) if binned
                    else spectra_from_frames(frames.data, centres, 96, binning=1, **kw))
        assert np.allclose(spec.x, expected.x, rtol=1e-5, atol=1e-5), threshold
    unbinned = spectra_from_frames(frames.data, centres, 96, binning=1, **kw)
    binned_x = spectra_from_frames(frames.data, centres, 96, binned_frames=motion.sums2, **kw).x
    assert not np.allclose(unbinned.x, binned_x, rtol=1e-3, atol=1e-3)


def test_a_box_not_a_multiple_of_4_is_binned_at_the_multiple_below(session: Path, movie: Path) -> None:
    """An alignment box of 98 px takes the binned path at 96 px (with enough particles), and keeps its
    98 px at full resolution below ``bin_min_particles``: the same spectra as given those boxes."""
    from gpu.local_model import spectra_from_frames

    cfg = _cfg(session, local={"align_box": 98, "band_high": 24.0, "bin_min_particles": 0})
    frames = pl.correct_gain(cfg, read_movie(str(movie)), xp=np, gain=None, workspace=pl.Workspace())
    assert pl.use_binned_patches(cfg, frames, np, None) and pl.binned_alignment_box(cfg, frames) == 96
    motion = pl.full_frame_motion(cfg, frames, sums2=pl.binned_sums(frames, pl.Workspace()))
    located = pl.locate_picks(cfg, str(movie), None, frames)
    kw = {"apix": 1.0, "dose_per_frame": 1.0, "band_high": 24.0}
    spec, inside = pl.local_spectra(cfg, frames, located.positions, motion)
    centres = (located.positions[:, None] + motion.shifts_px[None])[inside]
    assert spec.box == 96 and inside.sum() >= 4
    want = spectra_from_frames(frames.data, centres, 96, binned_frames=motion.sums2, **kw)
    assert np.allclose(spec.x, want.x, rtol=1e-5, atol=1e-5)
    sparse = _cfg(session, local={"align_box": 98, "band_high": 24.0, "bin_min_particles": 10_000})
    spec, inside = pl.local_spectra(sparse, frames, located.positions, motion)
    centres = (located.positions[:, None] + motion.shifts_px[None])[inside]
    assert spec.box == 98
    want = spectra_from_frames(frames.data, centres, 98, binning=1, **kw)
    assert np.allclose(spec.x, want.x, rtol=1e-5, atol=1e-5)
    wide = _cfg(session, local={"align_box": 98, "band_high": 6.0})  # band index 16 > 96/8: never binned
    assert pl.binned_alignment_box(wide, frames) is None and not pl.use_binned_patches(wide, frames, np, None)


def test_extract_stage_is_the_plain_window_sum_without_weights(session: Path, movie: Path) -> None:
    cfg = _cfg(session, dose_weighting=False, normalize=False, box=64)
    frames = pl.correct_gain(cfg, read_movie(str(movie)), xp=np, gain=None, workspace=pl.Workspace())
    pos = np.array([[100.0, 120.0], [300.0, 260.0], [2.0, 250.0]])  # the last box leaves the frame
    out = pl.extract(cfg, frames, pos, np.zeros((16, 2)), None)
    assert out.kept.tolist() == [0, 1] and [i for i, _ in out.reasons] == [2]
    total = frames.data.sum(axis=0)
    for k, (x, y) in enumerate(pos[:2].astype(int)):
        assert np.allclose(out.particles[k], total[y - 32 : y + 32, x - 32 : x + 32], rtol=1e-4, atol=1e-2)
    cropped = pl.extract(cfg.with_(fcrop_box=32, normalize=True), frames, pos[:2], np.zeros((16, 2)), None)
    assert cropped.particles.shape == (2, 32, 32) and cropped.particles.dtype == np.float32


def test_extract_stage_weights_frames_by_their_alignment_uncertainty(session: Path, movie: Path) -> None:
    """With ``uncertainty_weighting`` each frame's exposure weight carries the B-factor of the
    trajectory's posterior sd (gpu/dose.py): the same particles as precomputed weights built by hand."""
    from gpu.dose import dose_weights
    from gpu.extract import extract_particles

    cfg = _cfg(session, normalize=False, box=64)
    frames = pl.correct_gain(cfg, read_movie(str(movie)), xp=np, gain=None, workspace=pl.Workspace())
    pos = np.array([[100.0, 120.0], [300.0, 260.0]])
    traj = np.zeros((16, 2))
    sd_px = np.linspace(1.5, 0.1, 16)
    b = 4 * np.pi**2 * sd_px**2  # 8π² σ², σ² = sd²/2 per axis
    kr = np.hypot(np.fft.fftfreq(64)[:, None], np.fft.rfftfreq(64)[None, :])  # 1/px = 1/Å at 1 Å/px
    by_hand = dose_weights(kr, 16, 1.0, frame_bfactors=b)
    expected, _, _ = extract_particles(frames.data, pos, traj, box=64, out_box=64, apix=1.0, dose=by_hand)
    weighted = pl.extract(cfg, frames, pos, traj, sd_px)
    assert np.allclose(weighted.particles, expected, rtol=1e-4, atol=1e-4)
    plain = pl.extract(cfg, frames, pos, traj, None)
    assert not np.allclose(weighted.particles, plain.particles, rtol=1e-3, atol=1e-3)
    assert np.array_equal(pl.extract(cfg.with_(uncertainty_weighting=False), frames, pos, traj, sd_px).particles,
                          plain.particles)
    assert np.allclose(pl.extract(cfg, frames, pos, traj, np.zeros(16)).particles, plain.particles, atol=1e-5)


def test_process_movie_runs_the_stages_in_order_and_times_each(session: Path, movie: Path, tmp_path: Path) -> None:
    cfg = _cfg(session, out=str(tmp_path / "out"))
    seen: list[str] = []
    ws = pl.Workspace()
    first = pl.process_movie(cfg, str(movie), on_stage=seen.append, workspace=ws)
    assert seen == STAGES
    assert [k for k in first.stats if k.startswith("seconds_")] == [f"seconds_{s}" for s in STAGES] + ["seconds_sidecars"]
    assert all(first.stats[f"seconds_{s}"] >= 0 for s in STAGES)
    assert ws.frames is not None and ws.frames.shape == (16, 512, 512)
    assert ws.binned is not None and ws.binned.shape == (16, 256, 256)  # the 2x2 sums of the patches
    kept, kept_binned = ws.frames, ws.binned
    second = pl.process_movie(cfg, str(movie), workspace=ws, write_sidecars=False)
    assert ws.frames is kept and ws.binned is kept_binned  # the same buffers went round again
    assert np.array_equal(second.particles, first.particles)
    assert np.array_equal(second.traj_smooth, first.traj_smooth)
    assert "seconds_sidecars" not in second.stats
    assert first.n + len(first.skipped) == first.stats["n_picks"]
