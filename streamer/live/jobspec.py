"""What the session expects back from one movie job (``protocol.ResultSpec``), read by the session itself.

The session reads the movie's header (frame count) and its pick file (rows for this movie, carried
columns with their kinds) with the same readers the workers use, so a worker's result can be checked
against facts the worker did not supply: particles + skipped picks = the pick file's rows, the
carried columns exactly those of the pick file that the output folder carries, at most the movie's
frames, and a message no larger than that content needs (``protocol.result_limit``).
"""

from __future__ import annotations

from streamer.config import Config
from streamer.errors import InputError
from streamer.formats.columns import ColumnSet, text_problem
from streamer.live.protocol import ResultSpec, result_limit

# the socket refuses any single frame larger than this (ZeroMQ's limit is per socket, not per job);
# a job whose particles or trajectories would need a larger array is refused before processing
MAX_FRAME_BYTES = 2 << 30


class JobRefused(InputError):
    """The movie cannot be processed as the session is configured (one line, naming the file)."""


def picks_columns(picks: object) -> tuple[int, dict[str, str]]:
    """(rows, {label: kind}) of a PickSource (see ``streamer.formats.picks.pick_summary``)."""
    from streamer.formats.picks import pick_summary

    return pick_summary(picks)  # type: ignore[arg-type]


def job_spec(cfg: Config, movie: str, picks: object, columns: ColumnSet) -> ResultSpec:
    """The ResultSpec for ``movie`` whose picks are the PickSource ``picks`` (JobRefused, PicksError or
    MovieError say why it cannot run)."""
    from streamer.formats.movies import movie_header

    problem = text_problem(movie)
    if problem:
        raise JobRefused(f"{movie!r}: this movie name cannot be written to particles.star: {problem}; rename the file")
    n_picks, available = picks_columns(picks)
    frames = int(movie_header(movie)[0])
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
