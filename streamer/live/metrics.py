"""What the session counts and how it publishes it: per-run counts, latencies, recent movies, the
commit rate over the last ten minutes, and the status snapshot handed to the console
(``on_state``, about once a second) and written to ``OUT/status.json`` (every few seconds).

The snapshot's keys are listed in :meth:`streamer.live.session.Session.snapshot`; the derived
fields (disk space, ETA, trend, alerts) are added once, by
:func:`streamer.output.status.enrich_snapshot`, so the console and ``status.json`` agree.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamer.output.accounting import PickAccount, no_particle_warning
from streamer.output.status import enrich_snapshot, write_status

log = logging.getLogger("lmc.session")

STATE_EVERY_S = 1.0
STATUS_EVERY_S = 2.0
RECENT_WINDOW_S = 600.0
KEEP = 50  # recent movies / warnings / errors kept in the snapshot


class Metrics:
    """This run's counts, latencies (movie ready -> committed) and the most recent movies, warnings
    and errors, each bounded however long the session runs."""

    def __init__(self) -> None:
        self.latencies: deque[float] = deque(maxlen=500)
        # commits of the last RECENT_WINDOW_S in one-second buckets [second, movies, particles]: at most
        # RECENT_WINDOW_S + 1 buckets however fast movies come (one entry per movie would grow with the rate)
        self.commits: deque[list[int]] = deque()
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "particles": 0}
        self.recent: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.picks = PickAccount()  # every pick of this run: a particle or a skip with its reason
        self.warnings: deque[str] = deque(maxlen=KEEP)
        self.errors: deque[dict[str, Any]] = deque(maxlen=KEEP)

    def committed(self, movie: str, n: int, stats: dict[str, Any], latency: float, now: float,
                  job_seconds: float | None, worker: str) -> None:
        """A movie's particles were committed at ``now`` (monotonic), ``latency`` s after it was ready;
        ``job_seconds`` (since the worker started it, None if unknown) stands in for the worker's own
        stage timings when the result has none."""
        self.latencies.append(latency)
        second = int(now)
        if self.commits and self.commits[-1][0] == second:
            self.commits[-1][1] += 1
            self.commits[-1][2] += n
        else:
            self.commits.append([second, 1, n])
        self.counts["done"] += 1
        self.counts["particles"] += n
        seconds = sum(v for k, v in stats.items() if k.startswith("seconds_") and isinstance(v, (int, float)))
        self.recent.append({
            "movie": movie,
            "particles": n,
            "picks": stats.get("n_picks"),
            "skipped": stats.get("n_skipped"),
            "skip_reasons": stats.get("skip_reasons") or {},
            "motion_total_A": stats.get("motion_total_A"),
            "motion_early_A": stats.get("motion_early_A"),
            "local_mean_A": stats.get("local_mean_A"),
            "quality_gain": stats.get("quality_gain"),
            "seconds": round(seconds, 2) if seconds else (round(job_seconds, 2) if job_seconds is not None else None),
            "latency_s": round(latency, 3),
            "worker": worker,
            "time": time.time(),
        })
        for w in stats.get("warnings") or []:
            self.warnings.append(f"{Path(movie).name}: {w}")
        self.picks.add(stats)
        empty = no_particle_warning(Path(movie).name, stats)
        if empty is not None:
            self.warnings.append(empty)

    def failed(self, movie: str, reason: str) -> None:
        self.counts["failed"] += 1
        self.error(movie, reason)

    def skipped(self) -> None:
        self.counts["skipped"] += 1

    def error(self, movie: str, reason: str) -> None:
        self.errors.append({"movie": movie, "reason": reason, "time": time.time()})

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def latency_quantiles(self) -> tuple[float | None, float | None]:
        """(median, 95th percentile) of the recent latencies, None before the first commit."""
        lat = sorted(self.latencies)
        if not lat:
            return None, None
        return statistics.median(lat), lat[min(len(lat) - 1, int(0.95 * len(lat)))]

    def rates(self, now: float, uptime: float, backlog: int) -> dict[str, Any]:
        """Throughput over the whole run and over the last ``RECENT_WINDOW_S``, and latencies."""
        cutoff = now - RECENT_WINDOW_S
        while self.commits and self.commits[0][0] + 1 <= cutoff:  # buckets wholly before the window
            self.commits.popleft()
        window = min(RECENT_WINDOW_S, max(uptime, 1e-9))
        median, p95 = self.latency_quantiles()
        return {
            "movies_per_hour": round(self.counts["done"] / max(uptime, 1e-9) * 3600, 1),
            "movies_per_hour_recent": round(sum(b[1] for b in self.commits) / window * 3600, 1),
            "particles_per_s": round(self.counts["particles"] / max(uptime, 1e-9), 2),
            "particles_per_s_recent": round(sum(b[2] for b in self.commits) / window, 2),
            "latency_median_s": round(median, 3) if median is not None else None,
            "latency_p95_s": round(p95, 3) if p95 is not None else None,
            "latency_last_s": round(self.latencies[-1], 3) if self.latencies else None,
            "backlog": backlog,
        }


class StatusPublisher:
    """Hands each snapshot, enriched once, to ``on_state`` and (every ``STATUS_EVERY_S``) to
    ``OUT/status.json``. A failing callback or an unwritable status file is logged, never fatal."""

    def __init__(self, on_state: Callable[[dict[str, Any]], None] | None) -> None:
        self.on_state = on_state
        self.next_state = 0.0
        self.next_status = 0.0

    def due(self, now: float) -> bool:
        """True about once a second (then the session builds a snapshot and calls :meth:`publish`)."""
        if now < self.next_state:
            return False
        self.next_state = now + STATE_EVERY_S
        return True

    def publish(self, snapshot: dict[str, Any], out: Path, now: float, force: bool = False) -> None:
        snap = enrich_snapshot(snapshot, out)
        if self.on_state is not None:
            try:
                self.on_state(snap)
            except Exception:
                log.exception("on_state callback failed")
        if force or now >= self.next_status:
            self.next_status = now + STATUS_EVERY_S
            try:
                write_status(out, snap)
            except OSError as exc:
                log.warning("%s: cannot write status.json: %s", out, exc)
