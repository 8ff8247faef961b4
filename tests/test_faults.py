"""The faults a facility meets, with real `lmc` processes, real files and real (tmpfs) file systems.

Read-only and nearly full output disks (small tmpfs mounts: skipped with the reason where mounting is
not allowed), skipped movies retried by a rerun, pick files changed while lmc was down, long and odd
movie names, a corrupt movie in live mode, a box that cannot fit, --once with every movie failed, and
a crash whose recovery (cutting a stack back) is logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import starfile
from test_live import (
    check_output,
    ledger_state,
    movie_names,
    picks_for,
    populate,
    read_json,
    running,
    session_args,
    wait_for,
)

from streamer.output.ledger import Ledger
from streamer.sim.simulate import SimParams, simulate_session


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small simulated movies (256x256, 10 frames, 5 particles) + picks + gain, rendered once."""
    src = tmp_path_factory.mktemp("scope")
    simulate_session(src, SimParams(movies=3, frames=10, shape=(256, 256), particles=5, seed=3))
    return src


def run(args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    """``mount(name, size)`` -> a fresh tmpfs of ``size`` (e.g. "48m") under tmp_path; unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {res.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount_ro(point: Path) -> None:
    res = subprocess.run(["mount", "-o", "remount,ro", str(point)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot remount read-only: {res.stderr.strip()}")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "status.json"}


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_read_only_output_folder_gives_one_line_and_touches_nothing(tmp_path: Path, source: Path, tmpfs) -> None:
    populate(tmp_path, source, movie_names(source)[:2])
    disk = tmpfs("disk", "64m")
    out = disk / "out"
    small = ("--min-free-gb", "0")  # a 64 MB disk is below the default 2 GB pause threshold
    first = run(session_args("run", tmp_path, source, out, *small), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = digest(out)
    remount_ro(disk)
    again = run(session_args("run", tmp_path, source, out, *small), cwd=tmp_path)  # a restart on a read-only disk
    assert again.returncode == 2
    assert one_line(again.stderr) == (f"lmc: {out}: cannot write to the output folder (Read-only file system); "
                                      "choose a writable --out (nothing was written)")
    fresh = run(session_args("run", tmp_path, source, disk / "new", *small), cwd=tmp_path)  # a new folder there
    assert fresh.returncode == 2 and f"{disk / 'new'}: cannot" in one_line(fresh.stderr)
    assert digest(out) == before


def test_nearly_full_disk_pauses_dispatch_and_resumes_when_space_returns(tmp_path: Path, source: Path, tmpfs) -> None:
    names = movie_names(source)[:3]
    good = populate(tmp_path, source, names)
    disk = tmpfs("disk", "48m")
    out = disk / "out"
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    ballast.write_bytes(b"\0" * (free - 6_000_000))  # ~6 MB left, below the 20 MB threshold
    with running(session_args("run", tmp_path, source, out, "--min-free-gb", "0.02"), cwd=tmp_path) as proc:
        wait_for(lambda: read_json(out / "status.json").get("disk", {}).get("paused") is True, 40, proc)
        time.sleep(2.0)
        status = read_json(out / "status.json")
        assert ledger_state(out)[0] == set() and status["counts"].get("running", 0) == 0  # nothing dispatched
        assert any("dispatch paused until space returns" in w for w in status["warnings"])
        assert "dispatch paused" in (out / "logs" / "lmc.log").read_text()
        ballast.unlink()  # the operator frees space
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "dispatch resumed" in (out / "logs" / "lmc.log").read_text()
    check_output(out, good)


def test_skipped_movie_is_retried_by_a_rerun_once_its_picks_exist(tmp_path: Path, source: Path) -> None:
    names = movie_names(source)[:2]
    good = populate(tmp_path, source, names)
    late = tmp_path / "picks" / picks_for(source, names[1]).name
    hidden = tmp_path / "hidden.star"
    late.rename(hidden)  # its pick file is not there yet
    out = tmp_path / "out"
    first = run(session_args("run", tmp_path, source, out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "skipped: 1" in first.stdout
    hidden.rename(late)
    again = run(session_args("run", tmp_path, source, out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipped: 0" in again.stdout
    check_output(out, good)


def _drop_last_pick(path: Path) -> int:
    blocks = starfile.read(path, always_dict=True)
    key = next(k for k, v in blocks.items() if hasattr(v, "columns") and "rlnCoordinateX" in v.columns)
    blocks[key] = blocks[key].iloc[:-1]
    starfile.write(blocks, path, overwrite=True)
    return len(blocks[key])


def test_pick_file_changed_while_lmc_was_down_is_reported_and_redone_on_request(tmp_path: Path, source: Path) -> None:
    names = movie_names(source)[:2]
    good = populate(tmp_path, source, names)
    out = tmp_path / "out"
    assert run(session_args("run", tmp_path, source, out), cwd=tmp_path).returncode == 0
    movie = str(tmp_path / "movies" / names[0])
    led = Ledger(out / "ledger.sqlite", readonly=True)
    before = {r.movie: r.n_particles for r in led.rows(with_payload=False)}
    assert set(led.picks_used()) == good  # each movie's pick file is remembered
    led.close()
    left = _drop_last_pick(tmp_path / "picks" / picks_for(source, names[0]).name)  # re-picked while lmc was down
    assert left + 1 >= before[movie]
    plain = run(session_args("run", tmp_path, source, out), cwd=tmp_path)
    assert plain.returncode == 0
    assert f"{movie}: pick file" in plain.stderr and "changed since the movie was processed" in plain.stderr
    assert "not reprocessed" in plain.stderr
    redo = run(session_args("run", tmp_path, source, out, "--reprocess-changed-picks"), cwd=tmp_path)
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert "reprocessing" in redo.stderr
    # every particle once, STAR/.cs/ledger agree (the old images of the redone movie stay in its stack,
    # unreferenced: stacks are append-only)
    led = Ledger(out / "ledger.sqlite", readonly=True)
    after = {r.movie: r.n_particles for r in led.rows(with_payload=False)}
    stacks = led.stacks()
    led.close()
    assert set(after) == good and after[movie] <= left
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert len(star) == sum(after.values()) and not star["rlnImageName"].duplicated().any()
    assert star["rlnMicrographName"].value_counts().to_dict() == {m: n for m, n in after.items() if n}
    assert all(int(name.split("@")[0]) <= stacks[Path(name.split("@")[1]).name] for name in star["rlnImageName"])
    assert len(np.load(out / "particles.cs")) == len(star)
    quiet = run(session_args("run", tmp_path, source, out, "--reprocess-changed-picks"), cwd=tmp_path)
    assert "changed since" not in quiet.stderr  # the new pick file was recorded with the redo


def test_long_and_odd_movie_names_work_or_get_one_clear_line(tmp_path: Path, source: Path) -> None:
    src_movie = movie_names(source)[0]
    src_picks = picks_for(source, src_movie)
    (tmp_path / "movies").mkdir()
    (tmp_path / "picks").mkdir()
    stem = "FoilHole_7_Data_1"
    names = {
        "long": stem + "x" * (250 - len(stem) - len("_fractions.tiff")),  # a 250-character movie name
        "space": "FoilHole_8_Data_1 with space",
        "newline": "FoilHole_9_Data_1\nnewline",
    }
    for base in names.values():
        shutil.copyfile(source / "movies" / src_movie, tmp_path / "movies" / f"{base}_fractions.tiff")
        shutil.copyfile(src_picks, tmp_path / "picks" / f"{base}.star")
    assert len(names["long"] + "_fractions.tiff") == 250
    out = tmp_path / "out"
    res = run(session_args("run", tmp_path, source, out, "--plots"), cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]  # one movie failed, with one clear line
    bad = str(tmp_path / "movies" / f"{names['newline']}_fractions.tiff")
    failed = ledger_state(out)[1]
    assert list(failed) == [bad]
    assert "cannot be written to particles.star: contains a control character" in failed[bad]
    assert "rename the file" in failed[bad]
    ok = {str(tmp_path / "movies" / f"{names[k]}_fractions.tiff") for k in ("long", "space")}
    check_output(out, ok)
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert set(star["rlnMicrographName"]) == ok  # the space survives the round trip
    for sub, suffix in (("trajectories", ".star"), ("plots", ".png"), ("motion", ".star")):
        files = list((out / sub).glob("*" + suffix))
        assert len(files) == 2 and all(len(f.name.encode()) <= 255 - 14 for f in files), (sub, files)
    assert not list(out.rglob("*.tmp"))


def test_corrupt_movie_fails_at_once_in_live_mode(tmp_path: Path, source: Path) -> None:
    names = movie_names(source)[:1]
    good = populate(tmp_path, source, names)
    junk = tmp_path / "movies" / "FoilHole_5_Data_5_fractions.tiff"
    junk.write_bytes(os.urandom(20_000))
    shutil.copyfile(picks_for(source, names[0]), tmp_path / "picks" / "FoilHole_5_Data_5_fractions_autopick.star")
    out = tmp_path / "out"
    t0 = time.monotonic()
    with running(session_args("watch", tmp_path, source, out, "--headless"), cwd=tmp_path) as proc:  # incomplete_timeout 600 s
        wait_for(lambda: ledger_state(out)[0] == good and str(junk) in ledger_state(out)[1], 40, proc)
        assert time.monotonic() - t0 < 40
        reason = ledger_state(out)[1][str(junk)]
        assert "TIFF structure not readable" in reason and "not a valid movie" in reason
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_a_box_that_cannot_fit_is_refused_before_any_movie(tmp_path: Path, source: Path) -> None:
    populate(tmp_path, source, movie_names(source)[:2])
    huge = run(session_args("run", tmp_path, source, tmp_path / "a", "--box", "100000"), cwd=tmp_path)
    assert huge.returncode == 2 and "box must be at most 8192" in one_line(huge.stderr)
    big = run(session_args("run", tmp_path, source, tmp_path / "b", "--box", "512"), cwd=tmp_path)
    assert big.returncode == 3, big.stderr[-2000:]
    assert "box = 512 px does not fit" in big.stderr and "(256 x 256 px)" in big.stderr
    assert ledger_state(tmp_path / "b") == (set(), {})  # nothing processed, nothing marked failed


def test_once_exits_non_zero_when_every_movie_failed(tmp_path: Path, source: Path) -> None:
    (tmp_path / "movies").mkdir()
    (tmp_path / "picks").mkdir()
    for i in range(2):
        (tmp_path / "movies" / f"FoilHole_{i}_Data_1_fractions.tiff").write_bytes(os.urandom(5000))
    res = run(session_args("watch", tmp_path, source, tmp_path / "out", "--once", "--headless"), cwd=tmp_path)
    assert res.returncode == 1 and "failed: 2" in res.stdout


def test_recovery_after_a_crash_is_logged_and_leaves_no_temp_files(tmp_path: Path, source: Path) -> None:
    good = populate(tmp_path, source, movie_names(source)[:2])
    out = tmp_path / "out"
    env = dict(os.environ, LMC_CRASH_AT="stack_data:2")  # SIGKILL between a stack's data and its header
    crashed = run(session_args("run", tmp_path, source, out, "--plots"), cwd=tmp_path, env=env)
    assert crashed.returncode == -signal.SIGKILL
    again = run(session_args("run", tmp_path, source, out, "--plots"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    log = (out / "logs" / "lmc.log").read_text()
    assert "cutting back to the" in log and "committed images (interrupted write)" in log
    check_output(out, good)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".lmc-write-test*"))
    assert json.loads((out / "status.json").read_text())["phase"] == "finished"


def test_a_disk_that_fills_anyway_stops_the_session_with_one_line_and_loses_nothing(tmp_path: Path, source: Path,
                                                                                     tmpfs) -> None:
    names = movie_names(source)[:3]
    first = populate(tmp_path, source, names[:1])
    disk = tmpfs("disk", "48m")
    out = disk / "out"
    with running(session_args("watch", tmp_path, source, out, "--headless", "--min-free-gb", "0"), cwd=tmp_path) as proc:
        wait_for(lambda: ledger_state(out)[0] == first, 40, proc)
        with open(disk / "ballast", "wb") as f:  # the disk fills up (the pause threshold is off here)
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        populate(tmp_path, source, names)  # more movies arrive; their commit cannot be written
        _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 3, text[-2000:]
    assert "Traceback" not in text
    (last,) = [ln for ln in text.splitlines() if ln.startswith("aborted: ")]
    assert str(out) in last and ("No space left on device" in last or "disk is full" in last), last
    assert "everything committed is intact" in last or "earlier movies are intact" in last
    (disk / "ballast").unlink()
    again = run(session_args("run", tmp_path, source, out, "--min-free-gb", "0"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    check_output(out, {str(tmp_path / "movies" / n) for n in names})


def test_pick_files_with_other_columns_commit_with_the_folders_columns(tmp_path: Path, source: Path) -> None:
    """The first pick file the session reads fixes the folder's columns; a later one with an extra
    column (or a program's private one) or a missing one still commits: extras are not written,
    missing ones get the neutral value — the session decides, never a worker's result."""
    names = movie_names(source)[:3]
    good = populate(tmp_path, source, names[:1])
    out = tmp_path / "out"
    assert run(session_args("run", tmp_path, source, out), cwd=tmp_path).returncode == 0
    populate(tmp_path, source, names)
    for name, change in ((names[1], "extra"), (names[2], "missing")):
        path = tmp_path / "picks" / picks_for(source, name).name
        blocks = starfile.read(path, always_dict=True)
        key = next(k for k, v in blocks.items() if hasattr(v, "columns") and "rlnCoordinateX" in v.columns)
        table = blocks[key]
        if change == "extra":
            table["rlnClassNumber"] = 3
            table["myPrivateScore"] = 0.5
        else:
            table = table.drop(columns=["rlnDefocusAngle"])
        blocks[key] = table
        starfile.write(blocks, path, overwrite=True)
    res = run(session_args("run", tmp_path, source, out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rlnClassNumber" in res.stderr and "not carried" in res.stderr
    good |= {str(tmp_path / "movies" / n) for n in names}
    check_output(out, good)
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert "rlnClassNumber" not in star.columns and "myPrivateScore" not in star.columns
    missing = star[star["rlnMicrographName"] == str(tmp_path / "movies" / names[2])]
    assert len(missing) and (missing["rlnDefocusAngle"] == 0).all()
