"""A microscope in a folder: a simulated session written over time, the way EPU and a picker write it.

Movie ``i`` starts ``i * interval_s`` after the start (or as soon as the previous one is out, when
rendering is slower). It is written under its *final* name from the first byte, growing chunk by
chunk with a pause after each (EPU does not use temporary names, so a watcher has to decide when a
file is whole). Its pick file appears ``picks_delay_s`` after the movie is complete (atomically, as
pickers write them), and its ground truth goes to ``truth/`` (not watched) at the same time.

Layout, as ``lmc simulate`` (streamer/sim/simulate.py): ``movies/``, ``picks/``, ``truth/``, the gain
reference and ``session.json`` (written first, listing the whole plan and the recommended lmc settings).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamer.errors import ConfigError
from streamer.sim import simulate
from streamer.sim.simulate import SimParams

EventCallback = Callable[[str, int, Path], None]


@dataclass(frozen=True)
class Timing:
    """When things appear. ``chunk_s`` is the pause after each chunk of ``chunk_frames`` frames, so a
    movie takes about ``ceil(F / chunk_frames) * chunk_s`` to write."""

    interval_s: float = 6.0
    chunk_frames: int = 4
    chunk_s: float = 0.3
    picks_delay_s: float = 3.0

    def __post_init__(self) -> None:
        if min(self.interval_s, self.chunk_s, self.picks_delay_s) < 0 or self.chunk_frames < 1:
            raise ConfigError("emulator: times must be >= 0 and chunk_frames >= 1")


class EmulatorStopped(Exception):
    """Raised inside the writing loop when :meth:`MicroscopeEmulator.stop` was called."""


class MicroscopeEmulator:
    """Writes ``params.movies`` simulated movies into ``dest`` over time (module docstring).

    ``on_event(kind, index, path)`` runs (in the emulator's threads) for ``"movie_started"``,
    ``"movie_written"``, ``"picks_written"`` and, with index -1, ``"finished"``.
    ``run()`` writes synchronously; ``start()`` runs it in a background thread (``join``,
    ``finished``, ``error``). ``stop()`` ends early, leaving a partial movie as an aborted
    acquisition would.
    """

    def __init__(self, dest: str | Path, params: SimParams, timing: Timing | None = None,
                 on_event: EventCallback | None = None) -> None:
        self.dest = Path(dest)
        self.params = params
        self.timing = timing or Timing()
        self.on_event = on_event
        self.movies_dir = self.dest / "movies"
        self.picks_dir = self.dest / "picks"
        self.truth_dir = self.dest / "truth"
        self.events: list[tuple[float, str, int, str]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._prepared = False

    # -- public ---------------------------------------------------------------------------------
    def movie_path(self, index: int) -> Path:
        return self.movies_dir / simulate.movie_filename(self.params, index)

    @property
    def finished(self) -> bool:
        """True once every movie and pick file is written (or the run stopped / failed)."""
        return self._finished.is_set()

    def counts(self) -> dict[str, int]:
        """How many movies / pick files are complete so far."""
        with self._lock:
            kinds = [e[1] for e in self.events]
        return {"movies": kinds.count("movie_written"), "picks": kinds.count("picks_written")}

    def prepare(self) -> Path:
        """Create the folders, the gain reference and ``session.json`` (the plan). Idempotent."""
        if self._prepared:
            return self.dest
        for sub in (self.movies_dir, self.picks_dir, self.truth_dir):
            sub.mkdir(parents=True, exist_ok=True)
        gain = simulate.write_gain(self.dest, self.params)
        p = self.params
        recommended = simulate.recommended_settings(p, gain.name)
        movies = [{"movie": f"movies/{simulate.movie_filename(p, i)}",
                   "truth": f"truth/{simulate.file_stem(simulate.movie_filename(p, i))}.npz",
                   "particles": int(p.particles)} for i in range(p.movies)]
        info = {"params": p.to_dict(), "movies": movies, "recommended": recommended,
                "reference_frame": p.reference_frame, "emulator": asdict(self.timing)}
        (self.dest / "session.json").write_text(json.dumps(info, indent=2) + "\n")
        self._prepared = True
        return self.dest

    def run(self) -> Path:
        """Write the whole session over time; returns ``dest``. Re-raises a failure after cleanup."""
        try:
            self.prepare()
            self._t0 = time.monotonic()
            for i in range(self.params.movies):
                counts, truth = simulate.render_movie(self.params, i)
                self._wait_until(self._t0 + i * self.timing.interval_s)
                self._write_movie(i, counts, truth)
            with self._lock:
                timers = list(self._timers)
            for t in timers:
                while t.is_alive() and not self._stop.is_set():
                    t.join(0.1)
            self._emit("finished", -1, self.dest)
        except EmulatorStopped:
            pass
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._cancel_timers()
            self._finished.set()
        return self.dest

    def start(self) -> MicroscopeEmulator:
        """Run in a daemon thread (a failure is kept in ``error``)."""
        self.prepare()

        def target() -> None:
            try:
                self.run()
            except BaseException:  # kept in self.error for the caller
                pass

        self._thread = threading.Thread(target=target, name="lmc-emulator", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the end; True when finished."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.finished

    def stop(self) -> None:
        self._stop.set()
        self._cancel_timers()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10.0)

    # -- internals ------------------------------------------------------------------------------
    def _emit(self, kind: str, index: int, path: Path) -> None:
        with self._lock:
            self.events.append((time.monotonic() - self._t0, kind, index, str(path)))
        if self.on_event is not None:
            self.on_event(kind, index, path)

    def _wait_until(self, when: float) -> None:
        if self._stop.wait(max(0.0, when - time.monotonic())):
            raise EmulatorStopped

    def _write_movie(self, index: int, counts: np.ndarray, truth: dict[str, Any]) -> None:
        p, path = self.params, self.movie_path(index)
        self._emit("movie_started", index, path)

        def pause(done: int, total: int) -> None:
            if self._stop.is_set():
                raise EmulatorStopped
            if done < total:
                self._wait_until(time.monotonic() + self.timing.chunk_s)

        simulate.write_movie(path, counts, p.format, pause, apix=p.apix, eer_raw_per_frame=p.eer_raw_per_frame,
                             eer_leftover=p.eer_leftover, seed=p.seed * 100_003 + index,
                             chunk_frames=self.timing.chunk_frames)
        self._emit("movie_written", index, path)
        timer = threading.Timer(self.timing.picks_delay_s, self._write_picks, args=(index, truth))
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def _write_picks(self, index: int, truth: dict[str, Any]) -> None:
        if self._stop.is_set():
            return
        stem = simulate.file_stem(simulate.movie_filename(self.params, index))
        np.savez(self.truth_dir / f"{stem}.npz", **truth)
        path = simulate.write_picks(self.picks_dir, self.params, index, truth)
        self._emit("picks_written", index, path)

    def _cancel_timers(self) -> None:
        if not self._stop.is_set():
            return
        with self._lock:
            timers = list(self._timers)
        for t in timers:
            t.cancel()
