"""The live console: rendered from a recorded snapshot at 80×24 and 160×48, key controls, sparklines,
derived values, and ``lmc watch`` under a real pseudo-terminal."""

from __future__ import annotations

import copy
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from streamer.ui.console import (
    Controls,
    LiveConsole,
    TrendHistory,
    enrich_snapshot,
    fmt_duration,
    grade,
    grade_gain,
    render,
)
from streamer.ui.sparkline import BLOCKS, resample, sparkline

# A snapshot as the session writes it to OUT/status.json (streamer.live.session.Session.snapshot), recorded
# mid-session on a two-GPU node and trimmed to 12 recent movies.
RECORDED = json.loads(r"""
{
  "version": 1, "time": 1715943725.4, "phase": "running",
  "session": {"movies": "/data/krios/2024-05-17/raw/*.tiff", "picks": "/data/krios/2024-05-17/picks",
              "out": "/data/krios/2024-05-17/lmc", "started": 1715940000.0, "uptime_s": 3725.4,
              "endpoint": "tcp://127.0.0.1:40411", "pid": 81234, "host": "em-gpu3", "once": false},
  "counts": {"seen": 0, "settling": 1, "incomplete": 0, "waiting_picks": 3, "queued": 4, "running": 1, "done": 118,
             "failed": 2, "skipped": 1},
  "particles": 43210, "stacks": 5,
  "totals": {"done": 118, "failed": 2, "skipped": 1, "particles": 43210, "stacks": 5},
  "this_session": {"done": 118, "failed": 2, "skipped": 1, "particles": 43210},
  "rates": {"movies_per_hour": 312.4, "movies_per_hour_recent": 340.2, "particles_per_s": 41.23,
            "particles_per_s_recent": 45.01, "latency_median_s": 18.2, "latency_p95_s": 42.7, "latency_last_s": 17.9,
            "backlog": 6},
  "workers": [
    {"name": "gpu0", "host": "em-gpu3", "pid": 81240, "device": "gpu", "gpu": 0, "state": "busy",
     "movie": "/data/krios/2024-05-17/raw/FoilHole_301_Data_0130_fractions.tiff", "job_seconds": 4.2, "queued": 0,
     "done": 61, "failed": 1, "mean_s": 7.9, "gpu_mem_mb": 6150.0, "busy_fraction": 0.93, "last_seen_s": 0.4},
    {"name": "gpu1", "host": "em-gpu3", "pid": 81241, "device": "gpu", "gpu": 1, "state": "idle", "movie": null,
     "job_seconds": null, "queued": 0, "done": 57, "failed": 1, "mean_s": 8.4, "gpu_mem_mb": 512.0,
     "busy_fraction": 0.88, "last_seen_s": 0.7}
  ],
  "recent": [
    {"movie": "raw/FoilHole_301_Data_0118_fractions.tiff", "particles": 371, "motion_total_A": 14.2, "motion_early_A": 6.1, "local_mean_A": 1.31, "quality_gain": 0.0213, "seconds": 7.8, "time": 1715943600.1},
    {"movie": "raw/FoilHole_301_Data_0119_fractions.tiff", "particles": 402, "motion_total_A": 17.9, "motion_early_A": 7.4, "local_mean_A": 1.52, "quality_gain": 0.0188, "seconds": 8.1, "time": 1715943610.5},
    {"movie": "raw/FoilHole_301_Data_0120_fractions.tiff", "particles": 355, "motion_total_A": 12.6, "motion_early_A": 5.0, "local_mean_A": 1.12, "quality_gain": 0.0241, "seconds": 7.6, "time": 1715943621.0},
    {"movie": "raw/FoilHole_301_Data_0121_fractions.tiff", "particles": 388, "motion_total_A": 21.3, "motion_early_A": 9.2, "local_mean_A": 2.05, "quality_gain": 0.0152, "seconds": 8.0, "time": 1715943631.4},
    {"movie": "raw/FoilHole_301_Data_0122_fractions.tiff", "particles": 344, "motion_total_A": 16.0, "motion_early_A": 6.6, "local_mean_A": 1.44, "quality_gain": 0.0199, "seconds": 7.7, "time": 1715943641.9},
    {"movie": "raw/FoilHole_301_Data_0123_fractions.tiff", "particles": 391, "motion_total_A": 19.4, "motion_early_A": 8.3, "local_mean_A": 1.71, "quality_gain": 0.0176, "seconds": 8.3, "time": 1715943652.3},
    {"movie": "raw/FoilHole_301_Data_0124_fractions.tiff", "particles": 366, "motion_total_A": 13.5, "motion_early_A": 5.4, "local_mean_A": 1.22, "quality_gain": 0.0230, "seconds": 7.9, "time": 1715943662.8},
    {"movie": "raw/FoilHole_301_Data_0125_fractions.tiff", "particles": 379, "motion_total_A": 15.1, "motion_early_A": 6.0, "local_mean_A": 1.35, "quality_gain": 0.0207, "seconds": 8.2, "time": 1715943673.2},
    {"movie": "raw/FoilHole_301_Data_0126_fractions.tiff", "particles": 398, "motion_total_A": 18.2, "motion_early_A": 7.7, "local_mean_A": 1.60, "quality_gain": 0.0182, "seconds": 8.0, "time": 1715943683.7},
    {"movie": "raw/FoilHole_301_Data_0127_fractions.tiff", "particles": 412, "motion_total_A": 22.7, "motion_early_A": 9.8, "local_mean_A": 2.21, "quality_gain": 0.0141, "seconds": 8.6, "time": 1715943694.1},
    {"movie": "raw/FoilHole_301_Data_0128_fractions.tiff", "particles": 12, "motion_total_A": 57.4, "motion_early_A": 31.2, "local_mean_A": 7.85, "quality_gain": -0.0124, "seconds": 9.4, "time": 1715943704.6},
    {"movie": "raw/FoilHole_301_Data_0129_fractions.tiff", "particles": 384, "motion_total_A": 16.6, "motion_early_A": 6.9, "local_mean_A": 1.48, "quality_gain": 0.0197, "seconds": 7.8, "time": 1715943715.0}
  ],
  "waiting": [
    {"movie": "/data/krios/2024-05-17/raw/FoilHole_305_Data_0002_fractions.tiff", "state": "waiting_picks", "seconds": 370.2, "reason": ""},
    {"movie": "/data/krios/2024-05-17/raw/FoilHole_305_Data_0003_fractions.tiff", "state": "waiting_picks", "seconds": 41.0, "reason": ""}
  ],
  "warnings": ["FoilHole_301_Data_0128_fractions.tiff: 9 particles too close to the edge for the alignment box: full-frame motion only"],
  "errors": [{"movie": "raw/FoilHole_299_Data_0077_fractions.tiff",
              "reason": "raw/FoilHole_299_Data_0077_fractions.tiff: truncated: header says 40 frames, file holds 37", "time": 1715941000.0},
             {"movie": "raw/FoilHole_300_Data_0003_fractions.tiff",
              "reason": "picks/FoilHole_300_Data_0003_fractions.star: no rlnCoordinateX column", "time": 1715942000.0}],
  "paused": false, "quit_requested": false, "dropped_messages": 0,
  "disk_free_gb": 812.3
}
""")
STATE = enrich_snapshot(RECORDED, now=RECORDED["time"])


def draw(snapshot: dict, width: int, height: int) -> tuple[str, Console]:
    console = Console(record=True, width=width, height=height, file=open(os.devnull, "w"), color_system="truecolor",
                      force_terminal=True)
    console.print(render(snapshot, width, height))
    return console.export_text(clear=False), console


def test_80x24_fits_and_shows_what_matters() -> None:
    text, _ = draw(STATE, 80, 24)
    lines = text.splitlines()
    assert len(lines) <= 24
    assert max(len(line) for line in lines) <= 80
    # counts: labels and values in the same columns
    head = next(i for i, line in enumerate(lines) if "wait picks" in line)
    for label, value in (("seen", "130"), ("done", "118"), ("failed", "2"), ("queued", "4"), ("skipped", "1")):
        col = lines[head].index(label) + len(label)  # right-aligned under its label
        assert lines[head + 1][:col].rstrip().endswith(value), (label, lines[head + 1])
    # rates, latency, backlog
    assert "312 (recent 340)" in text
    assert "41.2 (recent 45.0)" in text
    assert "43,210 in 5 stacks" in text
    assert "18s median, 43s p95" in text
    assert "6 movies, ETA 1m03s" in text  # 6 movies at 340.2 movies/h
    assert "up 1h02m" in text
    # newest movie first, its numbers on its row; the worst movie is visible too
    rows = [line for line in lines if "fractions" in line and "failed" not in line]
    assert "0129" in rows[0] and "384" in rows[0] and "16.6" in rows[0] and "+0.020" in rows[0]
    assert any("0128" in r and "57.4" in r and "-0.012" in r for r in rows)
    assert len(rows) >= 3
    # failures with their reason and warnings
    assert "failed" in text and "0077" in text and "truncated" in text
    assert "FoilHole_305_Data_0002_fractions.tiff: waiting 6m10s for picks" in text  # derived from "waiting"
    assert "0003_fractions.tiff: waiting" not in text  # 41 s is not long
    assert "q" in lines[-1] and "drain and quit" in lines[-1] and "pause" in lines[-1]


def test_160x48_uses_the_room() -> None:
    small, _ = draw(STATE, 80, 24)
    text, _ = draw(STATE, 160, 48)
    lines = text.splitlines()
    assert len(lines) <= 48
    assert max(len(line) for line in lines) <= 160
    rows = [line for line in lines if line.startswith("FoilHole_301_Data_01")]
    assert len(rows) == 12  # every recorded movie
    assert "FoilHole_301_Data_0129_fractions" in text  # full names fit
    # per-worker details: device, current movie, done, mean s/movie, GPU memory (6150 MB = 6.0 GB)
    w0 = next(line for line in lines if line.startswith("gpu0 "))
    assert "0130" in w0 and "4s" in w0 and "61" in w0 and "7.9" in w0 and "6.0 GB" in w0
    w1 = next(line for line in lines if line.startswith("gpu1 "))
    assert "idle" in w1 and "0.5 GB" in w1
    # the trend: one block per movie, the outlier (57.4 Å) the tallest
    motion_line = next(line for line in lines if "motion Å" in line and any(b in line for b in BLOCKS))
    spark = "".join(ch for ch in motion_line if ch in BLOCKS)
    assert len(spark) == 12 and spark[10] == "█" and spark.count("█") == 1
    assert "12.6 … 57.4" in motion_line
    assert len(text) > len(small)


def test_quality_values_are_colour_coded() -> None:
    _, console = draw(STATE, 160, 48)
    html = console.export_html(inline_styles=True)

    def colour_of(value: str) -> str:
        m = re.search(r'<span style="([^"]*)">\s*' + re.escape(value) + r"\s*</span>", html)
        assert m, value
        return m.group(1)

    assert colour_of("57.4") != colour_of("16.6")  # extreme drift stands out from a normal movie
    assert colour_of("-0.012") != colour_of("+0.020")  # local correction hurt vs helped
    assert colour_of("7.85") != colour_of("1.48")
    assert grade(16.6, (30.0, 50.0)) == "green" and grade(57.4, (30.0, 50.0)) == "bold red"
    assert grade_gain(0.02) == "green" and grade_gain(-0.012) == "bold red" and grade_gain(None) == "dim"


def test_short_terminal_drops_trend_and_workers_first() -> None:
    text, _ = draw(STATE, 80, 24)
    assert "trend" not in text
    tiny, _ = draw(STATE, 80, 18)
    assert len(tiny.splitlines()) <= 18
    assert "workers" not in tiny.splitlines()[3:]  # the workers table went (header line may say "workers 2")
    assert "seen" in tiny and "312 (recent 340)" in tiny and "0129" in tiny and "truncated" in tiny


def test_empty_and_partial_snapshots_render() -> None:
    for snap in ({}, {"counts": {"seen": 0}}, {"recent": [{"movie": "a.tif", "quality_gain": None}]}):
        text, _ = draw(snap, 80, 24)
        assert "seen" in text and len(text.splitlines()) <= 24
    text, _ = draw({}, 80, 24)
    assert "no movie finished yet" in text


def test_counts_seen_is_every_movie_found() -> None:
    snap = {"counts": {"seen": 2, "settling": 1, "incomplete": 1, "waiting_picks": 0, "queued": 5, "running": 2,
                       "done": 10, "failed": 0, "skipped": 0}}
    text, _ = draw(snap, 80, 24)
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if "wait picks" in line)
    assert lines[head].split() == ["seen", "wait", "picks", "settling", "incomplete", "queued", "running", "done",
                                   "failed", "skipped"]
    assert lines[head + 1].split() == ["21", "0", "3", "1", "5", "2", "10", "0", "0"]
    text, _ = draw({"counts": dict(snap["counts"], incomplete=0)}, 80, 24)
    assert "incomplete" not in text  # the column appears only when something is incomplete


def test_trend_history_outlives_the_recent_window() -> None:
    history = TrendHistory(limit=8)
    for k in range(6):  # successive snapshots, each holding the last 3 movies
        recent = [{"movie": f"m{i}", "time": float(i), "motion_total_A": float(i), "quality_gain": 0.01 * i}
                  for i in range(max(0, k - 2), k + 1)]
        history.add(recent)
    assert history.motion == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    history.add([{"movie": f"m{i}", "time": float(i), "motion_total_A": float(i)} for i in range(6, 9)])
    assert history.motion == [0.0, 2.0, 4.0, 6.0, 8.0]  # past the limit: every other value kept
    assert history.quality[:3] == [0.0, 0.02, 0.04]


def test_paused_and_draining_are_visible() -> None:
    snap = dict(STATE, paused=True)
    text, _ = draw(snap, 80, 24)
    assert "PAUSED" in text and "resume dispatch" in text
    text, _ = draw(dict(STATE, quit_requested=True), 80, 24)
    assert "DRAINING" in text


def test_controls_keys() -> None:
    c = Controls()
    c.key("p")
    assert c.paused and not c.quit_requested
    c.key("P")
    assert not c.paused
    c.key("x")
    assert not c.paused and not c.quit_requested
    c.key("q")
    assert c.quit_requested


def test_sparkline() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == BLOCKS
    assert sparkline([1, None, float("nan"), 3], 10) == "▁  █"
    assert sparkline([5, 5, 5], 3) == "▁▁▁"
    assert sparkline([], 5) == ""
    # more values than cells: means of consecutive groups, so the whole series stays in view
    assert resample([1, 3, 5, 7, 9, 11], 3) == [2.0, 6.0, 10.0]
    assert len(sparkline(list(range(1000)), 40)) == 40
    assert sparkline([0, 10], 2, lo=0, hi=20) == "▁▅"


def test_enrich_snapshot_derives_missing_values(tmp_path: Path) -> None:
    snap = {"session": {"out": str(tmp_path / "not-yet"), "started": 1000.0},
            "counts": {"settling": 2, "queued": 5, "running": 1},
            "rates": {"movies_per_hour": 360.0},
            "recent": [{"motion_total_A": 10.0, "quality_gain": 0.01}, {"motion_total_A": 20.0, "quality_gain": None}]}
    out = enrich_snapshot(copy.deepcopy(snap), now=1100.0)
    assert out["session"]["uptime_s"] == pytest.approx(100.0)
    assert out["rates"]["backlog"] == 8
    assert out["rates"]["eta_s"] == pytest.approx(80.0)  # 8 movies at 0.1 movie/s
    free = shutil.disk_usage(tmp_path).free / 1e9
    assert out["disk_free_gb"] == pytest.approx(free, abs=0.2)
    assert out["trend"]["motion"] == [10.0, 20.0]
    assert "rates" in snap and "eta_s" not in snap["rates"]  # the input is not modified
    low = enrich_snapshot({"disk_free_gb": 3.2, "waiting": [{"movie": "/x/a.tiff", "state": "waiting_picks", "seconds": 301},
                                                             {"movie": "/x/b.tiff", "state": "settling", "seconds": 900}]})
    assert low["alerts"] == ["low disk space: 3.2 GB free in the output folder", "a.tiff: waiting 5m01s for picks"]
    assert enrich_snapshot(low)["alerts"] == low["alerts"]  # idempotent
    kept = enrich_snapshot({"rates": {"eta_s": 5.0, "backlog": 1, "movies_per_hour": 1.0}})
    assert kept["rates"]["eta_s"] == 5.0


def test_duration_format() -> None:
    assert [fmt_duration(v) for v in (None, 0, 45.4, 125, 3725, 200000)] == ["–", "0s", "45s", "2m05s", "1h02m", "2d07h"]


def test_live_console_update_is_threadsafe_and_renders_latest() -> None:
    import io
    import threading

    buf = io.StringIO()
    console = Console(file=buf, width=80, height=24, force_terminal=True, color_system=None)
    live = LiveConsole(None, console=console, keys=False, screen=False, refresh_per_second=4)
    live.start()
    threads = [threading.Thread(target=lambda i=i: [live.update(dict(STATE, particles=1000 * i + k)) for k in range(5)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live.update(dict(STATE, particles=98765))
    live.controls.key("p")
    live.stop()
    out = buf.getvalue()
    assert "98,765" in out and "PAUSED" in out
    assert live.current()["paused"] is True


def _read_pty(fd: int, proc: subprocess.Popen, timeout: float) -> bytes:
    data = b""
    end = time.time() + timeout
    while time.time() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    return data


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>()][0-9A-B]?")


def _screen_text(data: bytes) -> str:
    return _ANSI.sub("", data.decode("utf-8", errors="replace"))


@pytest.mark.slow
def test_lmc_watch_under_a_pseudo_terminal(tmp_path: Path) -> None:
    """The real ``lmc watch`` on a terminal: the console draws the numbers, ``p`` pauses, ``q`` drains and quits,
    and the terminal's mode is restored."""
    import fcntl
    import pty
    import struct
    import termios

    from streamer.sim.simulate import SimParams, recommended_box, simulate_session

    params = SimParams(movies=1, frames=6, shape=(256, 256), particles=4, edge_particles=0, junk_picks=0,
                       mass_kda=60.0, seed=5)
    scope = simulate_session(tmp_path / "scope", params)
    out = tmp_path / "out"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    before = termios.tcgetattr(slave)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    cmd = [sys.executable, "-m", "streamer.cli", "watch", "--movies", str(scope / "movies" / "*"),
           "--picks", str(scope / "picks"), "--gain", str(scope / "gain.mrc"), "--out", str(out),
           "--box", str(recommended_box(params)), "--settle-seconds", "0.2", "--poll", "0.5", "--no-plots",
           "--apix", str(params.apix), "--dose-per-frame", str(params.dose_per_frame)]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path, env=env, close_fds=True)
    try:
        movie_row = re.compile(r"_Data_1_fractions\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)s\b")
        screen = ""
        deadline = time.time() + 90
        while time.time() < deadline and not movie_row.search(screen):
            screen += _screen_text(_read_pty(master, proc, 0.5))
            assert proc.poll() is None, screen[-3000:]
        row = movie_row.search(screen)
        assert row, screen[-3000:]
        for label in ("lmc watch", "seen", "wait picks", "done", "movies/h", "particles/s", "latency",
                      "recent movies", "drain and quit"):
            assert label in screen, label
        os.write(master, b"p")
        screen = ""
        deadline = time.time() + 15
        while time.time() < deadline and "PAUSED" not in screen:
            screen += _screen_text(_read_pty(master, proc, 0.5))
        assert "PAUSED" in screen and "resume dispatch" in screen
        os.write(master, b"q")
        tail = _screen_text(_read_pty(master, proc, 30))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = json.loads((out / "status.json").read_text())
    n = status["particles"]
    assert status["counts"]["done"] == 1 and n > 0
    assert int(row.group(1)) == n  # the console showed the particles of the movie as committed
    assert "movies done: 1" in tail and f"particles written: {n}" in tail
    after = termios.tcgetattr(slave)
    assert after[3] & termios.ICANON and after[3] & termios.ECHO  # cbreak mode undone
    assert after == before
    os.close(master)
    os.close(slave)


def test_trend_history_remembers_only_a_bounded_window_of_seen_movies() -> None:
    """The duplicate check must not grow with the session: after 3000 movies through 50-movie
    ``recent`` lists, it holds a few hundred keys, and no movie is counted twice."""
    history = TrendHistory(limit=100000)
    for k in range(3000):
        history.add([{"movie": f"m{i}", "time": float(i), "motion_total_A": float(i)}
                     for i in range(max(0, k - 49), k + 1)])
        assert len(history._seen) <= 256
    assert history.motion == [float(i) for i in range(3000)]
