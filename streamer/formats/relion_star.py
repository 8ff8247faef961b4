"""RELION 5 particles STAR: a ``data_optics`` block and a ``data_particles`` loop, written as text.

Both blocks open with RELION 5's version line (``# version 50001``: ``CURRENT_MDT_VERSION`` in
RELION's src/metadata_table.h). The optics block has the labels, in the order, that RELION 5's
particle extraction writes (src/preprocessing.cpp: the micrographs' optics group — name, number,
rlnMicrographOriginalPixelSize, voltage, Cs, amplitude contrast — then rlnImagePixelSize,
rlnImageSize, rlnImageDimensionality and rlnCtfDataAreCtfPremultiplied = 0).

The file is ``render_header(cfg, columns)`` followed by the ``render_rows(...)`` of every movie in
commit order, so the writer can append rows without re-reading anything.

Columns are fixed per output folder by the session (``streamer.formats.columns.ColumnSet``): the
base columns (``BASE_COLUMNS``) then the carried RELION ones (``rlnDefocusU`` ...; carried
``cs:`` fields go to the .cs only). A movie whose pick file lacks a carried column gets a neutral
value — ``0`` for numbers, ``None`` for text. Text values are quoted as STAR requires and refused
where no reader could read them back (``columns.star_quote``). Coordinates are written as given
(movie pixels at the physical detector grid, the picks' convention); ``rlnImageName`` is
``index@stacks/particles_NNNNN.mrcs`` with a 1-based index, relative to the STAR file's folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from streamer.config import Config
from streamer.formats.columns import BASE, ColumnSet, kind_of, star_quote

BASE_COLUMNS = [label for label, _ in BASE]
OPTICS_GROUP = 1
MISSING = {"f": "0", "i": "0", "s": "None"}
VERSION_LINE = "# version 50001"  # RELION 5 (CURRENT_MDT_VERSION)
OPTICS_LABELS = (
    "rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage", "rlnSphericalAberration",
    "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied",
)


column_kind = kind_of  # 'i' integer/bool, 'f' floating, 's' text: decides formatting and the neutral value


def choose_columns(carried: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """``[(label, kind), ...]``: the base columns then the carried ones (base labels among them ignored)."""
    return ColumnSet.of({k: kind_of(v) for k, v in carried.items()}).star_columns()


def column_mismatch(columns: Sequence[tuple[str, str]], carried: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """(missing, extra): folder columns this movie lacks, and this movie's columns the folder lacks."""
    names = [c for c, _ in columns]
    missing = [c for c in names if c not in BASE_COLUMNS and c not in carried]
    extra = [c for c in carried if c not in names and c.startswith("rln")]
    return missing, extra


quote_value = star_quote  # a STAR text value, quoted as RELION and starfile need (or ColumnError)


def _fmt_column(values: np.ndarray, kind: str) -> list[str]:
    values = np.asarray(values)
    if kind == "i":
        return [str(v) for v in values.astype(np.int64).tolist()]
    if kind == "f":
        return [f"{v:.9g}" for v in values.astype(np.float64).tolist()]
    return [star_quote(str(v)) for v in values.tolist()]


def acquisition_optics(cfg: Config) -> list[tuple[str, str]]:
    """``[(label, text), ...]`` that every RELION optics table of this session starts with (group,
    movie pixel size, voltage, Cs, amplitude contrast), shared by particles.star and micrographs.star."""
    return [
        ("rlnOpticsGroupName", f"opticsGroup{OPTICS_GROUP}"),
        ("rlnOpticsGroup", str(OPTICS_GROUP)),
        ("rlnMicrographOriginalPixelSize", f"{cfg.pixel_size:.9g}"),
        ("rlnVoltage", f"{cfg.kv:.9g}"),
        ("rlnSphericalAberration", f"{cfg.cs:.9g}"),
        ("rlnAmplitudeContrast", f"{cfg.amplitude_contrast:.9g}"),
    ]


def optics_values(cfg: Config) -> list[tuple[str, str]]:
    """``[(label, text), ...]`` of the one optics group, in RELION 5 extraction's label order."""
    return [
        *acquisition_optics(cfg),
        ("rlnImagePixelSize", f"{cfg.out_apix:.9g}"),
        ("rlnImageSize", str(cfg.out_box)),
        ("rlnImageDimensionality", "2"),
        ("rlnCtfDataAreCtfPremultiplied", "0"),
    ]


def render_header(cfg: Config, column_names: Sequence[str] | Sequence[tuple[str, str]]) -> str:
    """The optics block and the particles loop header (labels numbered from 1) for ``cfg``."""
    names = [c if isinstance(c, str) else c[0] for c in column_names]
    optics = optics_values(cfg)
    lines = ["", VERSION_LINE, "", "data_optics", "", "loop_"]
    lines += [f"_{k} #{i}" for i, (k, _) in enumerate(optics, 1)]
    lines += [" ".join(v for _, v in optics), "", "", VERSION_LINE, "", "data_particles", "", "loop_"]
    lines += [f"_{k} #{i}" for i, k in enumerate(names, 1)]
    return "\n".join(lines) + "\n"


def image_names(ranges: Sequence[tuple[str, int, int]]) -> list[str]:
    """``index@stack`` (1-based index) for each particle of ``[(stack relpath, first 0-based, count), ...]``."""
    out: list[str] = []
    for stack, first, n in ranges:
        out.extend(f"{i}@{stack}" for i in range(first + 1, first + n + 1))
    return out


def render_rows(
    columns: Sequence[tuple[str, str]],
    names: Sequence[str],
    micrograph: str,
    x: np.ndarray,
    y: np.ndarray,
    carried: Mapping[str, np.ndarray],
) -> str:
    """One line per particle, ``\\n``-terminated, in the folder's column order.

    ``names``: (n,) rlnImageName values; ``x``, ``y``: (n,) coordinates; ``carried``: label -> (n,).
    """
    n = len(names)
    if n == 0:
        return ""
    fixed = {
        "rlnImageName": [star_quote(s) for s in names],
        "rlnMicrographName": [star_quote(micrograph)] * n,
        "rlnCoordinateX": _fmt_column(x, "f"),
        "rlnCoordinateY": _fmt_column(y, "f"),
        "rlnOpticsGroup": [str(OPTICS_GROUP)] * n,
    }
    cols = []
    for label, kind in columns:
        if label in fixed:
            cols.append(fixed[label])
        elif label in carried:
            cols.append(_fmt_column(carried[label], kind))
        else:
            cols.append([MISSING[kind]] * n)
    return "\n".join(map(" ".join, zip(*cols, strict=True))) + "\n"
