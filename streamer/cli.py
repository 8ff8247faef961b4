"""The ``lmc`` command: run, watch, worker, status, keys, demo, simulate, boxsize.

Every processing flag comes from the config schema (streamer/config.py), so flags and
config.yaml keys share names; the frozen Config is built once here and passed down.

Exit codes of ``lmc run`` and ``lmc watch`` (README "Exit codes"): 0 every movie done (or skipped
for a stated reason, e.g. no picks); 1 some movies failed (listed; a rerun retries them); 2 usage
or input error (bad flag or value, missing file, pixel size or exposure unknown or contradictory);
3 aborted or stopped early (second Ctrl-C/SIGTERM, output disk error, workers dying, or ``lmc run``
stopped before every movie was processed); 130 interrupted before the session started.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from streamer import config as config_mod
from streamer.config import Config
from streamer.errors import ConfigError, is_user_error

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3
EXIT_INTERRUPTED = 130


def version() -> str:
    """The installed lmc version (package metadata), or the source tree's when not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lmc")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cfg(ns: argparse.Namespace, **overrides: Any) -> Config:
    return config_mod.build(ns, **overrides)


def _add_session_flags(p: argparse.ArgumentParser) -> None:
    config_mod.add_config_flags(p)
    p.add_argument("--new", action="store_true", help="refuse nothing: start a new output folder OUT-2, OUT-3, ... if OUT holds other parameters")


def cmd_run(ns: argparse.Namespace) -> int:
    from streamer.live.session import run_session

    cfg = _cfg(ns)
    _need(cfg, "movies", "out")
    progress = None
    if sys.stderr.isatty() and not ns.no_progress:
        from streamer.ui.progress import RunProgress

        progress = RunProgress()
        progress.start()
    try:
        # on a terminal the bar replaces the log lines on stderr (they stay in OUT/logs/lmc.log)
        summary = run_session(cfg, once=True, headless=progress is None, new=ns.new,
                              on_state=progress.update if progress is not None else None, command="run")
    finally:
        if progress is not None:
            progress.stop()
    return _print_summary(summary, run=True)


def cmd_watch(ns: argparse.Namespace) -> int:
    from streamer.live.session import run_session

    cfg = _cfg(ns)
    _need(cfg, "movies", "out")
    headless = ns.headless or ns.no_console or not sys.stdout.isatty()
    on_state = None
    console = None
    if not headless:
        from streamer.ui.console import LiveConsole

        console = LiveConsole(cfg)
        on_state = console.update
    try:
        if console is not None:
            console.start()
        summary = run_session(cfg, once=ns.once, headless=headless, new=ns.new, on_state=on_state,
                              controls=console.controls if console is not None else None, command="watch")
    finally:
        if console is not None:
            console.stop()
    return _print_summary(summary)


def cmd_worker(ns: argparse.Namespace) -> int:
    from streamer.live.worker import worker_main

    cfg = _cfg(ns)
    return int(worker_main(ns.connect, cfg, gpu=ns.gpu, keys=cfg.keys, name=ns.name,
                           orphan_timeout=ns.orphan_timeout) or 0)


def cmd_status(ns: argparse.Namespace) -> int:
    from streamer.output.status import print_status

    return int(print_status(Path(ns.out), as_json=ns.json) or 0)


def cmd_keys(ns: argparse.Namespace) -> int:
    from streamer.live.keys import create_keys

    paths = create_keys(Path(ns.dir))
    for p in paths:
        print(p)
    return 0


def cmd_simulate(ns: argparse.Namespace) -> int:
    from streamer.sim.simulate import SimParams, hard_params, simulate_session

    kwargs: dict[str, Any] = {}
    for name in ("movies", "frames", "particles", "seed", "format", "apix", "dose_per_frame", "mass_kda", "local_A"):
        value = getattr(ns, name)
        if value is not None:
            kwargs[name] = value
    if ns.shape is not None:
        kwargs["shape"] = tuple(ns.shape)
    out = simulate_session(Path(ns.dir), hard_params(**kwargs) if ns.hard else SimParams(**kwargs))
    print(f"synthetic session written to {out}")
    info = json.loads((Path(ns.dir) / "session.json").read_text())
    d = Path(ns.dir)
    print(f"process it with:\n  cd {d} && lmc run --movies movies --picks picks --out lmc {info.get('flags', '')}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from streamer.sim.demo import run_demo

    return int(run_demo(ns) or 0)


def cmd_boxsize(ns: argparse.Namespace) -> int:
    from gpu.boxsize import recommended_box

    # the engine's own checks name its arguments; the user typed flags
    for flag, value in (("--diameter", ns.diameter), ("--resolution", ns.resolution), ("--kv", ns.kv), ("--apix", ns.apix)):
        if not value > 0:
            raise ConfigError(f"boxsize: {flag} must be > 0 (got {value})")
    if not ns.defocus >= 0:
        raise ConfigError(f"boxsize: --defocus must be >= 0 Å (its magnitude; got {ns.defocus})")
    rec = recommended_box(ns.diameter, ns.defocus, ns.resolution, ns.kv, ns.apix)
    for key, value in rec.items():
        print(f"{key}: {value}")
    return 0


def _need(cfg: Config, *names: str) -> None:
    missing = [n for n in names if not getattr(cfg, n)]
    if missing:
        raise ConfigError("missing " + ", ".join("--" + n.replace("_", "-") for n in missing))


def _print_summary(summary: dict[str, Any], run: bool = False) -> int:
    """Print the end-of-session summary (folder totals, this run's pick accounting, failures) and
    return the exit code (module docstring)."""
    from streamer.output.accounting import describe

    print(f"movies done: {summary.get('done', 0)}  failed: {summary.get('failed', 0)}  "
          f"skipped: {summary.get('skipped', 0)}  particles written: {summary.get('particles', 0)}")
    for label, key in (("picks this run", "picks"), ("picks in the folder", "picks_folder")):
        acc = summary.get(key) or {}
        if acc.get("movies"):
            print(f"{label}: {describe(int(acc['picks']), int(acc['particles']), acc.get('skip_reasons') or {})}")
            if acc.get("movies_without_particles"):
                print(f"  warning: {acc['movies_without_particles']} movie(s) yielded no particle")
    for movie, reason in summary.get("failures", []):
        # reasons from the readers already start with the file's path
        print(f"  failed: {reason}" if str(reason).startswith(str(movie)) else f"  failed: {movie}: {reason}")
    if summary.get("out"):
        print(f"output: {summary['out']}")
    if summary.get("aborted"):
        print(f"aborted: {summary.get('reason') or 'stopped'}", file=sys.stderr)
        return EXIT_ABORTED
    if run and summary.get("stopped_early"):
        print(f"stopped before every movie was processed: {summary.get('reason') or 'quit requested'}",
              file=sys.stderr)
        return EXIT_ABORTED
    return EXIT_FAILED if summary.get("failed") else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmc", description="Live per-particle motion correction for cryo-EM")
    parser.add_argument("--version", action="version", version=f"lmc {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="process every movie that has picks, then exit with a summary (exit 0 all done, "
                       "1 some failed, 2 usage error, 3 aborted)")
    _add_session_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal: plain log lines")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("watch", help="watch folders during a session and process movies as they arrive")
    _add_session_flags(p)
    p.add_argument("--once", action="store_true", help="process what is there now, then exit")
    p.add_argument("--headless", action="store_true", help="no console: log lines and OUT/status.json")
    p.add_argument("--no-console", action="store_true", help="same as --headless")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("worker", help="join a dispatcher's worker pool (e.g. from a Slurm job on another node)")
    p.add_argument("--connect", required=True, help="dispatcher address, e.g. tcp://head:5555")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device to pin this worker to")
    p.add_argument("--name", default=None, help="name shown in the session's status (default HOST:PID)")
    p.add_argument("--orphan-timeout", dest="orphan_timeout", type=float, default=0.0, metavar="S",
                   help="exit when no dispatcher has answered for S seconds (batch jobs of a session that died); 0 = never")
    config_mod.add_config_flags(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("status", help="print OUT/status.json for a human")
    p.add_argument("out", help="output folder of a running or finished session")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keys", help="create CurveZMQ keys for a dispatcher bound beyond localhost")
    p.add_argument("dir", help="folder to create the keys in")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("simulate", help="write a realistic synthetic session with ground truth")
    p.add_argument("dir")
    p.add_argument("--movies", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--particles", type=int, help="particles per movie")
    p.add_argument("--seed", type=int)
    p.add_argument("--format", choices=["tiff", "mrc", "mrc.bz2", "eer"])
    p.add_argument("--apix", type=float)
    p.add_argument("--dose-per-frame", dest="dose_per_frame", type=float)
    p.add_argument("--mass-kda", dest="mass_kda", type=float)
    p.add_argument("--local-A", dest="local_A", type=float, help="amplitude of the smooth local motion (Å)")
    p.add_argument("--hard", action="store_true",
                   help="sessions as hard as real held-out data: fast-start drift, doming/shear/mode field, plain ice, "
                        "60 particles on 2048² (streamer.sim.simulate.hard_params)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="a synthetic session arriving over time, processed live")
    p.add_argument("dir", nargs="?", default=None, help="where to put it (default: a temporary folder)")
    p.add_argument("--movies", type=int, default=None)
    p.add_argument("--fast", action="store_true", help="tiny movies, for tests")
    p.add_argument("--headless", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("boxsize", help="Rosenthal & Henderson box size: box >= d + 2 λ Δf / r")
    p.add_argument("--diameter", type=float, required=True, help="particle diameter (Å)")
    p.add_argument("--defocus", type=float, required=True, help="largest defocus (Å; 20000 = 2 µm)")
    p.add_argument("--resolution", type=float, required=True, help="target resolution (Å)")
    p.add_argument("--kv", type=float, default=300.0)
    p.add_argument("--apix", type=float, default=1.0, help="pixel size (Å/px) to express the box in pixels")
    p.set_defaults(func=cmd_boxsize)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except ConfigError as exc:
        print(f"lmc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # one clear line for user-facing errors; tracebacks stay in the log
        if is_user_error(exc):
            print(f"lmc: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
