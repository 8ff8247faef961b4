"""What the session expects back from one movie job (``protocol.ResultSpec``), read by the session itself.

The session reads the movie's header (frame count) and its pick file (rows for this movie, carried
columns with their kinds) with the same readers the workers use, so a worker's result can be checked
against facts the worker did not supply: particles + skipped picks = the pick file's rows, the
carried columns exactly those of the pick file that the output folder carries, at most the movie's
frames, and a message no larger than that content needs (``protocol.result_limit``).
"""

from __future__ import annotations

import os

from streamer.config import Config
from streamer.errors import ConfigError, InputError
from streamer.formats.columns import ColumnSet, text_problem
from streamer.formats.picks import pick_summary
from streamer.live.protocol import ResultSpec, result_limit

# the socket refuses any single frame larger than this (ZeroMQ's limit is per socket, not per job);
# a job whose particles or trajectories would need a larger array is refused before processing
MAX_FRAME_BYTES = 2 << 30


class JobRefused(InputError):
    """The movie cannot be processed as the session is configured (one line, naming the file)."""


def total_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg: Config, movie: str, frames: int, h: int, w: int) -> None:
    """ConfigError when the configuration cannot work for this movie at all: a box (or alignment box)
    larger than the frame, or a movie whose float32 frames alone exceed this machine's memory.
    ``frames, h, w``: the file's header (:func:`streamer.formats.movies.movie_header`); an EER header
    counts raw frames, which are summed into at most ``eer.fractions`` frames on a grid
    ``eer.upsampling`` times finer per axis."""
    for name, size in (("box", cfg.box), ("local.align_box", cfg.local.align_box)):
        if size > min(h, w):
            raise ConfigError(f"config: {name} = {size} px does not fit {movie} ({w} x {h} px); "
                              f"choose a {name} below {min(h, w)} (`lmc boxsize` suggests one)")
    memory = total_memory()
    eer = movie.lower().endswith(".eer")
    n, u = (min(frames, cfg.eer.fractions), cfg.eer.upsampling) if eer else (frames, 1)
    need = n * (h * u) * (w * u) * 4
    if memory and need > memory:
        what = f"{n} fractions at eer.upsampling {u}" if eer else f"{n} frames"
        raise ConfigError(f"config: {movie} needs {need / 2**30:.1f} GiB as float32 frames ({what}), more than "
                          f"this machine's {memory / 2**30:.1f} GiB of memory")


def job_spec(cfg: Config, movie: str, picks: object, columns: ColumnSet) -> ResultSpec:
    """The ResultSpec for ``movie`` whose picks are the PickSource ``picks`` (JobRefused, PicksError or
    MovieError say why this movie cannot run; ConfigError that the configuration cannot work)."""
    from streamer.formats.movies import movie_header

    problem = text_problem(movie)
    if problem:
        raise JobRefused(f"{movie!r}: this movie name cannot be written to particles.star: {problem}; rename the file")
    n_picks, available = pick_summary(picks)  # type: ignore[arg-type]
    frames, h, w = (int(v) for v in movie_header(movie))
    check_fits(cfg, movie, frames, h, w)
    largest = n_picks * max(4 * cfg.out_box**2, 2 * 8 * frames)
    if largest > MAX_FRAME_BYTES:
        raise JobRefused(f"{getattr(picks, 'path', picks)}: {n_picks} picks for {movie} would need a "
                         f"{largest / 2**30:.1f} GiB message (limit {MAX_FRAME_BYTES / 2**30:.0f} GiB); split the picks")
    expected = columns.expected(available)
    return ResultSpec(
        out_box=cfg.out_box,
        n_picks=n_picks,
        frames=frames,
        apix=None,
        columns=columns,
        expected=expected,
        max_bytes=result_limit(n_picks, cfg.out_box, frames, len(expected)),
    )
