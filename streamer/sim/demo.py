"""``lmc demo``: a synthetic session arriving over time, processed live, scored against its ground truth.

DIR/scope/ is the microscope (streamer/sim/emulator.py writes movies in chunks every few seconds, picks a
little later); DIR/lmc/ is the output of ``lmc watch`` running on it with the console (or headless).
The session is asked to drain and stop once every movie has been processed.

Quality against the ground truth: the particles the session wrote (local correction) and the same
picks extracted with full-frame motion only are each compared with the simulation's noise-free
particle images (``streamer.sim.simulate.truth_particles``, shifted to the pick's offset from the true
centre). The score is the Fourier ring correlation pooled over all particles (``gpu.quality``),
``FRC(k) = Σ Re(X Y*) / sqrt(Σ|X|² Σ|Y|²)`` over the rings of frequency ``k``, averaged over the band
50–6 Å; the gain is local minus full-frame. An isotropic filter on the reference (radiation damage,
which the truth images lack) scales each ring and cancels in the ratio; both extractions use the same
exposure weighting and normalisation, so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpu.quality import band_frc, image_ring_sums
from streamer import config as config_mod
from streamer.config import Config
from streamer.errors import ConfigError
from streamer.sim.emulator import MicroscopeEmulator, Timing
from streamer.sim.simulate import SimParams

DEFAULT_PARAMS = SimParams(movies=6, frames=30, shape=(1024, 1024), particles=40, seed=1)
# the smallest movies whose full-frame motion is still well determined (256² x 10 frames is not)
FAST_PARAMS = SimParams(movies=2, frames=16, shape=(512, 512), particles=8, edge_particles=1, junk_picks=1,
                        mass_kda=100.0, seed=1)
DEFAULT_TIMING = Timing(interval_s=8.0, chunk_frames=4, chunk_s=0.4, picks_delay_s=3.0)
FAST_TIMING = Timing(interval_s=1.0, chunk_frames=4, chunk_s=0.1, picks_delay_s=0.5)
BAND_A = (50.0, 6.0)  # resolution band of the truth score (Å): where residual local motion costs signal


# -- configuration -------------------------------------------------------------------------------


def demo_config(scope: Path, out: Path, fast: bool) -> Config:
    """The lmc settings for the emulated session: its recommended values plus quick live timings."""
    info = json.loads((scope / "session.json").read_text())
    settings: dict[str, Any] = json.loads(json.dumps(info["recommended"]))  # config.yaml-shaped
    settings["gain"]["file"] = str(scope / settings["gain"]["file"])
    settings.setdefault("picks", {})["dir"] = str(scope / "picks")
    settings.update({
        "movies": str(scope / "movies" / "*"),
        "out": str(out),
        # the emulator pauses 0.1-0.4 s between chunks: a file unchanged for 1.5 s is finished
        "settle_seconds": 0.8 if fast else 1.5,
        "poll": 0.5 if fast else 1.0,
    })
    return config_mod.from_dict(settings)


def _prepare_dir(path: str | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="lmc-demo-"))
    root = Path(path).expanduser().resolve()
    for sub in ("scope", "lmc"):
        if (root / sub).exists() and any((root / sub).iterdir()):
            raise ConfigError(f"{root}: already holds a demo ({sub}/ is not empty); give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    return root


# -- finishing the live session --------------------------------------------------------------------


class _Finisher:
    """Asks the session to drain and quit once the emulator is done and every movie reached a final state."""

    def __init__(self, emu: MicroscopeEmulator, n_movies: int, controls: Any, out: Path, timeout_s: float,
                 forward: Callable[[dict[str, Any]], None] | None) -> None:
        self.emu, self.n, self.controls, self.out, self.forward = emu, n_movies, controls, out, forward
        self.deadline = time.monotonic() + timeout_s
        self.snapshot: dict[str, Any] = {}
        self.timed_out = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmc-demo-finisher", daemon=True)

    def on_state(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        if self.forward is not None:
            self.forward(snapshot)
        self._check()

    def terminal(self) -> int:
        snap = self.snapshot
        if not snap:
            try:  # the session writes the same snapshot to status.json
                snap = json.loads((self.out / "status.json").read_text())
            except (OSError, ValueError):
                return 0
        counts = snap.get("counts") or {}
        return sum(int(counts.get(k) or 0) for k in ("done", "failed", "skipped"))

    def _check(self) -> None:
        if self.controls.quit_requested:
            return
        if self.emu.finished and (self.emu.error is not None or self.terminal() >= self.n):
            self.controls.request_quit()
        elif time.monotonic() > self.deadline:
            self.timed_out = True
            self.controls.request_quit()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._check()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


# -- the score against the ground truth ----------------------------------------------------------------


def truth_references(scope: Path, movie: str, x: np.ndarray, y: np.ndarray, box: int, out_apix: float,
                     apix: float) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free images of the particles picked at ``(x, y)`` (movie px), as the extraction centred on
    each pick should see them, and the boolean mask of picks that are true particles (not junk).

    Returns ``(refs (m, box, box), keep (n,))``: the truth image of each kept pick shifted by
    ``(true centre - pick) / (out_apix / apix)`` px.
    """
    from gpu.shift import fourier_shift
    from streamer.sim.score import pick_ids
    from streamer.sim.simulate import load_truth, truth_particles

    truth = load_truth(scope, movie)
    xy = np.stack([x, y], -1).astype(np.float64)
    ids = pick_ids(xy, truth, 0.5)
    keep = ids >= 0
    if not keep.any():
        return np.zeros((0, box, box), np.float32), keep
    refs = truth_particles(scope, movie, box, out_apix, ids=ids[keep])
    offset = (truth["positions"][ids[keep]] - xy[keep]) * (apix / out_apix)
    return fourier_shift(refs, offset), keep


def read_written(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{micrograph: (images (n, b, b), x (n,), y (n,))}`` from ``particles.star`` and its stacks."""
    import starfile

    from streamer.formats import mrcstack

    star = out / "particles.star"
    if not star.is_file():
        return {}
    table = starfile.read(star, always_dict=True).get("particles")
    if table is None or len(table) == 0:
        return {}
    where = table["rlnImageName"].str.split("@", n=1, expand=True)
    table = table.assign(_idx=where[0].astype(int) - 1, _stack=where[1])
    cache: dict[str, np.ndarray] = {}
    out_map: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for mic, rows in table.groupby("rlnMicrographName", sort=False):
        imgs = []
        for stack, idx in zip(rows["_stack"], rows["_idx"], strict=True):
            if stack not in cache:
                cache[stack] = mrcstack.read(out / stack)
            imgs.append(cache[stack][idx])
        out_map[str(mic)] = (np.stack(imgs).astype(np.float32), rows["rlnCoordinateX"].to_numpy(float),
                             rows["rlnCoordinateY"].to_numpy(float))
    return out_map


def score_against_truth(scope: Path, out: Path, cfg: Config, baseline: bool = True) -> dict[str, Any]:
    """FRC-vs-truth of the written particles and (``baseline``) of full-frame-only extraction of the same
    movies: ``{"particles", "frc_local", "frc_fullframe", "gain", "band_A"}`` (module docstring)."""
    from streamer.formats.picks import movie_stem
    from streamer.pipeline import process_movie

    written = read_written(out)
    n_rings = 0
    local = full = None
    count = 0
    ff_cfg = dataclasses.replace(cfg, local=dataclasses.replace(cfg.local, enabled=False), plots=False)
    movies = {movie_stem(p): p for p in sorted((scope / "movies").iterdir())}
    for mic, (imgs, x, y) in written.items():
        stem = movie_stem(mic)
        refs, keep = truth_references(scope, stem, x, y, imgs.shape[-1], cfg.out_apix, cfg.apix)
        if not keep.any():
            continue
        s = image_ring_sums(imgs[keep], refs, cfg.out_apix, BAND_A)
        n_rings = s.shape[1]
        local = s if local is None else local + s
        count += int(keep.sum())
        if baseline and stem in movies:
            res = process_movie(ff_cfg, str(movies[stem]), write_sidecars=False)
            fref, fkeep = truth_references(scope, stem, res.x, res.y, res.particles.shape[-1], cfg.out_apix, cfg.apix)
            if fkeep.any():
                fs = image_ring_sums(res.particles[fkeep], fref, cfg.out_apix, BAND_A)
                full = fs if full is None else full + fs
    result: dict[str, Any] = {"particles": count, "band_A": list(BAND_A), "frc_local": None, "frc_fullframe": None,
                              "gain": None, "rings": n_rings}
    if local is not None:
        result["frc_local"] = round(band_frc(local), 4)
    if full is not None:
        result["frc_fullframe"] = round(band_frc(full), 4)
    if result["frc_local"] is not None and result["frc_fullframe"] is not None:
        result["gain"] = round(result["frc_local"] - result["frc_fullframe"], 4)
    return result


# -- the command ------------------------------------------------------------------------------------


def _params(ns: argparse.Namespace) -> tuple[SimParams, Timing]:
    fast = bool(getattr(ns, "fast", False))
    params, timing = (FAST_PARAMS, FAST_TIMING) if fast else (DEFAULT_PARAMS, DEFAULT_TIMING)
    movies = getattr(ns, "movies", None)
    if movies is not None:
        if int(movies) < 1:
            raise ConfigError(f"demo: --movies must be >= 1 (got {movies})")
        params = dataclasses.replace(params, movies=int(movies))
    return params, timing


def _count_stacks(out: Path) -> int:
    return len(list((out / "stacks").glob("*.mrcs"))) if (out / "stacks").is_dir() else 0


def _fmt_duration(s: float) -> str:
    s = round(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def summary_lines(root: Path, out: Path, summary: dict[str, Any], score: dict[str, Any] | None, elapsed: float,
                  reference_free: float | None) -> list[str]:
    """The text printed at the end of the demo."""
    plots = sorted((out / "plots").glob("*.png")) if (out / "plots").is_dir() else []
    lines = [
        f"lmc demo finished in {_fmt_duration(elapsed)}  ({root})",
        f"  movies     {summary.get('done', 0)} done, {summary.get('failed', 0)} failed, "
        f"{summary.get('skipped', 0)} skipped  (from {root / 'scope' / 'movies'})",
        f"  particles  {summary.get('particles', 0)} in {_count_stacks(out)} stack file(s)  ({out / 'stacks'})",
        f"  metadata   {out / 'particles.star'}  and  {out / 'particles.cs'}",
        f"  plots      {len(plots)} trajectory plots in {out / 'plots'}",
        f"  status     {out / 'status.json'}   (lmc status {out})",
    ]
    for movie, reason in summary.get("failures", []) or []:
        lines.append(f"  failed     {reason if str(movie) in str(reason) else f'{movie}: {reason}'}")
    if score and score.get("frc_local") is not None:
        lo, hi = score["band_A"]
        lines.append(f"  quality against the simulation's ground truth (FRC {lo:g}–{hi:g} Å, {score['particles']} particles):")
        if score.get("frc_fullframe") is not None:
            rel = score["gain"] / score["frc_fullframe"] * 100 if score["frc_fullframe"] else float("nan")
            lines.append(f"      full-frame motion only   {score['frc_fullframe']:.4f}")
            lines.append(f"      local (as written)       {score['frc_local']:.4f}   gain {score['gain']:+.4f} ({rel:+.1f} %)")
        else:
            lines.append(f"      local (as written)       {score['frc_local']:.4f}")
    if reference_free is not None:
        lines.append(f"  reference-free estimate during the session (held-out gain, mean): {reference_free:+.4f}")
    return lines


def _reference_free(out: Path, last: dict[str, Any]) -> float | None:
    values = [r.get("quality_gain") for r in (last.get("recent") or [])]
    finite = [float(v) for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def run_demo(ns: argparse.Namespace) -> int:
    """Run the demo (module docstring); returns the exit status (0 when every movie was processed)."""
    from streamer.live.session import run_session

    params, timing = _params(ns)
    fast = bool(getattr(ns, "fast", False))
    root = _prepare_dir(getattr(ns, "dir", None))
    scope, out = root / "scope", root / "lmc"
    headless = bool(getattr(ns, "headless", False)) or not sys.stdout.isatty()

    def note(kind: str, index: int, path: Path) -> None:
        if headless and kind in ("movie_written", "picks_written"):
            print(f"[scope] {'movie' if kind == 'movie_written' else 'picks'} {path.name}", flush=True)

    emu = MicroscopeEmulator(scope, params, timing, on_event=note)
    emu.prepare()
    cfg = demo_config(scope, out, fast)
    print(f"lmc demo: {params.movies} movies of {params.shape[1]}x{params.shape[0]} x {params.frames} frames, "
          f"~{params.particles} particles each, arriving every {timing.interval_s:g} s into {scope}", flush=True)

    console = None
    if not headless:
        from streamer.ui.console import LiveConsole

        console = LiveConsole(cfg)
        controls: Any = console.controls
    else:
        from streamer.ui.console import Controls

        controls = Controls()
    budget = 120.0 + params.movies * (timing.interval_s + 60.0)
    finisher = _Finisher(emu, params.movies, controls, out, budget, console.update if console else None)
    t0 = time.monotonic()
    summary: dict[str, Any] = {}
    try:
        emu.start()
        finisher.start()
        if console is not None:
            console.start()
        try:
            summary = run_session(cfg, once=False, headless=headless, new=False, on_state=finisher.on_state,
                                  controls=controls)
        finally:
            if console is not None:
                console.stop()
    finally:
        finisher.stop()
        emu.stop()
    elapsed = time.monotonic() - t0
    if emu.error is not None:
        print(f"lmc demo: the emulator failed: {emu.error}", file=sys.stderr)
    if finisher.timed_out:
        print(f"lmc demo: stopped after {budget:.0f} s with movies still unprocessed", file=sys.stderr)
    score = None
    if (summary.get("particles") or 0) > 0:
        print("scoring the particles against the ground truth (and a full-frame-only extraction for comparison)…",
              flush=True)
        score = score_against_truth(scope, out, cfg)
    for line in summary_lines(root, out, summary, score, elapsed, _reference_free(out, finisher.snapshot)):
        print(line)
    if score is not None:
        (out / "demo_quality.json").write_text(json.dumps(score, indent=2) + "\n")
    ok = emu.error is None and not finisher.timed_out and int(summary.get("done", 0) or 0) == params.movies
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m streamer.sim.demo [DIR] [--movies N] [--fast] [--headless]`` (same as ``lmc demo``)."""
    p = argparse.ArgumentParser(prog="lmc demo")
    p.add_argument("dir", nargs="?", default=None)
    p.add_argument("--movies", type=int, default=None)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--headless", action="store_true")
    return run_demo(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
