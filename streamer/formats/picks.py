"""Particle picks: find the pick file for a movie, read it, validate it; writers for round trips.

Formats (``picks.format``; ``auto`` goes by extension):

* ``star`` (``.star``): RELION coordinate or particle STAR (3.0 to 5), the first data block holding a
  loop with ``rlnCoordinateX``/``rlnCoordinateY`` (particle centres). With ``rlnMicrographName`` the
  file may hold many micrographs (a particles STAR); a ``data_optics`` block (3.1+) is read per
  particle through ``rlnOpticsGroup``.
* ``box`` (``.box``): EMAN box, whitespace-separated ``x y w h`` per line where ``(x, y)`` is the
  box's lower-left corner; centre = ``(x + w/2, y + h/2)``. Coordinates are taken as image
  column/row exactly as written, with no y flip (EMAN, RELION and crYOLO write .box in the
  same array orientation as the MRC the picks were made on).
* ``cbox`` (``.cbox``, chosen with ``box``): crYOLO; a STAR with ``_CoordinateX _CoordinateY _Width
  _Height [_Confidence]`` (lower-left corner, as .box) or, in old versions, .box columns plus a
  confidence. Confidence becomes ``rlnAutopickFigureOfMerit``.
* ``topaz`` (``.txt``): tab-separated, header ``image_name x_coord y_coord score`` (centres);
  ``image_name`` optional (then the file is one micrograph); may hold many micrographs.
* ``cs`` (``.cs``): cryoSPARC particles (NumPy structured array; compressed CSDAT files need
  cryosparc-tools). Centre = ``(center_x_frac * micrograph_shape[1], center_y_frac *
  micrograph_shape[0])`` from the ``location/*`` fields. Without ``location/micrograph_shape`` the
  fractions are applied to the movie frame and no scale is applied (fractions need none).

Refined inputs (``read_picks``): picks are moved to their refined centre, ``centre = coordinate -
origin(Å) / pixel size`` — RELION's sign convention, what its re-extraction with ``--recenter`` does
(src/preprocessing.cpp: ``xcoord -= xoff`` with ``xoff = rlnOriginXAngst / angpix``) — from
``rlnOriginXAngst/YAngst``, RELION 3.0's ``rlnOriginX/Y`` (pixels of the particle images) or
cryoSPARC's ``alignments3D/shift`` (else ``alignments2D/shift``) times ``alignments*/psize_A``
(cryoSPARC's shift has RELION's origin sign: converters such as pyem's csparc2star map it to
rlnOriginX/Y unchanged). Coordinates are scaled to movie pixels by the pixel size the file states
(``rlnMicrographPixelSize`` in the optics group, ``location/micrograph_psize_A``), else by
``picks.scale``. Every per-particle column is carried (``_carried``; RELION labels, cryoSPARC-only
fields as ``cs:<field>`` / ``cs:<field>#k``), except what lmc rewrites (``_REPLACED``, origins reset
to 0, RELION 3.0 per-particle optics); the input image name becomes ``rlnImageOriginalName``.

Matching: a pick file (or a micrograph named inside a multi-micrograph file) belongs to the movie
with the same *stem*: see ``movie_stem`` and ``pick_stem``. ``PickIndex.lookup`` normalises the
movie's stem with the same rules as picks, so both sides meet on one key.

Coordinates are then validated against the movie frame: NaN -> "NaN coordinate", x < 0 or y < 0
-> "negative coordinate", x >= w or y >= h -> "outside the {w}x{h} frame", within 0.5 px of an
earlier pick -> "duplicate of an earlier pick". Malformed files raise ``PicksError`` whose message
starts with the path.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from streamer.config import PicksConfig
from streamer.errors import PicksError
from streamer.formats import atomic
from streamer.types import Picks

# -- stems ----------------------------------------------------------------------------------

_MOVIE_EXTS = (".mrc.bz2", ".mrcs.bz2", ".tif.bz2", ".tiff.bz2", ".mrcs", ".mrc", ".tiff", ".tif", ".eer")
_PICK_EXTS = (".star", ".cbox", ".box", ".txt", ".cs")
# micrograph names inside multi-micrograph files carry image extensions too
_IMAGE_EXTS = (*_MOVIE_EXTS, ".jpg", ".png")
_MOVIE_SUFFIXES = ("_fractions", "_Fractions", "_EER", ".frames")
_PICKER_SUFFIXES = (
    "_autopick",
    "_manualpick",
    "_manualPick",
    "_picks",
    "_coords",
    "_topaz",
    "_cryolo",
    "_particles",
)
_MICROGRAPH_SUFFIXES = (
    "_patch_aligned_doseweighted",
    "_patch_aligned",
    "_rigid_aligned",
    "_doseweighted",
    "_aligned",
    "_noDW",
    "_DW",
)
# longest first so "_patch_aligned" is removed whole rather than leaving "_patch"
_ALL_PICK_SUFFIXES = tuple(sorted({*_MOVIE_SUFFIXES, *_PICKER_SUFFIXES, *_MICROGRAPH_SUFFIXES}, key=len, reverse=True))
# cryoSPARC prefixes output file names with the exposure's 21-digit zero-padded uid
_CS_UID_PREFIX = re.compile(r"^\d{21}_")


def _strip_ext(name: str, exts: tuple[str, ...]) -> str:
    low = name.lower()
    for ext in exts:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _strip_suffixes(name: str, suffixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for suf in suffixes:
            if name.endswith(suf) and len(name) > len(suf):
                name = name[: -len(suf)]
                changed = True
    return name


def movie_stem(path: str | os.PathLike[str]) -> str:
    """File name without movie extension (case-insensitive) and without ``_fractions``,
    ``_Fractions``, ``_EER``, ``.frames`` (repeatedly, so ``_fractions_EER`` goes too).

    ``raw/FoilHole_1_Data_2_fractions.tiff`` -> ``FoilHole_1_Data_2``; the rest is kept as is.
    """
    return _strip_suffixes(_strip_ext(Path(path).name, _MOVIE_EXTS), _MOVIE_SUFFIXES)


def pick_stem(path: str | os.PathLike[str]) -> str:
    """The matching key of a pick file or of a micrograph name found inside one.

    Removes one pick or image extension, a cryoSPARC 21-digit uid prefix, then repeatedly the
    picker suffixes (``_autopick``, ``_manualpick``, ``_picks``, ``_coords``, ``_topaz``,
    ``_cryolo``, ``_particles``...), micrograph suffixes (``_DW``, ``_noDW``, ``_aligned``,
    ``_doseweighted``, ``_patch_aligned_doseweighted``...) and movie suffixes (``_fractions``, ``_EER``).
    ``FoilHole_1_Data_2_fractions_autopick.star`` -> ``FoilHole_1_Data_2``.
    """
    name = Path(path).name
    base = _strip_ext(name, _PICK_EXTS)
    if base == name:
        base = _strip_ext(name, _IMAGE_EXTS)
    base = _CS_UID_PREFIX.sub("", base) or base
    return _strip_suffixes(base, _ALL_PICK_SUFFIXES)


def match_key(movie_path: str | os.PathLike[str]) -> str:
    """The key ``PickIndex`` looks a movie up by: its stem, normalised as pick stems are."""
    return pick_stem(movie_stem(movie_path))


# -- sources and the index ---------------------------------------------------------------------

_FORMAT_EXTS: dict[str, tuple[str, ...]] = {
    "star": (".star",),
    "box": (".box", ".cbox"),
    "topaz": (".txt",),
    "cs": (".cs",),
}
_EXT_FORMAT = {".star": "star", ".box": "box", ".cbox": "cbox", ".txt": "topaz", ".cs": "cs"}


@dataclass(frozen=True, slots=True)
class PickSource:
    """Where one movie's picks are: a file (``format`` star|box|cbox|topaz|cs) as it was when indexed
    (``mtime`` seconds, ``size`` bytes), and for multi-micrograph files the micrograph name exactly
    as written in the file (``micrograph``; None for one-micrograph files)."""

    path: str
    format: str
    mtime: float
    size: int
    micrograph: str | None = None

    @property
    def stamp(self) -> tuple[float, int]:
        """(mtime, size): changes when the file is rewritten."""
        return (self.mtime, self.size)


@dataclass(slots=True)
class _Entry:
    """One indexed pick file (kept per file on disk: slots keep it small)."""

    mtime_ns: int
    size: int
    sources: dict[str, PickSource] = field(default_factory=dict)


def _file_format(name: str, fmt: str) -> str | None:
    """The reader for the file ``name`` under ``picks.format`` = ``fmt``, or None if it is not a pick file."""
    ext = os.path.splitext(name)[1].lower()
    if fmt == "auto":
        return _EXT_FORMAT.get(ext)
    if ext not in _FORMAT_EXTS[fmt]:
        return None
    return "cbox" if ext == ".cbox" else fmt


class PickIndex:
    """Stem -> pick source, for a folder (scanned recursively) or a single file.

    ``refresh()`` rescans: it stats every candidate file and re-reads only those whose size or
    mtime changed, so calling it every poll is cheap. Multi-micrograph files (STAR with
    rlnMicrographName, .cs with location/micrograph_path, Topaz with image_name) index every
    micrograph they hold. When several sources give one stem, a one-micrograph file beats a
    multi-micrograph file, then the newest file wins, then the first path; ``conflicts`` lists them.
    Files that are not usable pick files are listed in ``unusable`` (path -> reason) and skipped;
    hidden files (``.name``, e.g. partial transfers) are ignored.
    """

    def __init__(self, path: str | os.PathLike[str], format: str = "auto") -> None:
        if format not in ("auto", *_FORMAT_EXTS):
            raise PicksError(f"{path}: unknown pick format {format!r} (auto, star, box, topaz, cs)")
        self.path = Path(path)
        self.format = format
        self._entries: dict[str, _Entry] = {}
        self._by_stem: dict[str, PickSource] = {}
        self.conflicts: dict[str, list[str]] = {}
        self.unusable: dict[str, str] = {}
        self.refresh()

    # -- scanning --------------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, str]]:
        """``[(path, format), ...]`` of the pick files (plain strings: this runs every poll over every file)."""
        if self.path.is_file():
            fmt = self.format if self.format != "auto" else _EXT_FORMAT.get(self.path.suffix.lower())
            if fmt == "box" and self.path.suffix.lower() == ".cbox":
                fmt = "cbox"
            if fmt is None:
                self.unusable[str(self.path)] = f"{self.path}: unknown pick file extension"
                return []
            return [(str(self.path), fmt)]
        out = []
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                fmt = _file_format(name, self.format)
                if fmt is not None:
                    out.append((os.path.join(root, name), fmt))
        return out

    def refresh(self) -> list[str]:
        """Rescan; returns the stems whose source is new or changed (sorted). Stems whose files
        disappeared are dropped from the index and not returned."""
        seen: set[str] = set()
        changed = False
        for key, fmt in self._candidates():
            try:
                st = os.stat(key)
            except OSError:
                continue  # vanished between listing and stat
            seen.add(key)
            old = self._entries.get(key)
            if old is not None and old.mtime_ns == st.st_mtime_ns and old.size == st.st_size:
                continue
            changed = True
            entry = _Entry(st.st_mtime_ns, st.st_size)
            self.unusable.pop(key, None)
            try:
                entry.sources = _index_file(key, fmt, st.st_mtime_ns / 1e9, st.st_size)
            except (PicksError, OSError) as exc:
                self.unusable[key] = str(exc)
            if not entry.sources and key not in self.unusable:
                self.unusable[key] = f"{key}: holds no particle coordinates"
            self._entries[key] = entry
        for key in set(self._entries) - seen:
            del self._entries[key]
            self.unusable.pop(key, None)
            changed = True
        if not changed:  # nothing new on disk: the stem table stands (no O(files) rebuild every poll)
            return []
        before = self._by_stem
        self._by_stem, self.conflicts = _choose(self._entries)
        return sorted(s for s, src in self._by_stem.items() if before.get(s) != src)

    # -- queries -----------------------------------------------------------------------------
    def lookup(self, movie_path: str | os.PathLike[str]) -> PickSource | None:
        """The pick source for a movie (by ``match_key``), or None when none is indexed."""
        return self._by_stem.get(match_key(movie_path))

    def stems(self) -> set[str]:
        return set(self._by_stem)

    def __len__(self) -> int:
        return len(self._by_stem)


def _choose(entries: dict[str, _Entry]) -> tuple[dict[str, PickSource], dict[str, list[str]]]:
    candidates: dict[str, list[PickSource]] = {}
    for entry in entries.values():
        for stem, src in entry.sources.items():
            candidates.setdefault(stem, []).append(src)
    chosen: dict[str, PickSource] = {}
    conflicts: dict[str, list[str]] = {}
    for stem, srcs in candidates.items():
        srcs.sort(key=lambda s: (s.micrograph is not None, -s.mtime, s.path))
        chosen[stem] = srcs[0]
        if len(srcs) > 1:
            conflicts[stem] = [s.path for s in srcs]
    return chosen, conflicts


_PEEK_BYTES = 1 << 18


def _index_file(path: str, fmt: str, mtime: float, size: int) -> dict[str, PickSource]:
    """stem -> source for every micrograph in one file (one entry for one-micrograph files)."""
    single = {pick_stem(path): PickSource(path, fmt, mtime, size)}
    if size == 0 or fmt in ("box", "cbox"):
        return single
    if fmt == "star":
        with open(path, "rb") as fh:
            head = fh.read(_PEEK_BYTES).decode("utf-8", "replace")
        if "_rlnCoordinateX" not in head:
            return {} if _has_content(head) else single
        if "_rlnMicrographName" not in head:
            return single
    elif fmt == "topaz":
        with open(path, "rb") as fh:
            first = fh.readline(_PEEK_BYTES).decode("utf-8", "replace").split()
        if first and "x_coord" not in first:
            return {}
        if "image_name" not in first:
            return single
    table = _load_table(path, fmt, os.stat(path).st_mtime_ns, size)
    if table.names is None:
        return single
    out: dict[str, PickSource] = {}
    for name in np.unique(table.names):
        out.setdefault(pick_stem(str(name)), PickSource(path, fmt, mtime, size, str(name)))
    return out


def _has_content(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())


# -- reading -------------------------------------------------------------------------------

# Columns lmc rewrites for every particle: never carried from the input.
_REPLACED = {"rlnCoordinateX", "rlnCoordinateY", "rlnMicrographName", "rlnOpticsGroup", "rlnImageName"}
# RELION origins (the refined centre's offset): consumed by re-centring, written back as 0 Å.
_ORIGIN_LABELS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY")
# RELION 3.0 per-particle optics: lmc's data_optics block states these for the output.
_OPTICS_PER_PARTICLE = {
    "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification",
    "rlnDetectorPixelSize", "rlnImagePixelSize", "rlnMicrographOriginalPixelSize", "rlnMicrographPixelSize",
}
# the input's particle image name survives under RELION's own label for it
_RENAMED = {"rlnImageName": "rlnImageOriginalName"}
# cryoSPARC field -> (RELION label, factor): the fields particles.star shows with RELION labels
_CS_COLUMNS = {
    "ctf/df1_A": ("rlnDefocusU", 1.0),
    "ctf/df2_A": ("rlnDefocusV", 1.0),
    "ctf/df_angle_rad": ("rlnDefocusAngle", 180.0 / np.pi),
    "ctf/phase_shift_rad": ("rlnPhaseShift", 180.0 / np.pi),
    "ctf/bfactor": ("rlnCtfBfactor", 1.0),
    "ctf/scale": ("rlnCtfScalefactor", 1.0),
    "pick_stats/ncc_score": ("rlnAutopickFigureOfMerit", 1.0),
}
# cryoSPARC groups lmc writes itself (blob = the new images, location = the new coordinates)
_CS_REWRITTEN = ("uid", "blob/", "location/")
CS_PREFIX = "cs:"
_NAN_WORDS = {"nan", "-nan", "+nan", "<na>", "na", "none", "null"}
# two pixel sizes "agree" within this relative tolerance (files round to 4-6 digits)
PIXEL_TOLERANCE = 0.01
# picks closer than this (movie px) to an earlier pick of the same movie are duplicates
DUPLICATE_PX = 0.5


@dataclass
class _Table:
    """A parsed pick file, before scaling: centres in the file's own pixels, carried columns and,
    for multi-micrograph files, each row's micrograph name.

    ``fractions``: x, y are fractions of the frame (cs without shape). ``coord_apix``: (n,) pixel
    size of the coordinates (Å/px) where the file states it (``coord_apix_from`` says which field).
    ``origin_A``: (n, 2) offset of the refined centre in Å, RELION's convention (centre =
    coordinate - origin), with ``origin_from`` naming the fields; ``origin_img_px``: RELION 3.0
    origins in particle-image pixels when their pixel size is unknown. ``movie_apix``: (n,) the
    movie pixel size the file records (rlnMicrographOriginalPixelSize).
    """

    x: np.ndarray
    y: np.ndarray
    columns: dict[str, np.ndarray]
    names: np.ndarray | None = None
    fractions: bool = False
    empty_file: bool = False
    shapes: np.ndarray | None = None  # (n, 2) micrograph (h, w) per row, cs only
    coord_apix: np.ndarray | None = None
    coord_apix_from: str = ""
    origin_A: np.ndarray | None = None
    origin_img_px: np.ndarray | None = None
    origin_from: str = ""
    movie_apix: np.ndarray | None = None

    def rows(self, sel: np.ndarray) -> _Table:
        """The rows ``sel`` (bool mask) of this table."""
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[sel]

        return _Table(
            self.x[sel], self.y[sel], {k: v[sel] for k, v in self.columns.items()}, cut(self.names),
            self.fractions, self.empty_file, cut(self.shapes), cut(self.coord_apix), self.coord_apix_from,
            cut(self.origin_A), cut(self.origin_img_px), self.origin_from, cut(self.movie_apix),
        )


def _micrograph_rows(source: PickSource, table: _Table) -> _Table:
    if source.micrograph is not None and table.names is not None:
        return table.rows(table.names == source.micrograph)
    return table


def _load_source(source: PickSource) -> _Table:
    path = source.path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PicksError(f"{path}: pick file not found (removed after it was indexed?)") from None
    return _micrograph_rows(source, _load_table(path, source.format, st.st_mtime_ns, st.st_size))


def column_kind(values: np.ndarray) -> str:
    """'i' integer, 'f' floating, 's' text: the kind of a carried column."""
    kind = np.asarray(values).dtype.kind
    return "i" if kind in "iub" else "f" if kind == "f" else "s"


def pick_summary(source: PickSource) -> tuple[int, dict[str, str]]:
    """``(rows, {label: kind})`` of one movie's picks as ``read_picks`` will return them: the number
    of pick rows for this micrograph and every carried column with its kind ('f', 'i', 's'), in
    file order. Raises ``PicksError`` like ``read_picks``."""
    table = _load_source(source)
    return int(table.x.shape[0]), {k: column_kind(v) for k, v in _carried(table).items()}


def _carried(table: _Table) -> dict[str, np.ndarray]:
    """The table's carried columns plus the origins lmc resets to zero after re-centring."""
    columns = dict(table.columns)
    if table.origin_A is not None or table.origin_img_px is not None:
        zero = np.zeros(table.x.shape[0])
        if table.origin_from.startswith("rln"):
            columns["rlnOriginXAngst"] = zero
            columns["rlnOriginYAngst"] = zero
    return columns


def picks_pixel_size(source: PickSource) -> tuple[float, str] | None:
    """``(Å/px, label)``: the movie pixel size a pick file records (RELION's optics group
    ``rlnMicrographOriginalPixelSize``), or None when it records none."""
    table = _load_source(source)
    if table.movie_apix is None or not table.movie_apix.size:
        return None
    return float(table.movie_apix[0]), "rlnMicrographOriginalPixelSize"


def read_picks(
    source: PickSource, cfg: PicksConfig, frame_shape: tuple[int, int], apix: float | None = None
) -> Picks:
    """Read, scale, re-centre and validate one movie's picks against ``frame_shape`` = (h, w).

    ``apix``: the movie's pixel size (Å/px). Scale: where the file states the coordinates' pixel
    size (RELION optics ``rlnMicrographPixelSize``, cryoSPARC ``location/micrograph_psize_A``) the
    coordinates are scaled by ``that / apix``; otherwise by ``cfg.scale`` (``--picks-scale``). A
    ``cfg.scale`` other than 1 that contradicts the file is an error. Re-centring: refined origins
    (RELION ``rlnOriginXAngst/YAngst``, RELION 3.0 ``rlnOriginX/Y`` in pixels, cryoSPARC
    ``alignments3D/shift`` or ``alignments2D/shift`` with ``alignments*/psize_A``) move each pick to
    its refined centre, ``centre = coordinate - origin / apix`` (RELION's re-extraction,
    preprocessing.cpp), and the origin columns are carried as 0.

    Returns ``Picks`` with the valid picks (x, y, columns) and the rejected ones with reasons;
    ``notes`` say what was scaled or re-centred. An empty file gives n = 0 and problems
    ["no picks in file"]. Raises ``PicksError`` for a missing or malformed file, or for pixel sizes
    that disagree.
    """
    path = source.path
    table = _load_source(source)
    h, w = int(frame_shape[0]), int(frame_shape[1])
    problems: list[str] = []
    notes: list[str] = []
    _check_movie_apix(path, table, apix)
    scale = _scale(path, table, cfg, apix, notes)
    x, y = table.x, table.y
    if table.shapes is not None and table.shapes.size:
        # picks from a binned micrograph without picks.scale would all land in one corner
        mh, mw = (table.shapes * scale[:, None]).max(axis=0)
        if abs(mw - w) > 0.02 * w or abs(mh - h) > 0.02 * h:
            problems.append(
                f"micrograph_shape {int(table.shapes[0, 1])}x{int(table.shapes[0, 0])} times picks.scale "
                f"{float(scale[0]):g} does not match the {w}x{h} frame"
            )
    if table.fractions:
        x, y = x * w, y * h
    else:
        x, y = x * scale, y * scale
    dx, dy = _origin_px(path, table, scale, apix, notes)
    x, y = x - dx, y - dy
    if x.size == 0:
        if source.micrograph is not None and not table.empty_file:
            problems.append(f"no picks for {source.micrograph} in file")
        else:
            problems.append("no picks in file")
    columns = _finite(_carried(table), notes)
    picks = _validate(x, y, columns, h, w)
    picks.source = path
    picks.problems = problems
    picks.notes = notes
    return picks


def _check_movie_apix(path: str, table: _Table, apix: float | None) -> None:
    """PicksError when the file's optics group records another movie pixel size than the movie's."""
    if apix is None or table.movie_apix is None or not table.movie_apix.size:
        return
    recorded = float(table.movie_apix[0])
    if abs(recorded - apix) > PIXEL_TOLERANCE * max(recorded, apix):
        raise PicksError(f"{path}: rlnMicrographOriginalPixelSize = {recorded:g} Å/px but the movie's pixel size is "
                         f"{apix:g} Å/px; these picks belong to other movies, or --apix is wrong")


def _scale(path: str, table: _Table, cfg: PicksConfig, apix: float | None, notes: list[str]) -> np.ndarray:
    """(n,) factor from the file's coordinates to movie pixels."""
    n = table.x.shape[0]
    if table.coord_apix is None or table.fractions or not n:
        return np.full(n, float(cfg.scale))
    if apix is None:
        raise PicksError(f"{path}: the coordinates are at {table.coord_apix[0]:g} Å/px ({table.coord_apix_from}); "
                         "the movie pixel size is needed to scale them (--apix)")
    scale = np.asarray(table.coord_apix, np.float64) / apix
    if cfg.scale != 1.0 and np.any(np.abs(scale / cfg.scale - 1) > PIXEL_TOLERANCE):
        raise PicksError(
            f"{path}: {table.coord_apix_from} = {table.coord_apix[0]:g} Å/px means a scale of {scale[0]:g} to the "
            f"movie's {apix:g} Å/px, but --picks-scale is {cfg.scale:g}; fix one of them"
        )
    if np.any(np.abs(scale - 1) > 1e-6):
        notes.append(f"coordinates at {table.coord_apix[0]:g} Å/px ({table.coord_apix_from}) scaled by "
                     f"{scale[0]:g} to the movie's {apix:g} Å/px")
    return scale


def _origin_px(
    path: str, table: _Table, scale: np.ndarray, apix: float | None, notes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dy): each pick's refined-centre offset in movie pixels (0 without origins)."""
    n = table.x.shape[0]
    if table.origin_A is not None:
        if apix is None:
            raise PicksError(f"{path}: {table.origin_from} (Å) need the movie pixel size to re-centre the picks (--apix)")
        off = np.asarray(table.origin_A, np.float64) / apix
    elif table.origin_img_px is not None:
        off = np.asarray(table.origin_img_px, np.float64) * scale[:, None]  # image px = coordinate px (RELION 3.0)
    else:
        return np.zeros(n), np.zeros(n)
    off = np.where(np.isfinite(off), off, 0.0)
    moved = np.hypot(off[:, 0], off[:, 1])
    if moved.size and moved.max() > 0:
        notes.append(f"re-centred {int((moved > 0).sum())} of {n} picks on their refined centres ({table.origin_from}; "
                     f"centre = coordinate - origin; mean {moved.mean():.2f} px, max {moved.max():.2f} px)")
    return off[:, 0], off[:, 1]


def _finite(columns: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
    """Non-finite numbers in carried columns (an empty CTF fit, ...) become 0: STAR and .cs
    readers take no NaN; the count is noted."""
    out = {}
    for label, values in columns.items():
        values = np.asarray(values)
        if values.dtype.kind == "f":
            bad = ~np.isfinite(values)
            if bad.any():
                notes.append(f"{int(bad.sum())} non-finite {label} value(s) written as 0")
                values = np.where(bad, 0.0, values)
        out[label] = values
    return out


def _validate(x: np.ndarray, y: np.ndarray, columns: dict[str, np.ndarray], h: int, w: int) -> Picks:
    nan = np.isnan(x) | np.isnan(y)
    with np.errstate(invalid="ignore"):
        neg = ~nan & ((x < 0) | (y < 0))
        out = ~nan & ~neg & ((x >= w) | (y >= h))
    dup = _duplicates(x, y, ~(nan | neg | out))
    reasons = np.full(x.shape, "", dtype=object)
    reasons[nan] = "NaN coordinate"
    reasons[neg] = "negative coordinate"
    reasons[out] = f"outside the {w}x{h} frame"
    reasons[dup] = "duplicate of an earlier pick"
    bad = nan | neg | out | dup
    rejected = [(float(a), float(b), str(r)) for a, b, r in zip(x[bad], y[bad], reasons[bad], strict=True)]
    keep = ~bad
    return Picks(
        x=np.ascontiguousarray(x[keep], dtype=np.float64),
        y=np.ascontiguousarray(y[keep], dtype=np.float64),
        columns={k: _column_array(v[keep]) for k, v in columns.items()},
        rejected=rejected,
    )


def _column_array(values: np.ndarray) -> np.ndarray:
    kind = column_kind(values)
    if kind == "f":
        return np.ascontiguousarray(values, dtype=np.float64)
    if kind == "i":
        return np.ascontiguousarray(values).astype(np.int64)
    return np.asarray([str(v) for v in values.tolist()], dtype=object)


def _duplicates(x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Valid picks within ``DUPLICATE_PX`` of an earlier valid pick (grid hashing: O(n))."""
    dup = np.zeros(x.shape, dtype=bool)
    seen: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(valid):
        cx, cy = int(x[i] // DUPLICATE_PX), int(y[i] // DUPLICATE_PX)
        near = (j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in seen.get((cx + dx, cy + dy), ()))
        if any((x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2 < DUPLICATE_PX**2 for j in near):
            dup[i] = True
            continue
        seen.setdefault((cx, cy), []).append(int(i))
    return dup


@functools.lru_cache(maxsize=8)
def _load_table(path: str, fmt: str, mtime_ns: int, size: int) -> _Table:
    """Parse a pick file once per (mtime, size): multi-micrograph files are read by every movie."""
    del mtime_ns  # part of the cache key only
    if size == 0:
        return _empty_table()
    try:
        if fmt == "star":
            return _read_star(path)
        if fmt == "cbox":
            return _read_cbox(path)
        if fmt == "box":
            return _read_box(path, with_confidence=False)
        if fmt == "topaz":
            return _read_topaz(path)
        if fmt == "cs":
            return _read_cs(path)
    except UnicodeDecodeError:
        raise PicksError(f"{path}: not a text file (binary content where {fmt} picks were expected)") from None
    raise PicksError(f"{path}: unknown pick format {fmt!r}")


def _empty_table() -> _Table:
    return _Table(np.zeros(0), np.zeros(0), {}, empty_file=True)


def _numeric(path: str, frame: pd.DataFrame, col: str) -> np.ndarray:
    """Column as float64; NaN words stay NaN, anything else unparseable is an error."""
    series = frame[col]
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    words = series.astype(str).str.strip().str.lower()
    bad = np.isnan(values) & ~words.isin(_NAN_WORDS).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PicksError(f"{path}: row {i + 1}: {col} = {series.iloc[i]!r} is not a number")
    return values


def _any_column(frame: pd.DataFrame, col: str) -> np.ndarray:
    """A carried STAR column as int64, float64 or text, as the file holds it."""
    series = frame[col]
    if pd.api.types.is_integer_dtype(series):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(series.astype(str).to_numpy(), dtype=object)


def _read_star_blocks(path: str) -> dict[str, Any]:
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        msg = str(exc).strip().splitlines()
        raise PicksError(f"{path}: not a readable STAR file ({msg[0] if msg else type(exc).__name__})") from None
    if not blocks:
        with open(path, encoding="utf-8", errors="replace") as fh:
            if _has_content(fh.read()):
                raise PicksError(f"{path}: not a STAR file (no data_ block)")
    return blocks


def _find_loop(path: str, blocks: dict[str, Any], xcol: str, ycol: str) -> pd.DataFrame | None:
    for block in blocks.values():
        if isinstance(block, dict):
            block = pd.DataFrame([block])
        if isinstance(block, pd.DataFrame) and xcol in block.columns and ycol in block.columns:
            return block
    if blocks:
        names = ", ".join(f"data_{n}" for n in blocks)
        raise PicksError(f"{path}: no data block with {xcol} and {ycol} (found {names})")
    return None


def _optics_column(path: str, blocks: dict[str, Any], frame: pd.DataFrame, label: str) -> np.ndarray | None:
    """(n,) the optics-group value ``label`` of each particle row (RELION 3.1+ ``data_optics``),
    or None when the file has no optics block or the block lacks ``label``."""
    optics = blocks.get("optics")
    if isinstance(optics, dict):
        optics = pd.DataFrame([optics])
    if not isinstance(optics, pd.DataFrame) or label not in optics.columns or not len(optics):
        return None
    values = _numeric(path, optics, label)
    if "rlnOpticsGroup" not in frame.columns or "rlnOpticsGroup" not in optics.columns:
        if len(optics) > 1:
            raise PicksError(f"{path}: {len(optics)} optics groups but the particles carry no rlnOpticsGroup")
        return np.full(len(frame), values[0])
    table = dict(zip(_numeric(path, optics, "rlnOpticsGroup").astype(np.int64).tolist(), values.tolist(), strict=True))
    groups = _numeric(path, frame, "rlnOpticsGroup")
    missing = sorted({int(g) for g in groups if int(g) not in table})
    if missing:
        raise PicksError(f"{path}: particles in optics group(s) {missing} that data_optics does not define")
    return np.asarray([table[int(g)] for g in groups], dtype=np.float64)


def _read_star(path: str) -> _Table:
    blocks = _read_star_blocks(path)
    frame = _find_loop(path, blocks, "rlnCoordinateX", "rlnCoordinateY")
    if frame is None:
        return _empty_table()
    x = _numeric(path, frame, "rlnCoordinateX")
    y = _numeric(path, frame, "rlnCoordinateY")
    skip = _REPLACED | set(_ORIGIN_LABELS) | _OPTICS_PER_PARTICLE
    columns = {_RENAMED.get(c, c): _any_column(frame, c) for c in frame.columns if c not in skip or c in _RENAMED}
    names = frame["rlnMicrographName"].astype(str).to_numpy() if "rlnMicrographName" in frame.columns else None
    table = _Table(x, y, columns, names)
    table.movie_apix = _optics_column(path, blocks, frame, "rlnMicrographOriginalPixelSize")
    coord_apix = _optics_column(path, blocks, frame, "rlnMicrographPixelSize")
    if coord_apix is not None:
        table.coord_apix, table.coord_apix_from = coord_apix, "rlnMicrographPixelSize"
    if "rlnOriginXAngst" in frame.columns and "rlnOriginYAngst" in frame.columns:
        table.origin_A = np.stack([_numeric(path, frame, "rlnOriginXAngst"), _numeric(path, frame, "rlnOriginYAngst")], -1)
        table.origin_from = "rlnOriginXAngst/YAngst"
    elif "rlnOriginX" in frame.columns and "rlnOriginY" in frame.columns:
        origin = np.stack([_numeric(path, frame, "rlnOriginX"), _numeric(path, frame, "rlnOriginY")], -1)
        image_apix = _image_apix(path, blocks, frame)
        table.origin_from = "rlnOriginX/Y (pixels, RELION 3.0)"
        if image_apix is not None:
            table.origin_A = origin * image_apix[:, None]
        else:
            table.origin_img_px = origin
    return table


def _image_apix(path: str, blocks: dict[str, Any], frame: pd.DataFrame) -> np.ndarray | None:
    """(n,) pixel size of the particle images: optics rlnImagePixelSize, or RELION 3.0's
    rlnDetectorPixelSize (µm) * 1e4 / rlnMagnification per particle."""
    apix = _optics_column(path, blocks, frame, "rlnImagePixelSize")
    if apix is not None:
        return apix
    if "rlnDetectorPixelSize" in frame.columns and "rlnMagnification" in frame.columns:
        return _numeric(path, frame, "rlnDetectorPixelSize") * 1e4 / _numeric(path, frame, "rlnMagnification")
    return None


def _read_cbox(path: str) -> _Table:
    with open(path, encoding="utf-8") as fh:
        head = fh.read(_PEEK_BYTES)
    if not re.search(r"^\s*data_", head, re.MULTILINE):
        return _read_box(path, with_confidence=True)
    blocks = _read_star_blocks(path)
    frame = _find_loop(path, blocks, "CoordinateX", "CoordinateY")
    if frame is None:
        return _empty_table()
    for col in ("Width", "Height"):
        if col not in frame.columns:
            raise PicksError(f"{path}: crYOLO cbox loop lacks _{col} (needed to find box centres)")
    x = _numeric(path, frame, "CoordinateX") + _numeric(path, frame, "Width") / 2
    y = _numeric(path, frame, "CoordinateY") + _numeric(path, frame, "Height") / 2
    columns = {}
    if "Confidence" in frame.columns:
        columns["rlnAutopickFigureOfMerit"] = _numeric(path, frame, "Confidence")
    return _Table(x, y, columns)


def _read_box(path: str, with_confidence: bool) -> _Table:
    """EMAN .box: x y w h (lower-left corner) per line; centre = corner + size/2."""
    rows: list[list[float]] = []
    conf: list[float] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.split()
            try:
                if len(fields) < 4:
                    raise ValueError
                rows.append([float(v) for v in fields[:4]])
                if with_confidence:
                    conf.append(float(fields[4]) if len(fields) > 4 else np.nan)
            except ValueError:
                raise PicksError(
                    f"{path}: line {number}: expected numbers x y width height, got {text[:80]!r}"
                ) from None
    if not rows:
        return _empty_table()
    a = np.asarray(rows, dtype=np.float64)
    columns = {"rlnAutopickFigureOfMerit": np.asarray(conf)} if with_confidence else {}
    return _Table(a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2, columns)


def _read_topaz(path: str) -> _Table:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if not _has_content(text):
        return _empty_table()
    first = next(line for line in text.splitlines() if line.strip())
    sep = "\t" if "\t" in first else r"\s+"
    header = first.split("\t") if sep == "\t" else first.split()
    header = [h.strip() for h in header]
    if "x_coord" not in header or "y_coord" not in header:
        raise PicksError(f"{path}: not a Topaz file: header {first.strip()[:80]!r} lacks x_coord and y_coord")
    for number, line in enumerate(text.splitlines(), start=1):
        count = len(line.split("\t") if sep == "\t" else line.split())
        if line.strip() and count != len(header):
            raise PicksError(f"{path}: line {number}: {count} fields, the Topaz header has {len(header)}")
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            dtype={"image_name": str},
            index_col=False,
            engine="c" if sep == "\t" else "python",
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise PicksError(f"{path}: malformed Topaz table ({str(exc).strip().splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    x = _numeric(path, frame, "x_coord")
    y = _numeric(path, frame, "y_coord")
    columns = {"rlnAutopickFigureOfMerit": _numeric(path, frame, "score")} if "score" in frame.columns else {}
    names = frame["image_name"].astype(str).to_numpy() if "image_name" in frame.columns else None
    return _Table(x, y, columns, names)


_NPY_MAGIC = b"\x93NUMPY"
_CS_LOCATION_HELP = (
    "it needs location/center_x_frac and location/center_y_frac (with location/micrograph_path and "
    "location/micrograph_shape): export the particles of a job that has locations — Extract From "
    "Micrographs, a picker (Blob/Template Picker, Topaz Extract), 2D Classification, Select 2D or a "
    "3D refinement, with their passthrough fields"
)


def _read_cs(path: str) -> _Table:
    with open(path, "rb") as fh:
        magic = fh.read(len(_NPY_MAGIC))
    if magic == _NPY_MAGIC:
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise PicksError(f"{path}: unreadable cryoSPARC .cs ({str(exc).strip().splitlines()[0]})") from None
    else:
        arr = _read_csdat(path)
    names = arr.dtype.names or ()
    if "location/center_x_frac" not in names or "location/center_y_frac" not in names:
        have = sorted({n.split("/")[0] for n in names if "/" in n})
        raise PicksError(f"{path}: cryoSPARC .cs without particle locations (groups: {', '.join(have) or 'none'}); "
                         f"{_CS_LOCATION_HELP}")
    fx = np.asarray(arr["location/center_x_frac"], dtype=np.float64)
    fy = np.asarray(arr["location/center_y_frac"], dtype=np.float64)
    fractions = "location/micrograph_shape" not in names
    shapes = None
    if fractions:
        x, y = fx, fy
    else:
        shapes = np.asarray(arr["location/micrograph_shape"], dtype=np.float64).reshape(-1, 2)
        x, y = fx * shapes[:, 1], fy * shapes[:, 0]
    mic = None
    if "location/micrograph_path" in names:
        raw = arr["location/micrograph_path"]
        mic = np.char.decode(raw, "utf-8") if raw.dtype.kind == "S" else raw.astype(str)
        mic = np.asarray(mic, dtype=str)
    table = _Table(x, y, _cs_columns(arr), mic, fractions=fractions, shapes=shapes)
    if not fractions and "location/micrograph_psize_A" in names:
        psize = np.asarray(arr["location/micrograph_psize_A"], dtype=np.float64)
        if np.all(psize > 0):
            table.coord_apix, table.coord_apix_from = psize, "location/micrograph_psize_A"
    for group in ("alignments3D", "alignments2D"):  # a 3D refinement's centre is the later, finer one
        if f"{group}/shift" in names and f"{group}/psize_A" in names:
            shift = np.asarray(arr[f"{group}/shift"], dtype=np.float64).reshape(-1, 2)
            table.origin_A = shift * np.asarray(arr[f"{group}/psize_A"], dtype=np.float64)[:, None]
            table.origin_from = f"{group}/shift (x {group}/psize_A)"
            for g in ("alignments3D", "alignments2D"):  # the centre moved: carried shifts become 0
                for key in (f"{CS_PREFIX}{g}/shift#0", f"{CS_PREFIX}{g}/shift#1"):
                    if key in table.columns:
                        table.columns[key] = np.zeros(len(x))
            break
    return table


def _cs_columns(arr: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-particle field but uid/blob/location: mapped ones under RELION labels
    (``_CS_COLUMNS``), the others as ``cs:<field>`` (``cs:<field>#k`` per element of a vector field)."""
    out: dict[str, np.ndarray] = {}
    for name in arr.dtype.names or ():
        if name == "uid" or name.startswith(_CS_REWRITTEN):
            continue
        values = np.asarray(arr[name])
        if name in _CS_COLUMNS:
            label, k = _CS_COLUMNS[name]
            out[label] = values.astype(np.float64) * k
            continue
        if values.dtype.kind in "SO U":
            text = np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values.astype(str)
            out[f"{CS_PREFIX}{name}"] = np.asarray(text, dtype=object)
            continue
        kind = np.float64 if values.dtype.kind == "f" else np.int64
        flat = values.reshape(values.shape[0], -1)
        if values.ndim == 1:
            out[f"{CS_PREFIX}{name}"] = flat[:, 0].astype(kind)
        else:
            for k in range(flat.shape[1]):
                out[f"{CS_PREFIX}{name}#{k}"] = flat[:, k].astype(kind)
    return out


def _read_csdat(path: str) -> np.ndarray:
    """cryoSPARC's compressed .cs (not NumPy): needs cryosparc-tools."""
    try:
        from cryosparc.dataset import Dataset
    except ImportError:
        raise PicksError(
            f"{path}: not a NumPy .cs file (a compressed cryoSPARC CSDAT file needs cryosparc-tools: pip install cryosparc-tools)"
        ) from None
    try:
        return Dataset.load(path).to_records(fixed=True)
    except Exception as exc:  # cryosparc-tools raises several types on malformed files
        msg = str(exc).strip().splitlines()
        raise PicksError(f"{path}: unreadable cryoSPARC .cs ({msg[0] if msg else type(exc).__name__})") from None

# -- writers (simulator, round-trip tests) -----------------------------------------------------


def _fmt(v: float) -> str:
    return f"{float(v):.10g}"


def write_star_coords(
    path: str | os.PathLike[str],
    x: np.ndarray,
    y: np.ndarray,
    columns: dict[str, np.ndarray] | None = None,
    micrograph_name: str | Sequence[str] | None = None,
) -> None:
    """RELION coordinate STAR: ``data_`` with a loop rlnCoordinateX/Y (+ ``columns``). With
    ``micrograph_name`` (one name, or one per row for a multi-micrograph file) the block is
    ``data_particles`` with rlnMicrographName."""
    frame = pd.DataFrame({"rlnCoordinateX": np.asarray(x, np.float64), "rlnCoordinateY": np.asarray(y, np.float64)})
    block = ""
    if micrograph_name is not None:
        names = [micrograph_name] * len(frame) if isinstance(micrograph_name, str) else list(micrograph_name)
        frame.insert(0, "rlnMicrographName", names)
        block = "particles"
    for key, values in (columns or {}).items():
        frame[key] = np.asarray(values)
    atomic.write_text(path, starfile.to_string({block: frame}, float_format="%.10g"))


def write_box(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray, box: int) -> None:
    """EMAN .box: lower-left corner ``(x - box/2, y - box/2)``, width, height per line."""
    half = box / 2
    lines = [f"{_fmt(a - half)}\t{_fmt(b - half)}\t{box}\t{box}\n" for a, b in zip(x, y, strict=True)]
    atomic.write_text(path, "".join(lines))


def write_topaz(path: str | os.PathLike[str], rows: list[tuple[str, float, float, float]]) -> None:
    """Topaz table: ``image_name x_coord y_coord score``, tab-separated, with header."""
    lines = ["image_name\tx_coord\ty_coord\tscore\n"]
    lines += [f"{name}\t{_fmt(a)}\t{_fmt(b)}\t{_fmt(s)}\n" for name, a, b, s in rows]
    atomic.write_text(path, "".join(lines))


def write_cs_picks(
    path: str | os.PathLike[str],
    micrograph_path: str | Sequence[str],
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    columns: dict[str, np.ndarray] | None = None,
) -> None:
    """cryoSPARC particle .cs (NumPy format): location/* fields with centre fractions
    ``x / shape[1]``, ``y / shape[0]``; ``columns`` by RELION label (rlnDefocusU/V/Angle,
    rlnPhaseShift, rlnAutopickFigureOfMerit; angles in degrees) become ctf/* fields.
    ``micrograph_path`` may be one path or one per row."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = x.shape[0]
    paths = [micrograph_path] * n if isinstance(micrograph_path, str) else list(micrograph_path)
    encoded = np.array([p.encode() for p in paths], dtype=f"S{max([len(p.encode()) for p in paths] + [1])}")
    back = {label: (f, k) for f, (label, k) in _CS_COLUMNS.items()}
    extra = [(back[k][0], "<f4") for k in (columns or {})]
    dtype = [
        ("uid", "<u8"),
        ("location/micrograph_uid", "<u8"),
        ("location/exp_group_id", "<u4"),
        ("location/micrograph_path", encoded.dtype.str),
        ("location/micrograph_shape", "<u4", (2,)),
        ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
        *extra,
    ]
    arr = np.zeros(n, dtype=dtype)
    arr["uid"] = np.random.default_rng().integers(1, 2**63, n, dtype=np.uint64)
    _, mic_index = np.unique(encoded, return_inverse=True)
    arr["location/micrograph_uid"] = mic_index + 1
    arr["location/micrograph_path"] = encoded
    arr["location/micrograph_shape"] = np.asarray(shape, dtype=np.uint32)
    arr["location/center_x_frac"] = x / shape[1]
    arr["location/center_y_frac"] = y / shape[0]
    for label, values in (columns or {}).items():
        f, k = back[label]
        arr[f] = np.asarray(values, np.float64) / k
    with atomic.replacing(path) as fh:  # a file object: np.save would append .npy to a path
        np.save(fh, arr, allow_pickle=False)
