from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from streamer.config import Config, processing_dict
from streamer.output.ledger import FingerprintMismatch, Ledger, LedgerError


def _open(path, cfg: Config) -> Ledger:
    return Ledger(path, cfg.fingerprint(), processing_dict(cfg))


def test_create_reopen_and_fingerprint_mismatch_lists_differences(tmp_path):
    path = tmp_path / "ledger.sqlite"
    cfg = Config(box=64)
    led = _open(path, cfg)
    assert led.get_meta("fingerprint") == cfg.fingerprint()
    assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert led.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    led.close()
    _open(path, cfg.with_(movies="other/*.tif", workers=3)).close()  # non-processing keys do not matter
    with pytest.raises(FingerprintMismatch) as err:
        _open(path, cfg.with_(box=96, float16=True))
    msg = str(err.value)
    assert msg.startswith(str(tmp_path))
    assert "box: 64 (folder) vs 96 (now)" in msg and "float16: False (folder) vs True (now)" in msg
    assert "new --out" in msg


def test_commit_movie_records_rows_ranges_stacks_in_order(tmp_path):
    led = _open(tmp_path / "l.sqlite", Config())
    stats = {"motion_total_A": np.float32(3.5), "warnings": ["x"], "shape": np.array([2, 3])}
    i1 = led.commit_movie("a.tif", 5, stats, [("s1", 0, 5)], {"s1": 5}, "rows-a\n", b"cs-a")
    i2 = led.commit_movie("b.tif", 7, {}, [("s1", 5, 3), ("s2", 0, 4)], {"s1": 8, "s2": 4}, "rows-b\n", b"cs-b")
    assert i2 > i1
    assert led.is_done("a.tif") and not led.is_done("c.tif")
    assert led.done_movies() == {"a.tif", "b.tif"}
    assert led.stacks() == {"s1": 8, "s2": 4}
    assert led.ranges("b.tif") == [("s1", 5, 3), ("s2", 0, 4)]
    rows = list(led.rows())
    assert [r.movie for r in rows] == ["a.tif", "b.tif"]
    assert rows[0].stats == {"motion_total_A": 3.5, "warnings": ["x"], "shape": [2, 3]}
    assert rows[1].star_rows == "rows-b\n" and rows[1].cs_rows == b"cs-b"
    assert [r.movie for r in led.rows(after_id=i1)] == ["b.tif"]
    assert led.particles_up_to(i1) == 5 and led.last_done_id() == i2
    with pytest.raises(LedgerError, match=r"a\.tif: already committed"):
        led.commit_movie("a.tif", 1, {}, [], {}, "", None)
    assert led.totals() == {"done": 2, "failed": 0, "skipped": 0, "particles": 12, "stacks": 2}


def test_commit_is_one_transaction(tmp_path):
    led = _open(tmp_path / "l.sqlite", Config())
    led.commit_movie("a.tif", 2, {}, [("s1", 0, 2)], {"s1": 2}, "", None)
    # a NULL stack name violates NOT NULL after the movie row was inserted: all of it must roll back
    with pytest.raises(sqlite3.IntegrityError):
        led.commit_movie("b.tif", 3, {}, [(None, 2, 3)], {"s1": 5}, "", None)
    assert not led.is_done("b.tif")
    assert led.stacks() == {"s1": 2}
    assert led.totals()["particles"] == 2
    led.close()
    led = _open(tmp_path / "l.sqlite", Config())  # and it is durable across reopen
    assert led.done_movies() == {"a.tif"}


def test_failed_skipped_and_retry_get_a_later_id(tmp_path):
    led = _open(tmp_path / "l.sqlite", Config())
    led.commit_movie("a.tif", 1, {}, [("s1", 0, 1)], {"s1": 1}, "ra\n", None)
    assert led.mark_failed("b.tif", "worker died 3 times")
    assert led.mark_skipped("c.tif", "no picks")
    assert not led.mark_failed("a.tif", "late failure")  # a done movie stays done
    assert led.failed() == [("b.tif", "worker died 3 times")]
    assert not led.is_done("c.tif") and not led.is_done("b.tif")  # skipped and failed: tried again by a rerun
    assert led.status("c.tif") == "skipped"
    last = led.last_done_id()
    new_id = led.commit_movie("b.tif", 2, {}, [("s1", 1, 2)], {"s1": 3}, "rb\n", None)
    assert new_id > last  # snapshots append by id: a retried movie must come after
    assert led.failed() == []
    assert led.totals() == {"done": 2, "failed": 0, "skipped": 1, "particles": 3, "stacks": 1}
    assert led.forget("b.tif") and not led.is_done("b.tif") and led.ranges("b.tif") == []


def test_readonly_open(tmp_path):
    path = tmp_path / "l.sqlite"
    with pytest.raises(LedgerError, match="no ledger here"):
        Ledger(path, readonly=True)
    led = _open(path, Config())
    led.commit_movie("a.tif", 4, {}, [("s1", 0, 4)], {"s1": 4}, "", None)
    ro = Ledger(path, readonly=True)
    assert ro.totals()["particles"] == 4
    with pytest.raises(sqlite3.OperationalError):
        ro.mark_failed("x.tif", "no")


def test_totals_read_an_index_not_every_movie_row(tmp_path):
    """``totals()`` runs after every write: it must read the covering index (a few bytes per movie),
    not every movie row with its STAR/.cs payload (time and sqlite's page cache grew with the session)."""
    path = tmp_path / "l.sqlite"
    led = _open(path, Config())
    for i in range(30):
        led.commit_movie(f"m{i}.tif", 3, {}, [("s1", 3 * i, 3)], {"s1": 3 * i + 3}, "row\n" * 3, b"x" * 3000)
    led.mark_failed("bad.tif", "broken")
    assert led.totals() == {"done": 30, "failed": 1, "skipped": 0, "particles": 90, "stacks": 1}
    for sql, args in (("SELECT status, COUNT(*) FROM movies GROUP BY status", ()),
                      ("SELECT COALESCE(SUM(n_particles), 0) FROM movies WHERE status = 'done'", ()),
                      ("SELECT COALESCE(MAX(id), 0) FROM movies WHERE status = 'done'", ())):
        plan = " ".join(str(r[-1]) for r in led.db.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "COVERING INDEX movies_status" in plan, (sql, plan)
    assert led.last_done_id() == 30
    led.close()
    ro = Ledger(path, readonly=True)  # readers (lmc status) get the same plan
    assert ro.totals()["done"] == 30
    plan = " ".join(str(r[-1]) for r in ro.db.execute("EXPLAIN QUERY PLAN SELECT status, COUNT(*) FROM movies GROUP BY status"))
    assert "COVERING INDEX movies_status" in plan
