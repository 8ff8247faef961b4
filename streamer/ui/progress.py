"""``lmc run``'s progress bar on a terminal (Rich's progress display): movies done of the movies
found, particles written, the commit rate and the time left, with one line above it per finished
movie (its pick accounting; yellow when it yielded no particle); fed by the session snapshot
(``on_state``, about once a second). Not a terminal: nothing here runs and the session's plain
log lines go to stderr instead.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from streamer.output.accounting import describe

FINISHED = ("done", "failed", "skipped")


class RunProgress:
    """One Rich progress bar; ``update(snapshot)`` moves it, ``stop()`` leaves it on screen."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]movies"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[particles]} particles  {task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("movies", total=None, particles=0, rate="", note="")
        self._shown: set[tuple[str, float]] = set()

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def update(self, snap: dict[str, Any]) -> None:
        """Move the bar to the snapshot's counts (see ``Session.snapshot``); print newly finished movies."""
        for r in snap.get("recent") or []:
            key = (str(r.get("movie")), float(r.get("time") or 0.0))
            if key in self._shown:
                continue
            self._shown.add(key)
            line = describe(int(r.get("picks") or 0), int(r.get("particles") or 0), r.get("skip_reasons") or {})
            style = "yellow" if not r.get("particles") else ""
            self.progress.console.print(f"done: {key[0]} ({line})", style=style, markup=False, highlight=False)
        counts = snap.get("counts") or {}
        total = sum(int(v) for v in counts.values()) or None
        done = sum(int(counts.get(k, 0)) for k in FINISHED)
        rates = snap.get("rates") or {}
        rate = rates.get("movies_per_hour_recent") or rates.get("movies_per_hour")
        failed = int(counts.get("failed", 0))
        picks = snap.get("picks") or {}
        note = f"[red]{failed} failed[/]" if failed else ""
        if picks.get("movies_without_particles"):
            note += f" [yellow]{picks['movies_without_particles']} without particles[/]"
        self.progress.update(
            self.task, total=total, completed=done, particles=snap.get("particles", 0),
            rate=f"{rate:.0f} movies/h" if rate else "", note=note.strip(),
        )
