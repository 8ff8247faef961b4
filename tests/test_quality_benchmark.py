"""benchmarks/quality.py and its metrics (streamer/sim/score.py) on a tiny hard session, checked against
independent computations from the simulation's truth."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

from streamer.pipeline import process_movie
from streamer.sim import score
from streamer.sim.simulate import hard_params, load_truth, movie_filename, recommended_box, simulate_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality as bq

TINY = {"shape": (768, 768), "particles": 16, "junk_picks": 2, "frames": 16, "mass_kda": 600.0}


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, bq.MovieScore]:
    root = tmp_path_factory.mktemp("quality")
    params = hard_params(seed=5, movies=1, **TINY)
    simulate_session(root, params)
    cfg = bq.session_config(root, params, {})
    return root, cfg, bq.score_movie(root, params, 0, cfg, bq.frc_band(params.apix))


def test_baselines_against_the_truth(scored: tuple) -> None:
    root, _cfg, ms = scored
    truth = load_truth(root, movie_filename(hard_params(seed=5, movies=1, **TINY), 0))
    ids = [int(np.argmin(np.hypot(*(truth["picks"] - p).T))) for p in ms.picks_px]
    pid = truth["pick_particle"][ids]
    assert (pid >= 0).all() and not truth["is_edge"][pid].any()
    assert np.allclose(ms.truth_A, truth["trajectories"][pid])
    # the oracle has no error at all
    assert score.trajectory_rmse(ms.traj_A["oracle"], ms.truth_A) == pytest.approx(0.0, abs=1e-9)
    assert np.abs(score.common_mode(ms.traj_A["oracle"], ms.truth_A)).max() < 1e-9
    # a perfect full-frame correction misses exactly the local part (field + residual), centred
    local = truth["local"][pid] + truth["residual"][pid]
    local_c = local - local.mean(axis=1, keepdims=True)
    assert score.trajectory_rmse(ms.traj_A["true_ff"], ms.truth_A) == pytest.approx(
        np.sqrt((local_c**2).sum(-1).mean()), rel=1e-9)
    assert np.allclose(score.common_mode(ms.traj_A["true_ff"], ms.truth_A), -local_c.mean(axis=0))
    # the smooth field is between the two
    r_field = score.trajectory_rmse(ms.traj_A["field"], ms.truth_A)
    assert 0 < r_field < score.trajectory_rmse(ms.traj_A["true_ff"], ms.truth_A)


def test_lmc_is_what_the_product_extracts(scored: tuple) -> None:
    root, cfg, ms = scored
    result = process_movie(cfg, str(root / "movies" / movie_filename(hard_params(seed=5, movies=1, **TINY), 0)),
                           write_sidecars=False)
    for k, (x, y) in enumerate(ms.picks_px):
        j = int(np.argmin(np.hypot(result.x - x, result.y - y)))
        assert np.allclose(result.traj_smooth[j], ms.traj_A["lmc"][k])
        assert np.allclose(result.frame_shifts, ms.traj_A["lmc_ff"])


def test_pooled_scores_and_table(scored: tuple) -> None:
    _root, _cfg, ms = scored
    summary = bq.summarise([ms, ms])
    assert summary["particles"] == 2 * ms.n
    frc = summary["frc"]
    assert all(0 < frc[m] < 1 for m in bq.METHODS)
    assert summary["fraction_vs_true_ff"] == pytest.approx((frc["lmc"] - frc["true_ff"]) / (frc["oracle"] - frc["true_ff"]))
    assert summary["rmse"]["true_ff"] == pytest.approx(score.trajectory_rmse(ms.traj_A["true_ff"], ms.truth_A))
    cm = score.common_mode_summary(score.common_mode(ms.traj_A["lmc"], ms.truth_A))
    assert summary["common_mode"]["lmc"]["rms"] == pytest.approx(cm["rms"])
    assert cm["worst"] >= cm["rms"] and summary["choices"] == [ms.choice] * 2
    sd = ms.extra["common_sd_A"]  # lmc's own posterior std of s + c, per frame
    assert sd.shape == (ms.truth_A.shape[1],) and np.all(sd > 0)
    assert summary["common_sd"] == pytest.approx({"rms": float(np.sqrt(np.mean(sd**2))), "frame0": float(sd[0])})
    # the data's limit: s + c with every particle's own motion known, one full-frame trajectory
    limit = ms.traj_A["common_limit"]
    assert limit.shape == (ms.truth_A.shape[1], 2) and not np.allclose(limit, ms.traj_A["motion"])
    cl = score.common_mode_summary(score.common_mode(limit, ms.truth_A))
    assert summary["common_mode"]["common_limit"] == pytest.approx(cl)
    summary.update(regime="tiny", seeds=[5], band_A=[30.0, 2.5])
    row = bq.table([summary]).splitlines()[-1]
    assert row.startswith("| tiny | 5 | ") and f"{summary['fraction_vs_true_ff']:+.2f}" in row
    assert f"{cl['rms']:.2f} ({cl['worst']:.2f}), {cl['first']:.2f} / {cl['last']:.2f}" in row


def test_metric_functions_on_known_values() -> None:
    rng = np.random.default_rng(1)
    pos = rng.uniform(0, 1000, (30, 2))
    u = pos / 500.0 - 1
    cubic = np.stack([0.3 * u[:, 0] ** 3 - u[:, 1] ** 2 * u[:, 0], 2 * u[:, 1] + 0.1], -1)[:, None, :] * np.arange(5)[None, :, None]
    assert np.allclose(score.smooth_field_fit(pos, cubic), cubic)  # a cubic field is fitted exactly
    noisy = cubic + rng.normal(0, 0.5, cubic.shape)
    assert score.trajectory_rmse(score.smooth_field_fit(pos, noisy), cubic) < score.trajectory_rmse(noisy, cubic)
    cm = np.zeros((20, 2))
    cm[0] = (3.0, 4.0)
    assert score.common_mode_summary(cm) == pytest.approx({"rms": 5 / np.sqrt(20), "worst": 5.0, "first": 5 / np.sqrt(6), "last": 0.0})
    # a constant offset is not an error (centred); a common shift of every particle is all common mode
    truth = rng.normal(0, 1, (4, 20, 2))
    assert score.trajectory_rmse(truth + 7.0, truth) == pytest.approx(0.0, abs=1e-12)
    step = np.zeros((20, 2))
    step[10:] = 1.0
    assert np.allclose(score.common_mode(truth + step, truth), step - step.mean(axis=0))
    assert np.allclose(score.reference_offsets(pos[:4], pos[:4] + 1.0, truth, truth), -1.0)
    assert score.oracle_fraction(0.5, 0.4, 0.6) == pytest.approx(0.5) and np.isnan(score.oracle_fraction(1, 1, 1))
    # picks read back -> particle ids: the nearest written pick within the tolerance; junk and strays -1
    truth_picks = {"picks": np.array([[10.0, 10.0], [50.0, 20.0], [90.0, 90.0]]), "pick_particle": np.array([4, -1, 7])}
    read = np.array([[90.0, 90.3], [10.0, 10.0], [50.0, 20.0], [30.0, 30.0]])
    assert score.pick_ids(read, truth_picks, 0.5).tolist() == [7, 4, -1, -1]
    assert score.pick_ids(read, truth_picks, 0.01).tolist() == [-1, 4, -1, -1]
    assert score.pick_ids(read, {"picks": np.zeros((0, 2)), "pick_particle": np.zeros(0, int)}, 0.5).tolist() == [-1] * 4


def test_heldout_seeds_are_apart_and_only_scored_on_request() -> None:
    assert set(bq.HELDOUT_SEEDS) == set(bq.REGIMES)
    assert not set(bq.HELDOUT_SEEDS.values()) & set(bq.TUNING_SEEDS)
    assert len(set(bq.HELDOUT_SEEDS.values())) == len(bq.REGIMES)
    with pytest.raises(SystemExit):
        bq.main(["--regimes", "no-such-regime"])
    args = argparse.Namespace(movies=1, band_low=30.0, overrides={"local.enabled": False})
    # two seeds: two protein models, one box for both (their FRC rings pool)
    r = bq.run_regime("default", [7, 8], args, sim_overrides={**TINY, "frames": 8, "particles": 8})
    boxes = {recommended_box(hard_params(seed=s, **TINY)) for s in (7, 8)}
    assert len(boxes) == 2 and r["box"] == max(boxes)
    assert r["fraction_vs_lmc_ff"] == pytest.approx(0.0) and r["choices"] == ["off", "off"]


def test_cached_sessions_are_reused_with_the_same_parameters(tmp_path: Path) -> None:
    tiny = {**TINY, "frames": 6, "particles": 6}
    args = argparse.Namespace(movies=1, band_low=30.0, overrides={}, cache=str(tmp_path / "cache"))
    first = bq.run_regime("default", [9], args, sim_overrides=tiny)
    (folder,) = (tmp_path / "cache").iterdir()
    stamp = (folder / "session.json").stat().st_mtime_ns
    again = bq.run_regime("default", [9], args, sim_overrides=tiny)
    assert (folder / "session.json").stat().st_mtime_ns == stamp  # not simulated again
    assert again["frc"] == first["frc"] and again["rmse"] == first["rmse"]
    bq.run_regime("default", [9], args, sim_overrides={**tiny, "mass_kda": 500.0})  # other parameters: a new session
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_changed_simulator_renders_its_sessions_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key holds the simulator's code: a session cached before a change to it is not reused."""
    params = hard_params(seed=9, movies=1, **{**TINY, "frames": 6, "particles": 6})
    digest = bq.simulator_digest()
    assert len(digest) == 64 and digest == bq.simulator_digest()
    first = bq.simulated_session(params, tmp_path / "unused", str(tmp_path / "cache"))
    assert bq.simulated_session(params, tmp_path / "unused", str(tmp_path / "cache")) == first
    monkeypatch.setattr(bq, "simulator_digest", lambda: "0" * 64)  # as if simulate.py had changed
    second = bq.simulated_session(params, tmp_path / "unused", str(tmp_path / "cache"))
    assert second != first and (second / "session.json").is_file() and (first / "session.json").is_file()


def test_likelihood_calibration_score_at_the_truth(scored: tuple) -> None:
    """benchmarks/likelihood_calibration.py: z = score / sqrt(curvature) at the true trajectories is
    finite per frame and axis and of order 1 (a calibrated likelihood)."""
    import likelihood_calibration as lc

    root, cfg, _ms = scored
    name = movie_filename(hard_params(seed=5, movies=1, **TINY), 0)
    z = lc.movie_z(cfg, root, name, overlap=True)
    assert z.shape == (TINY["frames"], 2) and np.all(np.isfinite(z))
    assert 0.3 < z.std() < 3.0
    g, h = lc.movie_score(cfg, root, name, overlap=True)
    assert np.allclose(g / np.sqrt(h)[:, None], z)


def test_worst_block_finds_a_common_pull_on_consecutive_frames() -> None:
    """A pull of +1 on frames 5-8 of axis y, each of curvature 1, is a block z of 4/sqrt(4) = 2."""
    import likelihood_calibration as lc

    g = np.zeros((12, 2))
    g[5:9, 1] = 1.0
    g[0, 0] = -1.5  # one frame alone: block z 1.5/2
    assert lc.worst_block(g, np.ones(12)) == (pytest.approx(2.0), 5, "y")


def test_reference_information_is_the_fisher_information_of_a_shift() -> None:
    """benchmarks/reference_information.py: D a² Σ |∇ image_t|² / 2 from the half-plane spectrum equals
    the same sum over pixels of the real-space derivatives (each frame's exposure filter and the band
    applied alike), and the numerical Fisher information of a shift of the Poisson mean."""
    import reference_information as ri

    from gpu.dose import dose_weights

    rng = np.random.default_rng(3)
    b, apix, dose, frames, res = 48, 1.2, 1.5, 3, 4.0
    img = 0.05 * rng.standard_normal((2, b, b))
    got = ri.reference_information(img, apix, frames, dose, 0.0, 300.0, res)  # (P, F)
    ky, kx = np.fft.fftfreq(b)[:, None], np.fft.rfftfreq(b)[None, :]
    kmag = np.hypot(kx, ky) / apix
    q = dose_weights(kmag, frames, dose, 0.0, 300.0, normalize=False) * (kmag <= 1.0 / res)
    for t in range(frames):
        spec = np.fft.rfft2(img) * q[t]
        gx = np.fft.irfft2(2j * np.pi * kx * spec, s=(b, b))
        gy = np.fft.irfft2(2j * np.pi * ky * spec, s=(b, b))
        want = dose * apix**2 * ((gx**2).sum(axis=(1, 2)) + (gy**2).sum(axis=(1, 2))) / 2
        np.testing.assert_allclose(got[:, t], want, rtol=1e-6)
    # Fisher information of a shift along x: var of the score of Poisson counts with mean μ(x - δ)
    def mu(d: float) -> np.ndarray:  # expected counts of frame 0 with its content shifted by d px in x
        return dose * apix**2 * (1 + np.fft.irfft2(np.fft.rfft2(img[0]) * q[0] * np.exp(-2j * np.pi * kx * d), s=(b, b)))

    eps = 1e-4
    dmu = (mu(eps) - mu(-eps)) / (2 * eps)
    fisher_x = float((dmu**2 / mu(0.0)).sum())
    assert fisher_x == pytest.approx(
        dose * apix**2 * float((np.fft.irfft2(2j * np.pi * kx * np.fft.rfft2(img[0]) * q[0], s=(b, b)) ** 2).sum()), rel=0.05)


def test_information_against_a_reference_that_is_not_the_image() -> None:
    """benchmarks/reference_information.py: aligning against a template μ that is not the image f gives
    ``(Σ c Re(μ* f))² / Σ c |μ|²``: the same sums over pixels of real-space derivatives; equal to the
    information of f itself for μ ∝ f and below it otherwise (Cauchy-Schwarz)."""
    import reference_information as ri

    rng = np.random.default_rng(5)
    b, apix, dose, frames, res = 40, 1.5, 1.0, 3, 6.0
    f = 0.05 * rng.standard_normal((2, b, b))
    mu = f + 0.05 * rng.standard_normal((2, b, b))
    c = ri.fisher_weights(b, apix, frames, dose, 0.0, 300.0, res)
    got = ri.mismatched_information(np.fft.rfft2(f), np.fft.rfft2(mu), c)
    own = ri.reference_information(f, apix, frames, dose, 0.0, 300.0, res)
    np.testing.assert_allclose(ri.mismatched_information(np.fft.rfft2(f), 3.0 * np.fft.rfft2(f), c), own, rtol=1e-9)
    assert np.all(got < own)
    ky, kx = np.fft.fftfreq(b)[:, None], np.fft.rfftfreq(b)[None, :]
    kmag = np.hypot(kx, ky) / apix
    from gpu.dose import dose_weights

    q = dose_weights(kmag, frames, dose, 0.0, 300.0, normalize=False) * (kmag <= 1.0 / res)

    def grads(img: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        spec = np.fft.rfft2(img) * q[t]
        return (np.fft.irfft2(2j * np.pi * kx * spec, s=(b, b)), np.fft.irfft2(2j * np.pi * ky * spec, s=(b, b)))

    for t in range(frames):
        (fx, fy), (mx, my) = grads(f, t), grads(mu, t)
        # q_t appears in both: the frame's attenuated image against the equally attenuated template
        cross = ((fx * mx + fy * my).sum(axis=(1, 2)) / 2) ** 2
        norm = (mx**2 + my**2).sum(axis=(1, 2)) / 2
        np.testing.assert_allclose(got[:, t], dose * apix**2 * cross / norm, rtol=1e-6)


def test_rotational_average_and_in_plane_turns() -> None:
    """The rotational average does not change with the image's orientation (a transpose about the box
    centre) and keeps a centred round blob; ``in_plane`` turns x towards y by +ψ."""
    import reference_information as ri

    rng = np.random.default_rng(6)
    b = 32
    img = rng.standard_normal((1, b, b))
    c = b // 2
    flipped = np.roll(np.roll(img[:, ::-1, ::-1], 1, axis=1), 1, axis=2)  # 180° about index b//2
    np.testing.assert_allclose(ri.rotational_average(img), ri.rotational_average(np.swapaxes(img, 1, 2)), atol=1e-12)
    np.testing.assert_allclose(ri.rotational_average(img), ri.rotational_average(flipped), atol=1e-12)
    yy, xx = np.mgrid[0:b, 0:b]
    blob = np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * 3.0**2))[None]
    avg = ri.rotational_average(blob)
    assert np.abs(avg - blob).max() < 0.05 * blob.max()  # rings of one Fourier pixel: a few % off
    assert np.abs(avg - ri.rotational_average(img)).max() > 0.1  # it is not a constant map
    turned = ri.in_plane(np.eye(3)[None], np.array([90.0]))[0, 0]
    np.testing.assert_allclose(turned @ np.array([1.0, 0.0, 0.0]), [0.0, 1.0, 0.0], atol=1e-6)


def test_best_template_finds_the_particles_view_and_angle() -> None:
    """``best_templates`` picks, from views × in-plane angles, the CTF-multiplied projection that is the
    particle's (a view among the candidates, turned by an angle between the coarse steps) from a noisy image."""
    import reference_information as ri

    from gpu.ctf import ctf_2d
    from streamer.sim.specimen import project_atoms, random_rotations

    rng = np.random.default_rng(7)
    b, apix = 48, 2.0
    atoms = (rng.standard_normal((300, 3)) * np.array([18.0, 10.0, 6.0])).astype(np.float32)
    views = random_rotations(12, rng)
    ky, kx = np.fft.fftfreq(b)[:, None], np.fft.rfftfreq(b)[None, :]
    band = np.hypot(kx, ky) / apix <= 1.0 / 8.0
    mult = np.where((np.arange(kx.size) == 0) | (np.arange(kx.size) == b // 2), 1.0, 2.0)[None, :]

    def project(rot: np.ndarray) -> np.ndarray:
        return np.fft.rfft2(project_atoms(atoms, rot, b, apix, 0.2)) * band

    true_rot = ri.in_plane(views[[4, 9]], np.array([22.0]))[:, 0]  # (2, 3, 3): views 4 and 9, turned by 22°
    ctf = ctf_2d(b, b, apix, np.array([15000.0, 20000.0]), np.array([15500.0, 20000.0]), np.array([10.0, 0.0]),
                 300.0, 2.7, 0.1)
    truth = project(true_rot) * ctf
    noisy = truth + np.fft.rfft2(0.002 * rng.standard_normal((2, b, b)))
    got = ri.best_templates(noisy, ctf, project, views, band, mult)
    for p in range(2):
        corr = (np.conj(got[p]) * truth[p]).real.sum() / np.sqrt((np.abs(got[p]) ** 2).sum() * (np.abs(truth[p]) ** 2).sum())
        assert corr > 0.999
    wrong = ri.best_templates(noisy, ctf, project, views[[0, 1, 2]], band, mult)
    assert (np.conj(wrong[0]) * truth[0]).real.sum() / np.sqrt((np.abs(wrong[0]) ** 2).sum() * (np.abs(truth[0]) ** 2).sum()) < 0.99
