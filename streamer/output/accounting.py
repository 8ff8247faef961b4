"""Every pick accounted for: picks read = particles written + picks skipped, each skip with its reason.

A movie's result records ``n_picks``, ``n_particles`` and ``skip_reasons`` (``{reason: count}``:
"outside the WxH frame", "negative coordinate", "NaN coordinate", "duplicate of an earlier pick"
from reading; the extractor's edge reasons, e.g. the box leaving the frame). ``PickAccount`` adds
movies up (this run, or a whole output folder from its ledger) and says it in one line, for the
log, the run summary, ``status.json``, ``lmc status`` and the console.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


class PickAccount:
    """Running totals of picks, particles and skip reasons over movies."""

    def __init__(self) -> None:
        self.movies = 0
        self.picks = 0
        self.particles = 0
        self.skipped: Counter[str] = Counter()
        self.empty_movies = 0  # movies that yielded no particle

    def add(self, stats: Mapping[str, Any]) -> None:
        """Add one movie's ``stats`` (a MovieResult's or a ledger row's)."""
        n = int(stats.get("n_particles") or 0)
        self.movies += 1
        self.picks += int(stats.get("n_picks") or 0)
        self.particles += n
        self.skipped.update({str(k): int(v) for k, v in (stats.get("skip_reasons") or {}).items()})
        self.empty_movies += n == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "movies": self.movies,
            "picks": self.picks,
            "particles": self.particles,
            "skipped": sum(self.skipped.values()),
            "skip_reasons": dict(self.skipped.most_common()),
            "movies_without_particles": self.empty_movies,
        }

    def line(self) -> str:
        """``"12 picks: 3 particles, 9 skipped (8 outside the 640x640 frame, 1 NaN coordinate)"``."""
        return describe(self.picks, self.particles, self.skipped)


def describe(picks: int, particles: int, reasons: Mapping[str, int]) -> str:
    skipped = sum(reasons.values())
    text = f"{picks} picks: {particles} particles, {skipped} skipped"
    if skipped:
        text += " (" + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])) + ")"
    return text


def movie_line(stats: Mapping[str, Any]) -> str:
    """One movie's accounting line (see ``describe``)."""
    return describe(int(stats.get("n_picks") or 0), int(stats.get("n_particles") or 0), stats.get("skip_reasons") or {})


def no_particle_warning(movie: str, stats: Mapping[str, Any]) -> str | None:
    """The warning for a movie that yields no particle (None when it yields some)."""
    if int(stats.get("n_particles") or 0) > 0:
        return None
    if not int(stats.get("n_picks") or 0):
        return f"{movie}: no particle: the pick file holds no picks for it"
    return f"{movie}: no particle: {movie_line(stats)}"


def folder_account(stats_rows: Iterable[Mapping[str, Any]]) -> PickAccount:
    """The account of an output folder from its done movies' stats (``Ledger.rows``)."""
    acc = PickAccount()
    for stats in stats_rows:
        acc.add(stats)
    return acc
