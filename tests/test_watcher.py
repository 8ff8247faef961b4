"""Watcher: discovery (events + rescan), readiness (settle + whole), picks join, ordering. Real files."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from streamer.formats.picks import write_star_coords
from streamer.live.watcher import Watcher, ignored_name, match_parts, split_pattern


def tiff_bytes(frames: int = 6, shape: tuple[int, int] = (32, 32), seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 4, (frames, *shape), dtype=np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, compression="lzw")
    return buf.getvalue()


def write_movie(path: Path, mtime: float | None = None, partial: bool = False) -> Path:
    raw = tiff_bytes(seed=len(path.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw[: len(raw) // 2] if partial else raw)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def write_picks(folder: Path, stem: str, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{stem}_autopick.star"
    write_star_coords(p, np.arange(n) * 5.0 + 8, np.arange(n) * 3.0 + 8)
    return p


def make(tmp: Path, **kw) -> Watcher:
    with_picks = kw.pop("with_picks", True)
    defaults = dict(settle_seconds=2.0, incomplete_timeout=30.0, poll=1.0, poll_only=True, clock=lambda: 0.0)
    defaults.update(kw)
    return Watcher(str(tmp / "raw"), str(tmp / "picks") if with_picks else None, **defaults)


def state(w: Watcher, path: Path) -> str | None:
    return w.state_of(str(path))


def test_name_and_pattern_helpers() -> None:
    assert ignored_name(".a.tiff") and ignored_name("a.tiff.part") and ignored_name("a.tmp")
    assert ignored_name("a.tiff.downloading") and ignored_name("a.tiff.crdownload") and not ignored_name("a.tiff")
    root, pat = split_pattern("/data/raw/**/Data/*_fractions.tiff")
    assert root == Path("/data/raw") and pat == ["**", "Data", "*_fractions.tiff"]
    assert match_parts(("GridSquare_1", "Data", "x_fractions.tiff"), pat)
    assert match_parts(("Data", "x_fractions.tiff"), pat)
    assert not match_parts(("Data", "x_fractions.mrc"), pat)
    assert not match_parts(("x_fractions.tiff",), pat)


def test_settle_whole_then_wait_for_picks(tmp_path: Path) -> None:
    (tmp_path / "picks").mkdir()
    w = make(tmp_path)
    m = write_movie(tmp_path / "raw" / "mov_001.tiff")
    (tmp_path / "raw" / "notes.txt").write_text("not a movie")
    w.tick(0.0)
    assert list(w.entries) == [str(m)] and state(w, m) == "settling"
    w.tick(1.0)
    assert state(w, m) == "settling"  # not stable for settle_seconds yet
    w.tick(2.5)
    assert state(w, m) == "waiting_picks"
    assert w.waiting(now=2.5)[0]["state"] == "waiting_picks"
    assert not w.ready()
    picks = write_picks(tmp_path / "picks", "mov_001")
    w.tick(2.9)
    assert state(w, m) == "waiting_picks"  # pick folder rescanned on the poll
    w.tick(3.6)
    assert state(w, m) == "queued"
    (e,) = w.ready()
    assert e.path == str(m) and e.picks.path == str(picks) and e.ready_at == 3.6
    assert w.counts()["queued"] == 1 and w.pending() == 1


def test_growing_file_restarts_the_settle_clock(tmp_path: Path) -> None:
    w = make(tmp_path, with_picks=False)
    raw = tiff_bytes()
    m = tmp_path / "raw" / "grow.tiff"
    m.parent.mkdir(parents=True)
    m.write_bytes(raw[:100])
    w.tick(0.0)
    for t, upto in ((1.5, 1000), (3.0, 2000), (4.5, len(raw))):
        with open(m, "ab") as f:
            f.write(raw[os.path.getsize(m) : upto])
        w.tick(t)
        assert state(w, m) == "settling"
    w.tick(6.0)
    assert state(w, m) == "settling"  # changed at 4.5, stable only 1.5 s
    w.tick(6.6)
    assert state(w, m) == "queued" and w.ready()[0].picks is None


def test_truncated_movie_waits_for_the_timeout_corrupt_one_fails_at_once_both_resume_if_changed(tmp_path: Path) -> None:
    w = make(tmp_path, with_picks=False, incomplete_timeout=10.0)
    m = write_movie(tmp_path / "raw" / "trunc.tiff", partial=True)
    junk = tmp_path / "raw" / "junk.tiff"
    junk.write_bytes(os.urandom(3000))
    notices = w.tick(0.0) + w.tick(3.0)
    assert state(w, m) == "incomplete" and state(w, junk) == "incomplete"
    # the junk's size settled and its structure is invalid: reported at once, with the reader's reason
    (bad,) = notices
    assert bad.path == str(junk) and "TIFF structure not readable" in bad.message and "corrupt" in bad.message
    assert w.entries[str(m)].reason.startswith(str(m))
    notices = w.tick(9.0)
    assert not notices  # the truncated one may still be completed: waited for up to the timeout
    notices = w.tick(11.0)
    assert [n.path for n in notices if n.kind == "incomplete"] == [str(m)]
    assert "truncated" in notices[0].message and "still incomplete after 11 s" in notices[0].message
    assert all("not processed" in n.message and n.message.startswith(n.path) for n in [*notices, bad])
    assert not [n for n in w.tick(20.0) if n.kind == "incomplete"]  # once
    assert not w.ready()
    write_movie(m)  # the transfer finished after all
    w.tick(21.0)
    w.tick(23.5)
    assert state(w, m) == "queued" and state(w, junk) == "incomplete"


def test_temporary_names_are_ignored_until_renamed(tmp_path: Path) -> None:
    w = make(tmp_path, with_picks=False)
    raw = tmp_path / "raw"
    for name in ("a.tiff.part", ".b.tiff", "c.tmp", "d.tiff.downloading"):
        write_movie(raw / name)
    write_movie(raw / ".hidden" / "e.tiff")
    w.tick(0.0)
    assert not w.entries
    os.rename(raw / "a.tiff.part", raw / "a.tiff")
    w.tick(1.0)
    assert list(w.entries) == [str(raw / "a.tiff")]


def test_vanished_file_is_forgotten(tmp_path: Path) -> None:
    w = make(tmp_path, with_picks=False)
    m = write_movie(tmp_path / "raw" / "x.tiff")
    w.tick(0.0)
    m.unlink()
    w.tick(1.0)
    assert not w.entries


def test_order_oldest_first_or_newest_first(tmp_path: Path) -> None:
    now = time.time()
    paths = [write_movie(tmp_path / "raw" / f"m{i}.tiff", mtime=now - 100 + 10 * k) for i, k in ((1, 2), (2, 0), (3, 1))]
    for newest, expected in ((False, ["m2", "m3", "m1"]), (True, ["m1", "m3", "m2"])):
        w = make(tmp_path, with_picks=False, newest_first=newest)
        w.tick(0.0)
        w.tick(2.5)
        assert [Path(e.path).stem for e in w.ready()] == expected
        assert [Path(e.path).stem for e in w.ready(2)] == expected[:2]
        w.mark(str(paths[1]), "running")
        assert [Path(e.path).stem for e in w.ready()] == [s for s in expected if s != "m2"]


def test_picks_timeout_skips_the_movie(tmp_path: Path) -> None:
    (tmp_path / "picks").mkdir()
    w = make(tmp_path, picks_timeout=5.0)
    m = write_movie(tmp_path / "raw" / "lonely.tiff")
    w.tick(0.0)
    w.tick(2.0)
    assert state(w, m) == "waiting_picks"
    assert not w.tick(6.5)
    notices = w.tick(7.1)
    assert [n.kind for n in notices] == ["skipped"] and state(w, m) == "skipped"
    assert w.pending() == 0


def test_pick_file_rewritten_after_done_is_reported_or_reprocessed(tmp_path: Path) -> None:
    for reprocess in (False, True):
        base = tmp_path / str(reprocess)
        write_picks(base / "picks", "m")
        w = make(base, reprocess_changed_picks=reprocess)
        m = write_movie(base / "raw" / "m.tiff")
        w.tick(0.0)
        w.tick(2.5)
        assert state(w, m) == "queued"
        w.mark(str(m), "running")
        w.mark(str(m), "done")
        assert not w.tick(3.5)  # nothing changed
        write_picks(base / "picks", "m", n=7)
        notices = w.tick(4.6)
        assert [n.kind for n in notices] == ["picks_changed"]
        if reprocess:
            assert "reprocessing" in notices[0].message
            w.tick(5.0)
            assert state(w, m) == "queued"
        else:
            assert "not reprocessed" in notices[0].message and state(w, m) == "done"
            assert not w.tick(5.7)  # reported once


def test_done_movies_from_the_ledger_stay_done(tmp_path: Path) -> None:
    write_picks(tmp_path / "picks", "old")
    old = write_movie(tmp_path / "raw" / "old.tiff")
    new = write_movie(tmp_path / "raw" / "new.tiff")
    write_picks(tmp_path / "picks", "new")
    w = make(tmp_path, done=[str(old)])
    assert not w.tick(0.0)
    w.tick(2.5)
    assert state(w, old) == "done" and state(w, new) == "queued"
    assert [e.path for e in w.ready()] == [str(new)]


def test_once_mode_decides_at_once(tmp_path: Path) -> None:
    past = time.time() - 60
    write_picks(tmp_path / "picks", "good")
    good = write_movie(tmp_path / "raw" / "good.tiff", mtime=past)
    nopicks = write_movie(tmp_path / "raw" / "nopicks.tiff", mtime=past)
    trunc = write_movie(tmp_path / "raw" / "trunc.tiff", mtime=past, partial=True)
    w = make(tmp_path, once=True, settle_seconds=5.0)
    notices = w.tick(0.0)
    assert state(w, good) == "queued" and state(w, nopicks) == "skipped" and state(w, trunc) == "incomplete"
    assert sorted(n.kind for n in notices) == ["incomplete", "skipped"]
    w.mark(str(good), "done")
    assert w.pending() == 0


def test_events_find_new_files_between_rescans(tmp_path: Path) -> None:
    found = {}
    for poll_only in (False, True):
        raw = tmp_path / str(poll_only) / "raw"
        raw.mkdir(parents=True)
        w = Watcher(str(raw), None, settle_seconds=0.2, poll=3600.0, poll_only=poll_only)
        w.start()
        try:
            w.tick()
            write_movie(raw / "new.tiff")
            t0 = time.monotonic()
            while time.monotonic() - t0 < (1.0 if poll_only else 3.0) and not w.ready():
                w.tick()
                time.sleep(0.05)
            found[poll_only] = [e.path for e in w.ready()]
        finally:
            w.stop()
    assert found[False] == [str(tmp_path / "False" / "raw" / "new.tiff")]
    assert found[True] == []  # without events, only the (hourly here) rescan would see it


def test_rescan_alone_finds_files(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    w = Watcher(str(tmp_path / "raw"), None, settle_seconds=0.1, poll=0.2, poll_only=True)
    w.start()
    w.tick()
    m = write_movie(tmp_path / "raw" / "nfs.tiff")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0 and not w.ready():
        w.tick()
        time.sleep(0.05)
    assert [e.path for e in w.ready()] == [str(m)] and w.scans >= 2


def test_glob_pattern_selects_files(tmp_path: Path) -> None:
    a = write_movie(tmp_path / "raw" / "GS1" / "Data" / "a_fractions.tiff")
    write_movie(tmp_path / "raw" / "GS1" / "Data" / "a.tiff")
    write_movie(tmp_path / "raw" / "GS1" / "Other" / "b_fractions.tiff")
    w = Watcher(str(tmp_path / "raw" / "**" / "Data" / "*_fractions.tiff"), None, settle_seconds=0, poll_only=True)
    w.tick(0.0)
    assert list(w.entries) == [str(a)]


@pytest.mark.parametrize("bad", ["running", "bogus"])
def test_mark_validates_states(tmp_path: Path, bad: str) -> None:
    w = make(tmp_path, with_picks=False)
    if bad == "bogus":
        with pytest.raises(ValueError, match="unknown state"):
            w.mark("x", bad)
    else:
        w.mark(str(tmp_path / "x.tiff"), bad, now=1.0)
        assert w.counts()["running"] == 1


def test_finished_movies_keep_no_entry_however_many_pass(tmp_path: Path) -> None:
    """Per-movie state stays bounded in a live session: a movie leaves ``entries`` when it is done,
    failed or skipped (only its path is kept, the dedup record), so 45 movies arriving one by one leave
    0 entries behind; rescans still never queue them again, counts still see them, and a restart
    seeded with the done paths (as from the ledger) queues none of them."""
    (tmp_path / "picks").mkdir()
    w = make(tmp_path, settle_seconds=0.0, picks_timeout=0.5)
    done, t = [], 0.0
    for i in range(45):
        m = write_movie(tmp_path / "raw" / f"m{i:03d}.tiff")
        if i % 15 != 14:  # every 15th movie never gets picks: skipped
            write_picks(tmp_path / "picks", f"m{i:03d}")
        for _ in range(3):
            t += 1.1  # past the poll: rescan + picks refresh
            w.tick(t)
        if i % 15 == 14:
            assert w.state_of(str(m)) == "skipped"
        else:
            (e,) = w.ready()
            w.mark(e.path, "running", now=t)
            w.mark(e.path, "failed" if i % 15 == 7 else "done", now=t)
            done += [e.path] if i % 15 != 7 else []
        assert len(w.entries) == 0 and not w._active  # nothing unfinished is held for a finished movie
    assert w.retained() == {"entries": 0, "finished": 45}
    for _ in range(3):
        t += 1.1
        assert not w.tick(t) and not w.ready()  # rescans find every file and queue none again
    counts = w.counts()
    assert (counts["done"], counts["failed"], counts["skipped"]) == (39, 3, 3) and w.pending() == 0
    restarted = make(tmp_path, settle_seconds=0.0, done=done)
    restarted.tick(0.0)
    restarted.tick(1.1)
    # only the failed movies are redone; the skipped ones wait for picks again; no done one comes back
    assert sorted(e.path for e in restarted.ready()) == [str(tmp_path / "raw" / f"m{i:03d}.tiff") for i in (7, 22, 37)]
    assert restarted.counts()["done"] == 39 and restarted.counts()["waiting_picks"] == 3 and len(restarted.entries) == 6


def test_picks_arriving_after_a_skip_are_reported_or_reprocessed(tmp_path: Path) -> None:
    for reprocess in (False, True):
        base = tmp_path / str(reprocess)
        (base / "picks").mkdir(parents=True)
        w = make(base, picks_timeout=1.0, reprocess_changed_picks=reprocess)
        m = write_movie(base / "raw" / "late.tiff")
        w.tick(0.0)
        w.tick(2.5)
        assert [n.kind for n in w.tick(3.6)] == ["skipped"] and state(w, m) == "skipped" and not w.entries
        write_picks(base / "picks", "late")
        notices = w.tick(4.7)
        assert [n.kind for n in notices] == ["picks_arrived"] and notices[0].path == str(m)
        if reprocess:
            assert "reprocessing" in notices[0].message and state(w, m) == "queued"
            assert w.ready()[0].picks.path == str(base / "picks" / "late_autopick.star")
            assert w.counts()["skipped"] == 0 and w.counts()["queued"] == 1
        else:
            assert "not reprocessed" in notices[0].message and state(w, m) == "skipped" and not w.entries
