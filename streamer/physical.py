"""No silent physical defaults: the movie pixel size and the exposure per frame come from the user
or the data, are said where they came from, and are never assumed.

Pixel size (Å/px, at the physical detector grid), from every source that knows it:

1. ``--apix`` / ``apix`` in config.yaml;
2. the movie's header: MRC and ``.mrc.bz2`` record it as cell length / sampling along x (MRC2014;
   ``streamer.formats.movies.movie_pixel_size``). TIFF (SerialEM, EPU) and EER files record no
   specimen pixel size lmc can trust, so they need another source;
3. the pick file's optics group: ``rlnMicrographOriginalPixelSize`` (RELION 3.1+ particle and
   micrograph STARs: the movie pixel size before any binning).

Every source that knows it must agree within ``TOLERANCE`` (files round to 4-6 digits): a
disagreement stops the session (or fails the movie whose own header disagrees) with one line naming
both sources. Known nowhere: one line asking for ``--apix``. The chosen value and its source go to
the log, to ``Config.apix_source`` and from there to each movie's trajectories STAR
(``lmcPixelSizeSource``).

Exposure per frame (e/Å²): no movie format lmc reads records it, so ``--dose-per-frame`` is
required; lmc never assumes it (it sets the exposure weighting and the motion priors).
"""

from __future__ import annotations

from pathlib import Path

from streamer.config import Config
from streamer.errors import ConfigError, MovieError

TOLERANCE = 0.01
GIVEN = "--apix / config.yaml"


def _agree(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(a, b)


def pixel_size_sources(cfg: Config, movie: str | None, pick_source: object | None) -> list[tuple[float, str]]:
    """``[(Å/px, where), ...]`` from every source that records the pixel size (module docstring)."""
    from streamer.formats.movies import movie_pixel_size
    from streamer.formats.picks import picks_pixel_size

    found: list[tuple[float, str]] = []
    if cfg.apix is not None:
        found.append((float(cfg.apix), GIVEN))
    if movie is not None:
        header = movie_pixel_size(movie)
        if header is not None:
            found.append((header, f"the MRC header of {movie}"))
    if pick_source is not None:
        recorded = picks_pixel_size(pick_source)  # type: ignore[arg-type]
        if recorded is not None:
            found.append((recorded[0], f"{recorded[1]} in {pick_source.path}"))  # type: ignore[attr-defined]
    return found


def settle_pixel_size(cfg: Config, found: list[tuple[float, str]], where: str) -> Config:
    """``cfg`` with ``apix`` and ``apix_source`` from the agreeing ``found`` sources; ConfigError
    when they disagree or none is known (``where`` names what was looked at)."""
    if not found:
        raise ConfigError(f"config: the movie pixel size is not recorded in {where}: pass --apix (Å/px)")
    value, source = found[0]
    for other, other_source in found[1:]:
        if not _agree(value, other):
            raise ConfigError(f"config: pixel sizes disagree: {value:g} Å/px from {source} but {other:g} Å/px "
                              f"from {other_source}; fix the wrong one (or pass the right --apix)")
    sources = "; ".join(s for _, s in found)
    return cfg.with_(apix=value, apix_source=sources)


def require_exposure(cfg: Config) -> None:
    """ConfigError unless the exposure per frame was given."""
    if cfg.dose_per_frame is None:
        raise ConfigError("config: the exposure per frame is not known (no movie format records it): "
                          "pass --dose-per-frame (e/Å² per frame)")


def resolve_session(cfg: Config, movie: str | None) -> Config:
    """The session's pixel size from ``cfg``, the first movie found (``movie``) and its pick file,
    and the exposure check (``describe`` says both, for the log)."""
    require_exposure(cfg)
    source = None
    if movie is not None and cfg.picks.dir:
        from streamer.formats.picks import PickIndex

        try:
            source = PickIndex(cfg.picks.dir, format=cfg.picks.format).lookup(movie)
        except (OSError, ValueError):
            source = None  # an unreadable pick file is reported with its movie
    where = f"{cfg.movies}" + (f" (first movie {Path(movie).name})" if movie else " (no movie found yet)")
    found = pixel_size_sources(cfg, movie, source)
    return settle_pixel_size(cfg, found, where + (f" or {source.path}" if source is not None else ""))


def describe(cfg: Config) -> list[str]:
    """The log lines that say the settled pixel size and exposure with their sources."""
    return [f"pixel size {cfg.apix:g} Å/px from {cfg.apix_source or GIVEN}",
            f"exposure {cfg.dose_per_frame:g} e/Å² per frame (given), pre-exposure {cfg.pre_exposure:g} e/Å²"]


def for_movie(cfg: Config, movie: str, header_apix: float | None) -> Config:
    """``cfg`` checked against one movie's own header: MovieError when they disagree; a ``cfg``
    without a pixel size takes the header's (direct use of the pipeline), else MovieError."""
    if cfg.dose_per_frame is None:
        raise MovieError(movie, "the exposure per frame is not known: pass --dose-per-frame (e/Å² per frame)")
    if header_apix is None:
        if cfg.apix is None:
            raise MovieError(movie, "the pixel size is not recorded in this movie: pass --apix (Å/px)")
        return cfg
    if cfg.apix is None:
        return cfg.with_(apix=header_apix, apix_source=f"the MRC header of {movie}")
    if not _agree(cfg.apix, header_apix):
        raise MovieError(movie, f"its header records {header_apix:g} Å/px but the session uses {cfg.apix:g} Å/px "
                                f"(from {cfg.apix_source or GIVEN})")
    return cfg
