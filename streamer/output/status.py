"""``OUT/status.json``: written by the session every few seconds, read by ``lmc status OUT``.

The file holds the session snapshot (the same dict the live console draws; see
``streamer.live.session.Session.snapshot`` for its keys), with the derived fields of
:func:`enrich_snapshot` added once for both. It is replaced atomically, so a reader never sees half a
file. ``render_status`` turns it into plain text for a terminal or a log.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from streamer.errors import UserError
from streamer.output.accounting import describe

STATUS_NAME = "status.json"
STALE_AFTER_S = 20.0  # a running session rewrites the file every few seconds
LOW_DISK_GB = 50.0  # alert when the output folder's file system has less free space than this
PICKS_WAIT_WARN_S = 300.0  # alert when a movie has waited this long for its picks


class StatusError(UserError, ValueError):
    """No readable status file."""


def write_status(out_dir: str | Path, snapshot: dict[str, Any]) -> Path:
    """Atomically replace ``out_dir/status.json`` with ``snapshot``."""
    path = Path(out_dir) / STATUS_NAME
    tmp = path.with_name(f".{STATUS_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(snapshot, indent=1, default=_default, allow_nan=False))
    os.replace(tmp, path)
    return path


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def clean(value: Any) -> Any:
    """NaN/inf -> None, recursively (status.json is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def as_finite(v: Any) -> float | None:
    """``v`` as a finite float; None for None, booleans, non-numbers, NaN and infinities."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_duration(v: Any) -> str:
    """Seconds as ``45s``, ``12m05s``, ``3h02m``, ``2d04h``."""
    f = as_finite(v)
    if f is None or f < 0:
        return "–"
    s = round(f)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def enrich_snapshot(snapshot: dict[str, Any], out_dir: str | Path | None = None, now: float | None = None) -> dict[str, Any]:
    """A copy of ``snapshot`` with what the console shows filled in where the session left it out.

    Adds ``disk_free_gb`` (free space of ``out_dir``'s file system, GB = 1e9 bytes; default
    ``session.out``), ``session.uptime_s`` (from ``session.started``, epoch s), ``rates.backlog``
    (settling + queued + running) and ``rates.eta_s`` (= backlog / recent movie rate), ``trend``
    {motion, quality} (from ``recent``), and recomputes ``alerts``: low disk space (< ``LOW_DISK_GB``)
    and movies waiting longer than ``PICKS_WAIT_WARN_S`` for their picks. Values present are kept;
    applying it twice gives the same result.
    """
    snap = dict(snapshot or {})
    now = time.time() if now is None else now
    session = dict(snap.get("session") or {})
    if as_finite(session.get("uptime_s")) is None and as_finite(session.get("started")) is not None:
        session["uptime_s"] = max(0.0, now - float(session["started"]))
    snap["session"] = session
    out_dir = out_dir if out_dir is not None else session.get("out")
    if as_finite(snap.get("disk_free_gb")) is None and out_dir:
        path = Path(out_dir)
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            snap["disk_free_gb"] = round(shutil.disk_usage(path).free / 1e9, 1)
        except OSError:
            pass
    rates = dict(snap.get("rates") or {})
    backlog = as_finite(rates.get("backlog"))
    if backlog is None:
        counts = snap.get("counts") or {}
        parts = [as_finite(counts.get(k)) for k in ("settling", "queued", "running")]
        if any(p is not None for p in parts):
            backlog = sum(p for p in parts if p is not None)
            rates["backlog"] = int(backlog)
    if as_finite(rates.get("eta_s")) is None:
        rate = as_finite(rates.get("movies_per_hour_recent")) or as_finite(rates.get("movies_per_hour"))
        if backlog == 0:
            rates["eta_s"] = 0.0
        elif backlog is not None and rate:
            rates["eta_s"] = backlog / rate * 3600.0
    snap["rates"] = rates
    trend = dict(snap.get("trend") or {})
    recent = snap.get("recent") or []
    trend.setdefault("motion", [r.get("motion_total_A") for r in recent])
    trend.setdefault("quality", [r.get("quality_gain") for r in recent])
    snap["trend"] = trend
    alerts: list[str] = []
    free = as_finite(snap.get("disk_free_gb"))
    if free is not None and free < LOW_DISK_GB:
        alerts.append(f"low disk space: {free:.1f} GB free in the output folder")
    for w in snap.get("waiting") or []:
        seconds = as_finite(w.get("seconds"))
        if w.get("state") == "waiting_picks" and seconds is not None and seconds >= PICKS_WAIT_WARN_S:
            alerts.append(f"{os.path.basename(str(w.get('movie')))}: waiting {fmt_duration(seconds)} for picks")
    snap["alerts"] = alerts
    return snap


def read_status(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / STATUS_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StatusError(f"{path}: no status file (has `lmc watch` run with this --out?)") from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"{path}: unreadable status file ({exc})") from None
    if not isinstance(data, dict):
        raise StatusError(f"{path}: not a status file")
    return data


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or isinstance(v, bool):
        return "-"
    if isinstance(v, (int, float)):
        return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"
    return str(v)


def _dur(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        return "-"
    s = round(v)
    if s < 60:
        return f"{v:.1f}s" if v < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render_status(snap: dict[str, Any], now: float | None = None) -> str:
    """Plain-text view of a snapshot (what ``lmc status OUT`` prints)."""
    now = time.time() if now is None else now
    session = snap.get("session") or {}
    counts = snap.get("counts") or {}
    rates = snap.get("rates") or {}
    lines: list[str] = []
    phase = str(snap.get("phase", "?"))
    age = now - float(snap.get("time", now))
    state = phase
    if phase in ("running", "draining", "starting") and age > STALE_AFTER_S:
        state = f"{phase}?  (not updated for {_dur(age)}: the session may have stopped or crashed)"
    command = f"lmc {session.get('command') or 'watch'}" + (" --once" if session.get("once") and session.get("command") != "run" else "")
    lines.append(f"{command}  {state}   updated {_dur(age)} ago   up {_dur(session.get('uptime_s'))}")
    for key in ("movies", "picks", "out"):
        lines.append(f"  {key:<7}{session.get(key) or '-'}")
    if snap.get("paused"):
        lines.append("  dispatch PAUSED")
    order = ("seen", "settling", "incomplete", "waiting_picks", "queued", "running", "done", "failed", "skipped")
    lines.append("movies   " + "  ".join(f"{k} {counts.get(k, 0)}" for k in order))
    totals = snap.get("totals") or {}
    lines.append(
        f"output   {_fmt(snap.get('particles'))} particles in {_fmt(snap.get('stacks'))} stacks; "
        f"folder totals: {totals.get('done', '-')} done, {totals.get('failed', '-')} failed, "
        f"{totals.get('skipped', '-')} skipped"
    )
    picks = snap.get("picks") or {}
    if picks:
        lines.append("picks    " + describe(int(picks.get("picks") or 0), int(picks.get("particles") or 0),
                                             picks.get("skip_reasons") or {})
                     + f" (this run, {picks.get('movies', 0)} movies; {picks.get('movies_without_particles', 0)} without particles)")
    lines.append(
        f"rates    {_fmt(rates.get('movies_per_hour'), 0)} movies/h (recent {_fmt(rates.get('movies_per_hour_recent'), 0)}), "
        f"{_fmt(rates.get('particles_per_s'))} particles/s; latency ready->committed "
        f"median {_dur(rates.get('latency_median_s'))}, p95 {_dur(rates.get('latency_p95_s'))}; "
        f"backlog {_fmt(rates.get('backlog'))}"
    )
    workers = snap.get("workers") or []
    lines.append(f"workers  {len(workers)}")
    for w in workers:
        job = f"{Path(str(w['movie'])).name} ({_dur(w.get('job_seconds'))})" if w.get("movie") else w.get("state", "idle")
        mem = f", GPU mem {w['gpu_mem_mb'] / 1024:.1f} GB" if isinstance(w.get("gpu_mem_mb"), (int, float)) else ""
        lines.append(
            f"  {w.get('name', '?'):<16} {w.get('device', '?'):<6} done {w.get('done', 0):<5} "
            f"{_fmt(w.get('mean_s'))} s/movie{mem}  {job}"
        )
    lines += _slurm_lines(snap.get("slurm") or {}, phase)
    waiting = snap.get("waiting") or []
    if waiting:
        lines.append("waiting")
        for e in waiting[:10]:
            lines.append(f"  {e.get('state', ''):<14}{_dur(e.get('seconds')):>8}  {e.get('movie')}  {e.get('reason') or ''}".rstrip())
    recent = snap.get("recent") or []
    if recent:
        lines.append("recent (newest last)")
        for r in recent[-10:]:
            lines.append(
                f"  {Path(str(r.get('movie'))).name:<40} {_fmt(r.get('particles')):>6} particles "
                f"of {_fmt(r.get('picks'))} picks  "
                f"motion {_fmt(r.get('motion_total_A'))} Å  local {_fmt(r.get('local_mean_A'), 2)} Å  "
                f"quality {_fmt(r.get('quality_gain'), 4)}  "
                f"{_dur(r.get('seconds'))}"
            )
    errors = snap.get("errors") or []
    if errors:
        lines.append(f"errors ({len(errors)})")
        lines += [f"  {e.get('reason', e) if isinstance(e, dict) else e}" for e in errors[-10:]]
    alerts = snap.get("alerts") or []
    if alerts:
        lines.append("alerts")
        lines += [f"  {a}" for a in alerts]
    if snap.get("disk_free_gb") is not None:
        lines.append(f"disk     {_fmt(snap.get('disk_free_gb'))} GB free in the output folder")
    warnings = snap.get("warnings") or []
    if warnings:
        lines.append(f"warnings ({len(warnings)})")
        lines += [f"  {w}" for w in warnings[-10:]]
    return "\n".join(lines) + "\n"


def _slurm_lines(slurm: dict[str, Any], phase: str) -> list[str]:
    """The Slurm worker jobs: one line each (job id, state, node, GPUs, movies done)."""
    if not slurm.get("wanted"):
        return []
    jobs = slurm.get("jobs") or []
    if phase in ("finished", "aborted") and not jobs:
        return [f"slurm    {slurm['wanted']} worker jobs wanted; all cancelled when the session ended "
                f"({slurm.get('ended', 0)} ended and were replaced during it)"]
    lines = [f"slurm    {len(jobs)} of {slurm['wanted']} worker jobs; {slurm.get('ended', 0)} ended and replaced so far"]
    for j in jobs:
        state = str(j.get("state"))
        if j.get("reason"):
            state += f" ({j['reason']})"
        where = f" on {j['node']}" if j.get("node") else ""
        gpu = f" GPU {j['gpus']}" if j.get("gpus") else ""
        since = f" for {_dur(j.get('waited_s'))}" if j.get("waited_s") is not None else ""
        lines.append(f"  job {j.get('job_id'):<10} {state}{since}{where}{gpu}  done {j.get('done', 0)}"
                     f"{'  ' + Path(str(j['movie'])).name if j.get('movie') else ''}")
    if slurm.get("alert"):
        lines.append(f"  ! {slurm['alert']}")
    return lines


def print_status(out_dir: str | Path, as_json: bool = False) -> int:
    """``lmc status OUT``: print the status for a human (or the raw JSON); 1 when there is none."""
    try:
        snap = read_status(out_dir)
    except StatusError as exc:
        print(f"lmc status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(snap, indent=1))
    else:
        sys.stdout.write(render_status(snap))
    return 0
