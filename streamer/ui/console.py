"""The operator's live console for ``lmc watch`` on a terminal: is it keeping up, is the data good, is anything stuck.

The session hands a snapshot dict (the same one it writes to ``OUT/status.json``) to
``LiveConsole.update`` about once a second; a Rich ``Live`` redraws it in the alternate screen
(no scrolling, no flicker) at the terminal's size. ``render`` is pure, so tests draw a recorded
snapshot at any size. Keys (read in cbreak mode from the terminal): ``q`` drain and quit, ``p``
pause / resume dispatch; the session polls ``LiveConsole.controls``.

Snapshot keys used (those of ``streamer.live.session.Session.snapshot``; all optional, missing values
show as "–"): ``phase``; ``session`` {movies, picks, out, started, uptime_s}; ``workers`` [{name,
device, gpu, state, movie, job_seconds, done, mean_s, gpu_mem_mb}]; ``counts`` {seen, settling,
incomplete, waiting_picks, queued, running, done, failed, skipped}; ``particles``; ``stacks``;
``rates`` {movies_per_hour, movies_per_hour_recent, particles_per_s, particles_per_s_recent,
latency_median_s, latency_p95_s, backlog, eta_s}; ``recent`` [{movie, particles, motion_total_A,
motion_early_A, local_mean_A, quality_gain, seconds}] (newest last); ``waiting`` [{movie, state,
seconds}]; ``warnings`` [str]; ``errors`` [{movie, reason}]; ``paused``; ``quit_requested``;
``slurm`` {wanted, ended, alert, jobs [{job_id, state, reason, node, gpus, worker, done, waited_s}]}.
Derived by :func:`streamer.output.status.enrich_snapshot` when absent: ``disk_free_gb``, ``rates.eta_s``, ``trend``
{motion, quality}, ``alerts`` [str] (low disk, a movie waiting long for its picks).
"""

from __future__ import annotations

import io
import os
import select
import sys
import termios
import threading
import time
import tty
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from streamer.output.status import LOW_DISK_GB, enrich_snapshot, fmt_duration
from streamer.output.status import as_finite as _num
from streamer.ui.sparkline import sparkline

__all__ = ["Controls", "LiveConsole", "TrendHistory", "enrich_snapshot", "fmt_duration", "grade", "grade_gain", "render"]

# Colour bands for the per-movie quality values: (green up to, yellow up to), red beyond.
# Full-frame drift of 5-30 Å and local deviations of 1-5 Å are typical (docs/physics.md#realistic-motion).
MOTION_TOTAL_A = (30.0, 50.0)
MOTION_EARLY_A = (10.0, 20.0)
LOCAL_MEAN_A = (3.0, 6.0)
# quality_gain is the relative gain of local over full-frame correction; below -GAIN_EPS it hurt
GAIN_EPS = 0.002


@dataclass
class Controls:
    """What the operator asked for; the session polls it (plain attributes: reads are atomic)."""

    paused: bool = False
    quit_requested: bool = False

    def toggle_pause(self) -> None:
        self.paused = not self.paused

    def request_quit(self) -> None:
        self.quit_requested = True

    def key(self, ch: str) -> None:
        """Apply one key press: ``q`` drain and quit, ``p`` pause / resume."""
        ch = ch.lower()
        if ch == "q":
            self.request_quit()
        elif ch == "p":
            self.toggle_pause()


# -- formatting ------------------------------------------------------------------------------


def fmt_int(v: Any) -> str:
    f = _num(v)
    return "–" if f is None else f"{round(f):,}"


def fmt_float(v: Any, digits: int = 1, sign: bool = False) -> str:
    f = _num(v)
    if f is None:
        return "–"
    return f"{f:+.{digits}f}" if sign else f"{f:.{digits}f}"


def grade(v: Any, bands: tuple[float, float]) -> str:
    """Style for a value where lower is better: green up to ``bands[0]``, yellow up to ``bands[1]``, else red."""
    f = _num(v)
    if f is None:
        return "dim"
    return "green" if f <= bands[0] else "yellow" if f <= bands[1] else "bold red"


def grade_gain(v: Any) -> str:
    """Green where local correction helped, red where it hurt, dim where it changed nothing."""
    f = _num(v)
    if f is None:
        return "dim"
    return "green" if f > GAIN_EPS else "bold red" if f < -GAIN_EPS else "yellow"


def _short_path(p: Any, width: int) -> str:
    s = "–" if p in (None, "") else str(p)
    if len(s) <= width:
        return s
    return "…" + s[-(width - 1):] if width > 1 else "…"


class TrendHistory:
    """Motion and quality of every movie seen in successive snapshots' ``recent`` lists (which hold
    only the last few), so the console's trend covers the whole session. Bounded to ``limit`` movies.

    Duplicates are recognised by (movie, time) among the last ``max(4 * len(recent), 256)`` movies
    added: an entry older than that has left every later ``recent`` list, so the memory of what was
    seen stays bounded too."""

    def __init__(self, limit: int = 20000) -> None:
        self.limit = limit
        self._seen: OrderedDict[tuple[str, Any], None] = OrderedDict()  # the oldest are dropped first
        self.motion: list[float | None] = []
        self.quality: list[float | None] = []

    def add(self, recent: Sequence[dict[str, Any]]) -> None:
        for r in recent:
            key = (str(r.get("movie")), r.get("time"))
            if key in self._seen:
                continue
            self._seen[key] = None
            self.motion.append(_num(r.get("motion_total_A")))
            self.quality.append(_num(r.get("quality_gain")))
        keep = max(4 * len(recent), 256)
        while len(self._seen) > keep:
            self._seen.popitem(last=False)
        if len(self.motion) > self.limit:
            # halve the resolution of the oldest part instead of forgetting the start of the session
            self.motion = self.motion[::2]
            self.quality = self.quality[::2]

    def as_dict(self) -> dict[str, list[float | None]]:
        return {"motion": list(self.motion), "quality": list(self.quality)}


# -- sections ---------------------------------------------------------------------------------


def _header(snap: dict[str, Any], width: int) -> RenderableType:
    session = snap.get("session") or {}
    workers = snap.get("workers") or []
    folders = Text(no_wrap=True, overflow="ellipsis", style="on grey19")
    folders.append(" lmc watch ", style="bold white on dark_blue")
    room = max(8, (width - 12) // 3 - 8)
    for label, key in (("movies", "movies"), ("picks", "picks"), ("out", "out")):
        folders.append(f" {label} ", style="grey62 on grey19")
        folders.append(_short_path(session.get(key), room), style="bold on grey19")
    folders.append(" " * max(0, width - folders.cell_len), style="on grey19")

    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(" up ", style="grey62")
    line.append(fmt_duration(session.get("uptime_s")), style="bold")
    devices: dict[str, int] = {}
    for w in workers:
        dev = _device(w)
        devices[dev] = devices.get(dev, 0) + 1
    line.append("  workers ", style="grey62")
    line.append(str(len(workers)), style="bold")
    if devices:
        line.append(" (" + ", ".join(f"{n}×{d}" if n > 1 else d for d, n in devices.items()) + ")")
    slurm = snap.get("slurm") or {}
    if slurm.get("wanted"):
        states: dict[str, int] = {}
        for job in slurm.get("jobs") or []:
            states[str(job.get("state"))] = states.get(str(job.get("state")), 0) + 1
        line.append("  slurm ", style="grey62")
        line.append(", ".join(f"{n} {st}" for st, n in states.items()) or "no jobs",
                    style="bold red" if slurm.get("alert") else "bold")
    free = _num(snap.get("disk_free_gb"))
    if free is not None:
        line.append("  disk ", style="grey62")
        line.append(f"{free:,.0f} GB free", style="bold red" if free < LOW_DISK_GB else "")
    line.append("  ")
    phase = str(snap.get("phase") or "running")
    if phase in ("finished", "aborted", "starting"):
        line.append(f" {phase.upper()} ", style="bold white on red" if phase == "aborted" else "bold black on grey70")
    elif snap.get("quit_requested") or phase == "draining":
        line.append(" DRAINING ", style="bold black on yellow")
    elif snap.get("paused"):
        line.append(" PAUSED ", style="bold black on yellow")
    else:
        line.append(" LIVE ", style="bold black on green")
    return Group(folders, line)


_COUNT_LABELS = (
    ("seen", "seen", ""),
    ("waiting_picks", "wait picks", "cyan"),
    ("settling", "settling", "cyan"),
    ("queued", "queued", "blue"),
    ("running", "running", "bold blue"),
    ("done", "done", "bold green"),
    ("failed", "failed", "bold red"),
    ("skipped", "skipped", "yellow"),
)


def _display_counts(counts: dict[str, Any]) -> dict[str, Any]:
    """The watcher's per-state counts as shown: "seen" is every movie found so far (the sum over
    all states) and the brief "seen" state (found, not yet settling) is counted as settling."""
    values = {k: _num(v) for k, v in counts.items()}
    if not any(v is not None for v in values.values()):
        return {}
    out: dict[str, Any] = dict(counts)
    out["seen"] = sum(v for v in values.values() if v is not None)
    out["settling"] = (values.get("settling") or 0) + (values.get("seen") or 0)
    return out


def _counts(snap: dict[str, Any], width: int) -> RenderableType:
    counts = _display_counts(snap.get("counts") or {})
    labels = list(_COUNT_LABELS)
    if _num(counts.get("incomplete")):  # only when it matters: it costs a column
        labels.insert(3, ("incomplete", "incomplete", "bold yellow"))
    table = Table(box=None, padding=(0, 1), show_edge=False, pad_edge=False, header_style="grey62")
    for key, label, style in labels:
        if key == "failed" and not _num(counts.get(key)):
            style = ""
        table.add_column(label, justify="right", style=style, no_wrap=True)
    table.add_row(*(fmt_int(counts.get(k)) for k, _, _ in labels))
    return table


def _device(worker: dict[str, Any]) -> str:
    gpu = worker.get("gpu")
    if gpu is not None and not isinstance(gpu, bool):
        return f"gpu{gpu}"
    return str(worker.get("device") or "?")


def _rates(snap: dict[str, Any], width: int) -> RenderableType:
    rates = snap.get("rates") or {}
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="grey62", no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")
    grid.add_column(style="grey62", no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")
    grid.add_row(
        "movies/h",
        Text.assemble((fmt_float(rates.get("movies_per_hour"), 0), "bold"), f" (recent {fmt_float(rates.get('movies_per_hour_recent'), 0)})"),
        "particles",
        Text.assemble((fmt_int(snap.get("particles")), "bold"),
                      f" in {fmt_int(snap.get('stacks'))} stack{'' if _num(snap.get('stacks')) == 1 else 's'}"),
    )
    grid.add_row(
        "particles/s",
        Text.assemble((fmt_float(rates.get("particles_per_s"), 1), "bold"), f" (recent {fmt_float(rates.get('particles_per_s_recent'), 1)})"),
        "backlog",
        Text.assemble((fmt_int(rates.get("backlog")), "bold"), " movies, ETA ", (fmt_duration(rates.get("eta_s")), "bold")),
    )
    grid.add_row(
        "latency",
        Text.assemble((fmt_duration(rates.get("latency_median_s")), "bold"), " median, ",
                      (fmt_duration(rates.get("latency_p95_s")), "bold"), " p95"),
        "",
        Text("ready → committed", style="grey50"),
    )
    picks = snap.get("picks") or {}
    if picks.get("movies"):
        reasons = picks.get("skip_reasons") or {}
        why = ", ".join(f"{n} {r}" for r, n in reasons.items())
        empty = picks.get("movies_without_particles") or 0
        grid.add_row(
            "picks",
            Text.assemble((fmt_int(picks.get("picks")), "bold"), " read, ", (fmt_int(picks.get("particles")), "bold"),
                          " particles, ", (fmt_int(picks.get("skipped")), "bold"), " skipped"),
            "skipped",
            Text.assemble(why or "–", (f"  {empty} movie(s) without particles", "yellow") if empty else ""),
        )
    return grid


def _section_rule(title: str) -> Rule:
    return Rule(Text(title, style="bold"), align="left", style="grey35", characters="─")


def _movie_name(movie: Any, width: int = 0) -> str:
    """The movie's file name without folder and extension; the *start* is cut when longer than
    ``width`` because EPU names differ at their end."""
    name = os.path.basename(str(movie or "–"))
    for ext in (".mrc.bz2", ".tiff", ".tif", ".mrc", ".eer"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if width and len(name) > width:
        name = "…" + name[-(width - 1):]
    return name


def _recent(snap: dict[str, Any], width: int, rows: int) -> RenderableType:
    recent = list(snap.get("recent") or [])[-rows:][::-1] if rows > 0 else []
    table = Table(box=None, padding=(0, 1), show_edge=False, pad_edge=False, header_style="grey62", expand=False)
    with_picks = width >= 100  # a narrow terminal keeps the movie names readable instead
    name_w = max(12, width - (69 if with_picks else 62))
    table.add_column("movie", no_wrap=True, overflow="ellipsis", max_width=name_w)
    table.add_column("particles", justify="right", no_wrap=True)
    if with_picks:
        table.add_column("picks", justify="right", no_wrap=True)
    table.add_column("motion Å", justify="right", no_wrap=True)
    table.add_column("early Å", justify="right", no_wrap=True)
    table.add_column("local Å", justify="right", no_wrap=True)
    table.add_column("gain", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    for r in recent:
        picks = [fmt_int(r.get("picks"))] if with_picks else []
        table.add_row(
            _movie_name(r.get("movie"), name_w),
            Text(fmt_int(r.get("particles")), style="yellow" if r.get("particles") == 0 else ""),
            *picks,
            Text(fmt_float(r.get("motion_total_A"), 1), style=grade(r.get("motion_total_A"), MOTION_TOTAL_A)),
            Text(fmt_float(r.get("motion_early_A"), 1), style=grade(r.get("motion_early_A"), MOTION_EARLY_A)),
            Text(fmt_float(r.get("local_mean_A"), 2), style=grade(r.get("local_mean_A"), LOCAL_MEAN_A)),
            Text(fmt_float(r.get("quality_gain"), 3, sign=True), style=grade_gain(r.get("quality_gain"))),
            fmt_float(r.get("seconds"), 1) + "s" if _num(r.get("seconds")) is not None else "–",
        )
    if not recent:
        return Group(_section_rule("recent movies (newest first)"), table, Text("no movie finished yet", style="grey50"))
    return Group(_section_rule("recent movies (newest first)"), table)


def _warning_lines(snap: dict[str, Any]) -> list[Text]:
    """Failures (newest first), then alerts, then warnings (newest first), one line each."""
    lines: list[Text] = []
    for err in reversed(snap.get("errors") or []):
        movie = _movie_name(err.get("movie")) if isinstance(err, dict) else ""
        reason = str(err.get("reason", "")) if isinstance(err, dict) else str(err)
        if isinstance(err, dict) and err.get("movie"):  # the folder is in the header already
            reason = reason.replace(str(err["movie"]), os.path.basename(str(err["movie"])))
        line = Text("✗ failed ", style="bold red")
        # our error messages start with the file at fault; name the movie only when they do not
        if not movie or movie not in reason:
            line.append(movie, style="bold")
            line.append(": ")
        line.append(reason)
        lines.append(line)
    for a in snap.get("alerts") or []:
        lines.append(Text.assemble(("! ", "bold red"), (str(a), "bold yellow")))
    for w in reversed(snap.get("warnings") or []):
        lines.append(Text.assemble(("! ", "bold yellow"), (str(w), "yellow")))
    for line in lines:
        line.no_wrap = True
        line.overflow = "ellipsis"
    return lines


def _warnings(lines: Sequence[Text], rows: int) -> RenderableType:
    shown = list(lines[:rows])
    if len(lines) > rows and rows > 0:
        shown[-1] = Text(f"… and {len(lines) - rows + 1} more (see OUT/status.json)", style="yellow")
    return Group(_section_rule(f"warnings ({len(lines)})"), *shown)


def _workers(snap: dict[str, Any], width: int) -> RenderableType:
    table = Table(box=None, padding=(0, 1), show_edge=False, pad_edge=False, header_style="grey62")
    table.add_column("worker", no_wrap=True, overflow="ellipsis", max_width=14)
    table.add_column("device", no_wrap=True)
    name_w = max(10, width - 60)
    table.add_column("movie", no_wrap=True, overflow="ellipsis", max_width=name_w)
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("s/movie", justify="right", no_wrap=True)
    table.add_column("GPU mem", justify="right", no_wrap=True)
    slurm_jobs = {str(j.get("worker")): j for j in (snap.get("slurm") or {}).get("jobs") or [] if j.get("worker")}
    for w in snap.get("workers") or []:
        mem = _num(w.get("gpu_mem_mb"))
        job_of = slurm_jobs.get(str(w.get("name")))
        movie = w.get("movie")
        state = str(w.get("state") or "")
        job = _num(w.get("job_seconds"))
        label = Text(state or "idle", style="grey50")
        if movie:
            since = f" {fmt_duration(job)}" if job is not None else ""
            label = Text.assemble((_movie_name(movie, name_w - len(since)), "bold blue"), (since, "grey62"))
        table.add_row(
            str(w.get("name") or "?"),
            _device(w) if job_of is None else f"{job_of.get('node') or '?'}:{_device(w)}",
            label,
            fmt_int(w.get("done")),
            fmt_float(w.get("mean_s"), 1),
            "–" if mem is None else f"{mem / 1024:.1f} GB",
        )
    # Slurm jobs whose worker has not joined yet: pending (with Slurm's reason) or starting
    for job in (snap.get("slurm") or {}).get("jobs") or []:
        if job.get("worker"):
            continue
        why = f" ({job['reason']})" if job.get("reason") else ""
        waited = f" {fmt_duration(job.get('waited_s'))}" if job.get("waited_s") is not None else ""
        table.add_row(f"job {job.get('job_id')}", str(job.get("node") or "slurm"),
                      Text(f"{job.get('state')}{why}{waited}", style="yellow"), "–", "–", "–")
    return Group(_section_rule("workers"), table)


def _trend(snap: dict[str, Any], width: int) -> RenderableType:
    trend = snap.get("trend") or {}
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="grey62", no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(style="grey62", no_wrap=True)
    spark_w = max(8, width - 34)
    for label, key, fmt, style in (
        ("motion Å", "motion", lambda v: fmt_float(v, 1), "cyan"),
        ("quality gain", "quality", lambda v: fmt_float(v, 3, sign=True), "magenta"),
    ):
        values = [_num(v) for v in trend.get(key) or []]
        finite = [v for v in values if v is not None]
        span = f"{fmt(min(finite))} … {fmt(max(finite))}, last {fmt(finite[-1])}" if finite else "–"
        grid.add_row(label, Text(sparkline(values, spark_w), style=style), span)
    return Group(_section_rule("trend over the session"), grid)


def _footer(snap: dict[str, Any]) -> RenderableType:
    text = Text(no_wrap=True, overflow="ellipsis")
    if snap.get("phase") in ("finished", "aborted"):
        text.append(f" session {snap['phase']} ", style="bold")
        return text
    text.append(" q ", style="bold black on grey70")
    text.append(" drain and quit  ")
    text.append(" p ", style="bold black on grey70")
    text.append(" resume dispatch  " if snap.get("paused") else " pause dispatch  ")
    if snap.get("quit_requested"):
        text.append("finishing running movies, then exiting…", style="yellow")
    elif snap.get("paused"):
        text.append("dispatch paused: running movies finish, no new ones start", style="yellow")
    return text


def _height(renderable: RenderableType, width: int) -> int:
    scratch = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False, force_terminal=False)
    return len(scratch.render_lines(renderable, scratch.options.update(width=width), pad=False))


def render(snapshot: dict[str, Any] | None, width: int, height: int) -> RenderableType:
    """The console for ``snapshot`` fitted to ``width`` × ``height`` cells (pure; no I/O).

    Always shown: header, counts, rates, key help. Then, while room remains: the newest movies
    (at least 3), warnings and failures, per-worker details and the trend; the trend and the
    workers are dropped first, and whatever is left goes to more recent movies.
    """
    snap = snapshot or {}
    width = max(40, int(width))
    height = max(8, int(height))
    fixed = [_header(snap, width), _counts(snap, width), _rates(snap, width)]
    footer = _footer(snap)
    budget = height - sum(_height(r, width) for r in fixed) - 1

    n_recent = len(snap.get("recent") or [])
    recent_rows = min(max(n_recent, 1), 3)
    budget -= 2 + recent_rows  # rule + table header
    warn_lines = _warning_lines(snap)
    warn_rows = min(len(warn_lines), 4 if height < 40 else 10)
    warn_block = None
    if warn_rows and budget >= 2:
        warn_rows = min(warn_rows, budget - 1)
        warn_block = _warnings(warn_lines, warn_rows)
        budget -= 1 + warn_rows
    # optional sections, least important last; side by side when wide enough
    workers = _workers(snap, width) if snap.get("workers") or (snap.get("slurm") or {}).get("jobs") else None
    has_trend = any(_num(v) is not None for values in (snap.get("trend") or {}).values() for v in values or [])
    trend = _trend(snap, width if width < 130 else width // 2) if has_trend else None
    optional: list[RenderableType] = []
    if width >= 130 and workers is not None and trend is not None:
        pair = Table.grid(padding=(0, 2), expand=True)
        pair.add_column(ratio=1)
        pair.add_column(ratio=1)
        half = (width - 2) // 2
        pair.add_row(_workers(snap, half), _trend(snap, half))
        h = _height(pair, width)
        spare = budget - h - (min(n_recent, 8) - recent_rows)  # keep a fair list of movies first
        if spare >= 0:
            optional.append(pair)
            budget -= h
    else:
        for block in (workers, trend):
            if block is None:
                continue
            h = _height(block, width)
            if budget - h >= min(n_recent - recent_rows, 2):
                optional.append(block)
                budget -= h
    recent_rows += max(0, min(n_recent - recent_rows, budget))
    parts: list[RenderableType] = [*fixed, _recent(snap, width, recent_rows)]
    if warn_block is not None:
        parts.append(warn_block)
    parts.extend(optional)
    parts.append(footer)
    return Group(*parts)


# -- the live console -------------------------------------------------------------------------


class LiveConsole:
    """A Rich live view of the session, redrawn about once a second, with key controls.

    ``update(snapshot)`` may be called from any thread; ``controls`` is polled by the session.
    """

    def __init__(self, cfg: Any = None, console: Console | None = None, keys: bool = True,
                 screen: bool = True, refresh_per_second: float = 1.0) -> None:
        self.cfg = cfg
        self.controls = Controls()
        self._console = console or Console()
        self._keys = keys
        self._screen = screen
        self._refresh = refresh_per_second
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        if cfg is not None:
            self._snapshot = {"session": {"movies": getattr(cfg, "movies", None),
                                          "picks": getattr(getattr(cfg, "picks", None), "dir", None),
                                          "out": getattr(cfg, "out", None), "started": time.time()}}
        self._trend = TrendHistory()
        self._live: Live | None = None
        self._stop = threading.Event()
        self._key_thread: threading.Thread | None = None
        self._saved_tty: list[Any] | None = None
        self._tty_fd: int | None = None

    # the session's side
    def update(self, snapshot: dict[str, Any]) -> None:
        """Store the latest snapshot (thread-safe); the next refresh draws it."""
        with self._lock:
            self._snapshot = dict(snapshot)
            self._trend.add(snapshot.get("recent") or [])
        if self._live is not None:
            self._live.refresh()

    def current(self) -> dict[str, Any]:
        """The latest snapshot, enriched, with the operator's controls merged in."""
        with self._lock:
            snap = dict(self._snapshot)
            # the console has seen every snapshot: its history is at least as long as the session's
            if len(self._trend.motion) > len((snap.get("trend") or {}).get("motion") or []):
                snap["trend"] = self._trend.as_dict()
        # the session may have moved to OUT-2 (--new): its own idea of the folder wins
        out = None if (snap.get("session") or {}).get("out") else getattr(self.cfg, "out", None)
        snap = enrich_snapshot(snap, out)
        snap["paused"] = bool(snap.get("paused")) or self.controls.paused
        snap["quit_requested"] = bool(snap.get("quit_requested")) or self.controls.quit_requested
        return snap

    def render(self, snapshot: dict[str, Any], width: int, height: int) -> RenderableType:
        return render(snapshot, width, height)

    def _renderable(self) -> RenderableType:
        width, height = self._console.size
        return render(self.current(), width, height if self._screen else height - 1)

    def start(self) -> None:
        """Enter the live view and start reading keys from the terminal (if stdin is one)."""
        if self._live is not None:
            return
        self._stop.clear()
        self._live = Live(console=self._console, screen=self._screen, auto_refresh=True,
                          refresh_per_second=self._refresh, transient=False, redirect_stdout=True,
                          redirect_stderr=True, get_renderable=self._renderable)
        self._live.start(refresh=True)
        if self._keys:
            self._start_keys()

    def stop(self) -> None:
        """Leave the live view, restore the terminal, and print the last state once."""
        self._stop.set()
        if self._key_thread is not None:
            self._key_thread.join(timeout=2.0)
            self._key_thread = None
        self._restore_tty()
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()
            if self._screen:
                width, height = self._console.size
                self._console.print(render(self.current(), width, min(height - 1, 30)))

    # keys
    def _start_keys(self) -> None:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return
        if not os.isatty(fd):
            return
        try:
            self._saved_tty = termios.tcgetattr(fd)
            tty.setcbreak(fd, termios.TCSANOW)
        except termios.error:
            self._saved_tty = None
            return
        self._tty_fd = fd
        self._key_thread = threading.Thread(target=self._read_keys, args=(fd,), name="lmc-console-keys", daemon=True)
        self._key_thread.start()

    def _read_keys(self, fd: int) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(fd, 64)
            except (OSError, ValueError):
                return
            if not data:
                return
            for ch in data.decode("utf-8", errors="ignore"):
                self.controls.key(ch)
            if self._live is not None:
                self._live.refresh()

    def _restore_tty(self) -> None:
        if self._tty_fd is not None and self._saved_tty is not None:
            try:
                termios.tcsetattr(self._tty_fd, termios.TCSADRAIN, self._saved_tty)
            except termios.error:
                pass
        self._tty_fd = None
        self._saved_tty = None

    def __enter__(self) -> LiveConsole:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
