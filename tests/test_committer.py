from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from cryosparc.dataset import Dataset

from streamer.config import Config
from streamer.formats.picks import movie_stem
from streamer.output.committer import Committer, FingerprintMismatch, OutputLocked
from streamer.types import MovieResult

BOX = 8
CFG = Config(box=16, fcrop_box=BOX, stack_size=10, apix=1.0, dose_per_frame=1.0)


def movie_name(i: int) -> str:
    return f"raw/session 1/mov_{i:03d}.tif"


def make_result(i: int, n: int = 7) -> MovieResult:
    """Deterministic fake result of movie i (the parent regenerates the child's data from i)."""
    rng = np.random.default_rng(1000 + i)
    particles = (rng.standard_normal((n, BOX, BOX)) + i).astype(np.float32)
    x, y = rng.uniform(0, 5760, n), rng.uniform(0, 4092, n)
    cols = {"rlnDefocusU": rng.uniform(1e4, 2e4, n), "rlnDefocusV": rng.uniform(1e4, 2e4, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n)}
    return MovieResult(movie_name(i), particles, x, y, cols, [], np.zeros((4, 2)), np.zeros((n, 4, 2)),
                       np.zeros((n, 4, 2)), (4092, 5760), 1.0, {"n_particles": n, "motion_total_A": 1.5 * i})


def check_folder(out: Path, expected: dict[int, int], cfg: Config = CFG) -> None:
    """Every particle of the expected movies ({i: n}) exactly once, pixels equal, STAR <-> stacks <-> .cs."""
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    cs = Dataset.load(out / "particles.cs")
    assert len(star) == len(cs) == sum(expected.values())
    assert len(set(star["rlnImageName"])) == len(star)  # no image referenced twice
    stacks = {}
    for p in sorted((out / "stacks").glob("*.mrcs")):
        assert mrcfile.validate(str(p), print_file=io.StringIO()), p
        with mrcfile.open(p, permissive=False) as m:
            stacks[f"stacks/{p.name}"] = np.array(m.data).reshape(-1, BOX, BOX)  # mrcfile gives 2D for nz = 1
            assert m.voxel_size.x == pytest.approx(cfg.out_apix)
    assert sum(len(s) for s in stacks.values()) == len(star)  # no orphan images after recovery
    row = 0
    for i, n in expected.items():
        r = make_result(i, n)
        part = star.iloc[row : row + n]
        assert set(part["rlnMicrographName"]) == {r.movie}
        np.testing.assert_allclose(part["rlnCoordinateX"], r.x)
        np.testing.assert_allclose(part["rlnDefocusU"], r.columns["rlnDefocusU"])
        want = r.particles.astype(np.float16) if cfg.float16 else r.particles
        for k, name in enumerate(part["rlnImageName"]):
            idx, stack_abs = name.split("@")
            # STAR: absolute paths (RELION resolves relative ones against its project directory);
            # .cs: relative to the output folder (cryoSPARC's import takes the folder separately)
            assert Path(stack_abs).is_absolute() and Path(stack_abs).parent == (out / "stacks").resolve()
            stack = f"stacks/{Path(stack_abs).name}"
            np.testing.assert_array_equal(stacks[stack][int(idx) - 1], want[k])
            assert cs["blob/path"][row + k] == stack and cs["blob/idx"][row + k] == int(idx) - 1
            assert cs["location/micrograph_path"][row + k] == r.movie
        np.testing.assert_allclose(cs["location/center_x_frac"][row : row + n], r.x / 5760, rtol=1e-6)
        row += n
    assert len(set(cs["uid"])) == len(cs)


def test_commit_spans_stacks_and_all_outputs_agree(tmp_path):
    out = tmp_path / "out"
    with Committer(out, CFG) as c:
        for i in range(4):
            c.commit(make_result(i))
        assert c.totals() == {"done": 4, "failed": 0, "skipped": 0, "particles": 28, "stacks": 3}
        assert c.is_done(movie_name(2)) and c.done_movies() == {movie_name(i) for i in range(4)}
    assert sorted(p.name for p in (out / "stacks").iterdir()) == [f"particles_0000{k}.mrcs" for k in (1, 2, 3)]
    assert all((out / d).is_dir() for d in ("trajectories", "plots", "logs"))
    check_folder(out, {i: 7 for i in range(4)})
    with mrcfile.open(out / "stacks" / "particles_00001.mrcs") as m:
        assert m.data.shape == (10, BOX, BOX)


def test_float16_idempotence_failures_and_reopen(tmp_path):
    cfg = CFG.with_(float16=True)
    out = tmp_path / "out"
    with Committer(out, cfg) as c:
        c.commit(make_result(0))
        c.commit(make_result(0))  # duplicate result: ignored
        c.mark_failed(movie_name(1), "worker died")
        c.mark_skipped(movie_name(2), "no picks")
        c.mark_failed(movie_name(0), "late")  # done stays done
        assert c.failed() == [(movie_name(1), "worker died")]
    with Committer(out, cfg) as c:
        assert c.done_movies() == {movie_name(0)}  # failed and skipped ones are tried again
        c.commit(make_result(1, 12))  # the retry of a failed movie
        c.commit(make_result(2))  # and of a skipped one (its picks came since)
        assert c.totals() == {"done": 3, "failed": 0, "skipped": 0, "particles": 26, "stacks": 3}
    check_folder(out, {0: 7, 1: 12, 2: 7}, cfg)
    with mrcfile.open(out / "stacks" / "particles_00001.mrcs") as m:
        assert m.header.mode == 12
    with pytest.raises(FingerprintMismatch, match=r"float16: True \(folder\) vs False \(now\)"):
        Committer(out, CFG)


def test_single_writer_lock_and_new_folder_guard(tmp_path):
    out = tmp_path / "out"
    c = Committer(out, CFG)
    with pytest.raises(OutputLocked, match="another lmc process"):
        Committer(out, CFG)
    c.close()
    with pytest.raises(FileExistsError, match="already an lmc output folder"):
        Committer(out, CFG, new=True)
    Committer(out, CFG).close()  # released on close


def test_bad_result_is_rejected_before_writing(tmp_path):
    out = tmp_path / "out"
    with Committer(out, CFG) as c:
        r = make_result(0)
        r.particles = r.particles[:, :4, :4]
        with pytest.raises(ValueError, match=r"mov_000.tif: particles have shape \(7, 4, 4\), expected \(n, 8, 8\)"):
            c.commit(r)
        assert not c.is_done(movie_name(0)) and list((out / "stacks").iterdir()) == []


def test_snapshots_are_throttled_forced_on_close_and_rebuilt_when_stale(tmp_path):
    out = tmp_path / "out"
    c = Committer(out, CFG, snapshot_interval=3600)
    c.commit(make_result(0))  # the first snapshot is due at once
    c.commit(make_result(1))
    c.commit(make_result(2, 3))
    assert len(starfile.read(out / "particles.star", always_dict=True)["particles"]) == 7  # throttled
    c.close()
    check_folder(out, {0: 7, 1: 7, 2: 3})
    (out / "particles.star").unlink()
    with open(out / "particles.cs", "r+b") as f:  # a damaged .cs (cut short)
        f.truncate(300)
    Committer(out, CFG).close()
    check_folder(out, {0: 7, 1: 7, 2: 3})


def test_empty_movie_and_column_mismatch(tmp_path, caplog):
    out = tmp_path / "out"
    with Committer(out, CFG, snapshot_interval=0) as c:
        c.commit(make_result(0, 0))  # no particles: done, but no columns decided and no snapshot yet
        assert c.is_done(movie_name(0)) and not (out / "particles.star").exists()
        c.commit(make_result(1))
        r = make_result(2, 3)
        r.columns["rlnCtfFigureOfMerit"] = np.ones(3)  # a column the folder does not carry: refused
        with pytest.raises(ValueError, match="rlnCtfFigureOfMerit is not one of this output folder's columns"):
            c.commit(r)
        assert not c.is_done(movie_name(2))
        del r.columns["rlnCtfFigureOfMerit"], r.columns["rlnDefocusAngle"]  # its picks lack one: neutral value
        with caplog.at_level("INFO"):
            c.commit(r)
        assert c.totals()["particles"] == 10
    assert "lack column(s) rlnDefocusAngle" in caplog.text
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert list(star["rlnDefocusAngle"][7:]) == [0, 0, 0] and "rlnCtfFigureOfMerit" not in star.columns
    cs = Dataset.load(out / "particles.cs")
    np.testing.assert_allclose(cs["ctf/df_angle_rad"][:7], np.deg2rad(make_result(1).columns["rlnDefocusAngle"]),
                               rtol=1e-6)
    assert list(cs["ctf/df_angle_rad"][7:]) == [0, 0, 0]


def test_background_writer_catches_up_while_open(tmp_path):
    out = tmp_path / "out"
    with Committer(out, CFG, snapshot_interval=0.05) as c:
        for i in range(5):
            c.commit(make_result(i, 4))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(starfile.read(out / "particles.star", always_dict=True)["particles"]) == 20 and len(
                Dataset.load(out / "particles.cs")
            ) == 20:
                break
            time.sleep(0.05)
        check_folder(out, {i: 4 for i in range(5)})  # caught up without a forced write


def test_column_widening_and_forget(tmp_path):
    out = tmp_path / "out"
    with Committer(out, CFG, snapshot_interval=0) as c:
        c.commit(make_result(0))
        r = make_result(1, 3)
        r.movie = "raw/" + "deep/" * 40 + "mov.tif"  # longer than the .cs string field
        c.commit(r)
        cs = Dataset.load(out / "particles.cs")
        assert cs["location/micrograph_path"][-1] == r.movie and cs["location/micrograph_path"][0] == movie_name(0)
        c.commit(make_result(2))
        c.forget(movie_name(0))
        assert not c.is_done(movie_name(0))
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert movie_name(0) not in set(star["rlnMicrographName"]) and len(star) == 10
    assert len(Dataset.load(out / "particles.cs")) == 10


CHILD = textwrap.dedent(
    """
    import os, sys, signal, resource, time
    sys.path.insert(0, {tests!r})
    from test_committer import CFG, make_result
    from streamer.output.committer import Committer, CommitError
    out, mode, spec, interval = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    cfg = CFG.with_(stack_size=int(spec)) if mode == "diskfull" else CFG
    c = Committer(out, cfg, snapshot_interval=interval)
    c.commit(make_result(0))
    c.commit(make_result(1))
    c.snapshot(force=True)
    if mode == "crash":
        os.environ["LMC_CRASH_AT"] = spec
        c.commit(make_result(2))
        time.sleep(5 * (interval > 0))  # let the background writer reach the crash point
        c.close()
        print("NO CRASH")
    else:  # "disk full": files cannot grow past the largest stack (EFBIG); the stack or the ledger fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        big = max(os.path.getsize(p) for p in [os.path.join(out, "stacks", f) for f in os.listdir(out + "/stacks")])
        resource.setrlimit(resource.RLIMIT_FSIZE, (big + 300, hard))
        try:
            c.commit(make_result(2, 40))
        except CommitError as exc:
            print("ERROR:", exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        print("DONE2", c.is_done(make_result(2).movie))
        c.close()
    """
)


def _run_child(tmp_path: Path, mode: str, spec: str = "", interval: float = 0) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    env = {k: v for k, v in os.environ.items() if k != "LMC_CRASH_AT"}
    return subprocess.run([sys.executable, str(script), str(tmp_path / "out"), mode, spec, str(interval)],
                          capture_output=True,
                          text=True, env=env, timeout=60)


def _check_visible_state(out: Path) -> None:
    """What a reader sees right after the crash: each snapshot (the two are replaced one after the
    other, so one may be a movie ahead) points only at intact pixels of committed movies."""
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    cs = Dataset.load(out / "particles.cs")
    for mics, refs in [
        (list(star["rlnMicrographName"]), [(s, int(i) - 1) for i, s in (n.split("@") for n in star["rlnImageName"])]),
        (list(cs["location/micrograph_path"]), list(zip(cs["blob/path"], cs["blob/idx"], strict=True))),
    ]:
        k = 0
        for mic in dict.fromkeys(mics):
            r = make_result(int(mic[-7:-4]))
            for particle in r.particles:
                stack, idx = refs[k]
                raw = np.fromfile(out / stack, "<f4", count=BOX * BOX, offset=1024 + int(idx) * BOX * BOX * 4)
                np.testing.assert_array_equal(raw.reshape(BOX, BOX), particle)
                k += 1
        assert k == len(refs) >= 14


# movie 2 (7 particles) goes 6 into particles_00002 and 1 into a new particles_00003; snapshot
# steps are run both in the committing thread (interval 0) and in the background writer
CRASH_POINTS = [
    ("start", False, 0), ("stack_data:1", False, 0), ("stack_header:1", False, 0), ("stack_data:2", False, 0),
    ("stack_header:2", False, 0), ("before_ledger", False, 0), ("after_ledger", True, 0),
    ("snapshot_star_tmp", True, 0), ("snapshot_star_replaced", True, 0), ("snapshot_cs_tmp", True, 0),
    ("snapshot_cs_replaced", True, 0), ("snapshot_star_tmp", True, 0.01), ("snapshot_cs_replaced", True, 0.01),
]


@pytest.mark.parametrize("spec,committed,interval", CRASH_POINTS)
def test_sigkill_at_each_step_then_reopen_and_redo_appends_exactly_once(tmp_path, spec, committed, interval):
    proc = _run_child(tmp_path, "crash", spec, interval)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    out = tmp_path / "out"
    _check_visible_state(out)
    with Committer(out, CFG) as c:  # recovery
        assert c.is_done(movie_name(2)) is committed
        assert c.totals()["particles"] == 14 + 7 * committed
    check_folder(out, {0: 7, 1: 7, 2: 7} if committed else {0: 7, 1: 7})
    with Committer(out, CFG) as c:  # the redo of the in-flight movie, then life goes on
        c.commit(make_result(2))
        c.commit(make_result(3))
    check_folder(out, {0: 7, 1: 7, 2: 7, 3: 7})


@pytest.mark.parametrize("stack_size,culprit", [(1000, "stacks/particles_00001.mrcs"), (10, "ledger.sqlite")])
def test_disk_full_gives_a_clear_error_and_keeps_committed_outputs(tmp_path, stack_size, culprit):
    proc = _run_child(tmp_path, "diskfull", str(stack_size))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    cfg = CFG.with_(stack_size=stack_size)
    assert "DONE2 False" in proc.stdout
    msg = next(line for line in proc.stdout.splitlines() if line.startswith("ERROR:"))
    assert msg.startswith(f"ERROR: {out}/{culprit}: could not write the particles of raw/session 1/mov_002.tif")
    assert "Nothing of this movie" in msg
    check_folder(out, {0: 7, 1: 7}, cfg)  # the failed write was undone in place
    with Committer(out, cfg) as c:
        c.commit(make_result(2, 40))
    check_folder(out, {0: 7, 1: 7, 2: 40}, cfg)


def test_no_per_movie_state_in_memory_and_done_checks_still_hold(tmp_path):
    """The committer answers "done?" from the ledger (indexed), not from a set growing with the session:
    no container it holds grows from 20 to 41 movies (one stack file throughout), and a
    movie done still cannot be committed twice, in this run or after reopening (a skipped one can:
    its cause may have gone away)."""
    out = tmp_path / "out"
    cfg = CFG.with_(stack_size=1000)
    def sized(c: Committer) -> dict[str, int]:
        return {k: len(v) for k, v in vars(c).items() if isinstance(v, (dict, set, list))}

    with Committer(out, cfg) as c:
        for i in range(40):
            c.commit(make_result(i, n=2))
            if i == 19:
                half = sized(c)
        c.mark_skipped(movie_name(40), "no picks")
        assert sized(c) == half, (half, sized(c))  # nothing grew from 20 to 41 movies
        c.commit(make_result(3, n=2))  # a second result for a done movie is ignored
        c.commit(make_result(40, n=2))  # a skipped movie whose picks came since is committed
        c.commit(make_result(40, n=2))  # once
        c.mark_failed(movie_name(5), "late failure")  # a done movie stays done
        assert c.totals() == {"done": 41, "failed": 0, "skipped": 0, "particles": 82, "stacks": 1}
    with Committer(out, cfg) as c:
        assert c.is_done(movie_name(39)) and c.is_done(movie_name(40)) and not c.is_done(movie_name(41))
        c.commit(make_result(0, n=2))
        assert c.totals()["particles"] == 82 and len(c.done_movies()) == 41
    check_folder(out, {i: 2 for i in range(41)}, cfg)


def test_writer_writes_side_files_cleans_their_temps_and_refuses_unwritable_names(tmp_path, caplog):
    out = tmp_path / "out"
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    cfg = CFG.with_(plots=True)
    with Committer(out, cfg) as c:
        r = make_result(0)
        r.plot_png = png
        c.commit(r)
        bad = make_result(1)
        bad.movie = "raw/evil\nname.tif"  # would split its particles.star row
        with pytest.raises(ValueError, match=r"movie name .*control character"):
            c.commit(bad)
    stem = movie_stem(movie_name(0))
    assert (out / "plots" / f"{stem}.png").read_bytes() == png  # the worker's PNG, written by the writer
    assert (out / "trajectories" / f"{stem}.star").exists()
    (out / "plots" / f".{stem}.png.0123abcd.tmp").write_bytes(b"")  # a writer killed mid-replace
    with caplog.at_level("INFO"), Committer(out, cfg):
        pass
    assert not list((out / "plots").glob(".*.tmp")) and "temp file left by an interrupted write" in caplog.text


def test_a_folder_of_an_earlier_lmc_version_continues(tmp_path, caplog):
    """A folder whose record lacks a parameter this lmc has (made before it existed) and holds one it
    no longer has: it reopens, keeps its .cs import signature, reports both, and still refuses a real
    change of a parameter both know."""
    import hashlib
    import json
    import sqlite3

    from streamer.config import processing_dict

    out = tmp_path / "out"
    with Committer(out, CFG) as c:
        c.commit(make_result(0))
    # rewrite the record as an earlier version would have written it
    old = processing_dict(CFG)
    del old["uncertainty_weighting"]
    old["local"]["retired_knob"] = 3
    old_fp = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    db = sqlite3.connect(out / "ledger.sqlite")
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'processing'", (json.dumps(old, sort_keys=True),))
        db.execute("UPDATE meta SET value = ? WHERE key = 'fingerprint'", (old_fp,))
    db.close()
    with pytest.raises(FingerprintMismatch, match=r"box: 16 \(folder\) vs 24 \(now\)") as err:
        Committer(out, CFG.with_(box=24))  # a parameter both know differs: refused, as before
    assert "uncertainty_weighting" not in str(err.value)
    with caplog.at_level("WARNING", logger="lmc.committer"), Committer(out, CFG) as c:
        assert c.ledger.adopted == {"added": {"uncertainty_weighting": CFG.uncertainty_weighting},
                                    "dropped": {"local.retired_knob": 3}}
        assert c.ledger.get_meta("fingerprint") == CFG.fingerprint()
        assert c.ledger.get_meta("fingerprint_created") == old_fp
        assert [v["added"] for v in json.loads(c.ledger.get_meta("versions"))] == [{"uncertainty_weighting": True}]
        c.commit(make_result(1))
    text = caplog.text
    assert "new parameters of this lmc version" in text and "uncertainty_weighting=True" in text
    assert "no longer has: local.retired_knob=3" in text
    check_folder(out, {0: 7, 1: 7})
    # the folder's particles keep the import signature of its first fingerprint (the earlier version's;
    # movie 0 was written here under this version's, before the record was rewritten)
    sigs = Dataset.load(out / "particles.cs")["blob/import_sig"]
    assert set(sigs[7:].tolist()) == {int(old_fp, 16)}
    with Committer(out, CFG) as c:  # the record is this version's now: nothing more to adopt
        assert c.ledger.adopted == {} and c.done_movies() == {movie_name(0), movie_name(1)}
