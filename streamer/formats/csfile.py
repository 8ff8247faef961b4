"""cryoSPARC particle ``.cs`` files: a NumPy structured array in ``.npy`` format (read by cryosparc-tools),
with a ``.csg`` result-group file beside it for cryoSPARC's "Import Result Group".

Fields, in the names, order and dtypes of cryoSPARC 4's own particle outputs (an Extract From
Micrographs job's ``blob``/``location`` and its passthrough ``ctf``; cryosparc-tools
docs/guides/jobs.ipynb and tests/conftest.py list them for the T20S dataset):

* ``uid`` u8 (deterministic per movie and particle, ``particle_uids``);
* ``blob/path`` (the stack, relative to the output folder), ``blob/idx`` u4 (0-based),
  ``blob/shape`` 2 x u4, ``blob/psize_A`` f4, ``blob/sign`` f4 (-1: dark protein, as cryoSPARC's own
  extraction; +1 when contrast was inverted), ``blob/import_sig`` u8;
* ``ctf/*`` when the picks carry defocus: ``type`` (text: the input's, else ``imported``),
  ``exp_group_id`` u4, ``accel_kv``, ``cs_mm``, ``amp_contrast``, ``df1_A`` (rlnDefocusU),
  ``df2_A`` (rlnDefocusV), ``df_angle_rad`` (rlnDefocusAngle in radians), ``phase_shift_rad``
  (rlnPhaseShift in radians), ``scale`` (rlnCtfScalefactor), ``scale_const``, ``shift_A`` 2,
  ``tilt_A`` 2, ``trefoil_A`` 2, ``tetra_A`` 4, ``anisomag`` 4, ``bfactor`` (rlnCtfBfactor), all f4.
  Unknown values are cryoSPARC's neutral ones (as in its Patch CTF outputs): scale and
  scale_const 1, aberrations, anisomag and bfactor 0; an input .cs's own ``ctf/*`` values win;
* ``location/micrograph_uid`` u8, ``location/exp_group_id`` u4, ``location/micrograph_path``,
  ``location/micrograph_shape`` 2 x u4 (h, w), ``location/micrograph_psize_A`` f4,
  ``location/center_x_frac`` = x / w, ``location/center_y_frac`` = y / h, ``location/min_dist_A`` f4
  (0: lmc applies no minimum distance of its own);
* every other field of an input ``.cs`` (``cs:<field>`` columns of the picks: ``alignments3D/*``,
  ``alignments2D/*``, ``pick_stats/*``...), re-assembled from ``cs:<field>#k`` elements; integers
  are written u4 (u8 for ``*_uid``/``*_sig`` fields), floats f4, text as fixed-width bytes.

The exposure group is the input's (``cs:ctf/exp_group_id``) or 1, cryoSPARC's first group.
Strings are fixed-width ``S`` fields (``np.save`` cannot store objects without pickling, and
cryoSPARC's own files use ``S``). Widths are rounded up; a longer path later widens the folder's
dtype (one full rewrite). The file's ``.npy`` header is padded to a size that does not depend on
the row count, so appending records only rewrites the header's shape and the data offset never moves.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import io
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

_MAGIC = b"\x93NUMPY\x01\x00"
_PREFIX = len(_MAGIC) + 2  # magic, version, u2 header length
_SHAPE_DIGITS = 20  # room for any u8 row count


def _round_width(n: int, minimum: int) -> int:
    return max(minimum, -(-(n + 16) // 32) * 32)


CS_PREFIX = "cs:"
TEXT_WIDTH = 32  # carried text fields (ctf/type, ...): bytes
DEFAULT_EXP_GROUP = 1
# the ctf group of cryoSPARC's particle outputs, in its order: (field, dtype, shape)
CTF_FIELDS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("ctf/type", f"S{TEXT_WIDTH}", ()), ("ctf/exp_group_id", "<u4", ()), ("ctf/accel_kv", "<f4", ()),
    ("ctf/cs_mm", "<f4", ()), ("ctf/amp_contrast", "<f4", ()), ("ctf/df1_A", "<f4", ()), ("ctf/df2_A", "<f4", ()),
    ("ctf/df_angle_rad", "<f4", ()), ("ctf/phase_shift_rad", "<f4", ()), ("ctf/scale", "<f4", ()),
    ("ctf/scale_const", "<f4", ()), ("ctf/shift_A", "<f4", (2,)), ("ctf/tilt_A", "<f4", (2,)),
    ("ctf/trefoil_A", "<f4", (2,)), ("ctf/tetra_A", "<f4", (4,)), ("ctf/anisomag", "<f4", (4,)),
    ("ctf/bfactor", "<f4", ()),
)
# RELION label -> (cryoSPARC field, factor): carried columns that fill ctf fields
_FROM_RELION = {
    "rlnDefocusU": ("ctf/df1_A", 1.0),
    "rlnDefocusV": ("ctf/df2_A", 1.0),
    "rlnDefocusAngle": ("ctf/df_angle_rad", np.pi / 180.0),
    "rlnPhaseShift": ("ctf/phase_shift_rad", np.pi / 180.0),
    "rlnCtfScalefactor": ("ctf/scale", 1.0),
    "rlnCtfBfactor": ("ctf/bfactor", 1.0),
}
# cryoSPARC groups listed in the .csg (the result types "Import Result Group" takes)
CSG_GROUPS = ("blob", "ctf", "location", "alignments2D", "alignments3D", "pick_stats")


def _field(spec: tuple) -> tuple:
    name, dt, shape = spec
    return (name, dt, shape) if shape else (name, dt)


def carried_fields(carried: Mapping[str, np.ndarray] | Sequence[str]) -> list[tuple]:
    """dtype entries of the ``cs:<field>`` / ``cs:<field>#k`` carried columns (vector fields whole,
    in first-seen order; ctf fields are left to ``CTF_FIELDS``)."""
    sizes: dict[str, int] = {}
    kinds: dict[str, str] = {}
    items = carried.items() if isinstance(carried, Mapping) else ((k, None) for k in carried)
    for label, values in items:
        if not label.startswith(CS_PREFIX):
            continue
        name, _, k = label[len(CS_PREFIX):].partition("#")
        if name.startswith("ctf/") and any(name == f for f, _, _ in CTF_FIELDS):
            continue
        sizes[name] = max(sizes.get(name, 0), int(k) + 1 if k else 0)
        kinds[name] = "s" if values is None else _kind(values)
    out = []
    for name, size in sizes.items():
        kind = kinds[name]
        dt = (f"S{TEXT_WIDTH}" if kind == "s" else "<f4" if kind == "f" else
              "<u8" if name.endswith(("_uid", "_sig")) else "<u4")
        out.append((name, dt, (size,)) if size else (name, dt))
    return out


def _kind(values: np.ndarray) -> str:
    kind = np.asarray(values).dtype.kind
    return "i" if kind in "iub" else "f" if kind == "f" else "s"


def make_dtype(path_width: int, mic_width: int, ctf: bool, extra: Sequence[tuple] = ()) -> np.dtype:
    """The record dtype with byte-string fields of the given widths, the ctf group when ``ctf`` and
    the carried ``extra`` fields (``carried_fields``)."""
    fields: list[tuple] = [
        ("uid", "<u8"),
        ("blob/path", f"S{path_width}"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("blob/sign", "<f4"),
        ("blob/import_sig", "<u8"),
    ]
    if ctf:
        fields += [_field(f) for f in CTF_FIELDS]
    fields += [
        ("location/micrograph_uid", "<u8"),
        ("location/exp_group_id", "<u4"),
        ("location/micrograph_path", f"S{mic_width}"),
        ("location/micrograph_shape", "<u4", (2,)),
        ("location/micrograph_psize_A", "<f4"),
        ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
        ("location/min_dist_A", "<f4"),
    ]
    return np.dtype(fields + list(extra))


def has_ctf(dtype: np.dtype) -> bool:
    return "ctf/df1_A" in (dtype.names or ())


def extra_fields(dtype: np.dtype) -> list[tuple]:
    """The carried fields of a dtype made by ``make_dtype`` (everything after location/min_dist_A)."""
    names = list(dtype.names or ())
    start = names.index("location/min_dist_A") + 1 if "location/min_dist_A" in names else len(names)
    out = []
    for name in names[start:]:
        sub = dtype[name]
        out.append((name, sub.base.str, sub.shape) if sub.shape else (name, sub.str))
    return out


def widths(dtype: np.dtype) -> tuple[int, int]:
    return dtype["blob/path"].itemsize, dtype["location/micrograph_path"].itemsize


def fit_dtype(current: np.dtype | None, blob_path_len: int, mic_path_len: int, ctf: bool,
              carried: Mapping[str, np.ndarray] | Sequence[str] = ()) -> np.dtype:
    """``current`` if its string fields are wide enough, else a widened dtype (or a new one when
    None, with the ``cs:`` fields of ``carried``)."""
    if current is None:
        return make_dtype(_round_width(blob_path_len, 32), _round_width(mic_path_len, 32), ctf,
                          carried_fields(carried))
    pw, mw = widths(current)
    if blob_path_len <= pw and mic_path_len <= mw:
        return current
    return make_dtype(max(pw, _round_width(blob_path_len, 32)), max(mw, _round_width(mic_path_len, 32)),
                      has_ctf(current), extra_fields(current))


def stable_u64(text: str) -> int:
    """A deterministic 64-bit id of ``text`` (BLAKE2b)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """Bijective 64-bit mixer (Steele et al., SplitMix64 finaliser); wraps modulo 2^64."""
    z = z.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def particle_uids(movie: str, n: int) -> np.ndarray:
    """(n,) u8 uids, deterministic in (movie path, particle index) and distinct within a movie."""
    base = np.uint64(stable_u64(movie))
    with np.errstate(over="ignore"):
        return _splitmix64(base + np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def records(
    dtype: np.dtype,
    movie: str,
    ranges: Sequence[tuple[str, int, int]],
    x: np.ndarray,
    y: np.ndarray,
    micrograph_shape: tuple[int, int],
    carried: Mapping[str, np.ndarray],
    *,
    box: int,
    psize: float,
    micrograph_psize: float,
    sign: float,
    import_sig: int,
    kv: float,
    cs_mm: float,
    amp_contrast: float,
) -> np.ndarray:
    """(n,) records of one movie. ``ranges``: [(stack relpath, first 0-based, count)] in particle order;
    ``x``, ``y``: (n,) movie-pixel coordinates; ``micrograph_shape``: (h, w)."""
    n = int(np.asarray(x).shape[0])
    if sum(c for _, _, c in ranges) != n:
        raise ValueError(f"{movie}: ranges cover {sum(c for _, _, c in ranges)} particles, coordinates {n}")
    r = np.zeros(n, dtype=dtype)
    h, w = micrograph_shape
    r["uid"] = particle_uids(movie, n)
    r["blob/path"] = np.repeat(np.array([s.encode() for s, _, _ in ranges]), [c for _, _, c in ranges])
    r["blob/idx"] = np.concatenate([np.arange(f, f + c, dtype=np.uint32) for _, f, c in ranges]) if n else []
    r["blob/shape"] = (box, box)
    r["blob/psize_A"] = psize
    r["blob/sign"] = sign
    r["blob/import_sig"] = np.uint64(import_sig)
    group = _carried_field(carried, "ctf/exp_group_id", n)
    r["location/micrograph_uid"] = np.uint64(stable_u64(movie))
    r["location/exp_group_id"] = DEFAULT_EXP_GROUP if group is None else group
    r["location/micrograph_path"] = movie.encode()
    r["location/micrograph_shape"] = (h, w)
    r["location/micrograph_psize_A"] = micrograph_psize
    r["location/center_x_frac"] = np.asarray(x, dtype=np.float64) / w
    r["location/center_y_frac"] = np.asarray(y, dtype=np.float64) / h
    r["location/min_dist_A"] = 0.0
    if has_ctf(dtype):
        _fill_ctf(r, carried, kv, cs_mm, amp_contrast)
    for name, *_ in extra_fields(dtype):
        values = _carried_field(carried, name, n)
        if values is not None:
            r[name] = values
    return r


def _carried_field(carried: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray | None:
    """The values of cryoSPARC field ``name`` from ``cs:name`` or its ``cs:name#k`` elements, or None."""
    key = f"{CS_PREFIX}{name}"
    if key in carried:
        values = np.asarray(carried[key])
        return np.char.encode(values.astype(str), "utf-8") if values.dtype.kind in "OUS" else values
    parts = []
    while f"{key}#{len(parts)}" in carried:
        parts.append(np.asarray(carried[f"{key}#{len(parts)}"]))
    return np.stack(parts, axis=-1) if parts else None


def _fill_ctf(r: np.ndarray, carried: Mapping[str, np.ndarray], kv: float, cs_mm: float, amp_contrast: float) -> None:
    """The ctf group: the optics, the carried CTF (RELION labels, then an input .cs's own ctf
    fields), cryoSPARC's neutral values for the rest."""
    n = r.shape[0]
    r["ctf/type"] = b"imported"
    r["ctf/exp_group_id"] = DEFAULT_EXP_GROUP
    r["ctf/accel_kv"] = kv
    r["ctf/cs_mm"] = cs_mm
    r["ctf/amp_contrast"] = amp_contrast
    r["ctf/scale"] = 1.0
    r["ctf/scale_const"] = 1.0
    for label, (name, k) in _FROM_RELION.items():
        if label in carried:
            r[name] = np.asarray(carried[label], dtype=np.float64) * k
    if "rlnDefocusU" in carried and "rlnDefocusV" not in carried:
        r["ctf/df2_A"] = r["ctf/df1_A"]
    for name, *_ in CTF_FIELDS:
        values = _carried_field(carried, name, n)
        if values is not None:
            r[name] = values


def to_blob(arr: np.ndarray) -> bytes:
    """Self-describing bytes of a record array as stored in the ledger: ``.npy`` bytes, zlib-compressed
    (level 1: the repeated path strings shrink ~10x for ~1 ms per 10^4 records)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return zlib.compress(buf.getvalue(), 1)


def from_blob(blob: bytes, dtype: np.dtype | None = None) -> np.ndarray:
    """Inverse of ``to_blob``, cast field by field to ``dtype`` (e.g. wider strings) when given."""
    arr = np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False)
    if dtype is None or arr.dtype == dtype:
        return arr
    out = np.zeros(arr.shape, dtype=dtype)
    for name in dtype.names:
        if name in arr.dtype.names:
            out[name] = arr[name]
    return out


# -- .npy with a fixed-size header --------------------------------------------------------


def _header(dtype: np.dtype, n: int) -> bytes:
    descr = np.lib.format.dtype_to_descr(dtype)
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({n},), }}"
    full = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({'9' * _SHAPE_DIGITS},), }}"
    size = -(-(_PREFIX + len(full) + 1) // 64) * 64 - _PREFIX
    if size > 65535:
        raise ValueError("record dtype too large for an .npy v1 header")
    body = text.ljust(size - 1).encode("latin1") + b"\n"
    return _MAGIC + size.to_bytes(2, "little") + body


def data_offset(dtype: np.dtype) -> int:
    """Where records start in a file written here (independent of the row count)."""
    return len(_header(dtype, 0))


def read_header(path: str | Path) -> tuple[np.dtype, int, int]:
    """(dtype, rows, data offset) of an ``.npy`` file, checking its size agrees."""
    path = Path(path)
    with open(path, "rb") as f:
        pre = f.read(_PREFIX)
        if len(pre) < _PREFIX or pre[:6] != _MAGIC[:6]:
            raise ValueError(f"{path}: not an .npy file")
        hlen = int.from_bytes(pre[8:10], "little")
        head = ast.literal_eval(f.read(hlen).decode("latin1"))
    dtype = np.lib.format.descr_to_dtype(head["descr"])
    rows = int(head["shape"][0])
    offset = _PREFIX + hlen
    expected = offset + rows * dtype.itemsize
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: header says {rows} records ({expected} bytes), file holds {path.stat().st_size}")
    return dtype, rows, offset


def write_new(path: str | Path, dtype: np.dtype, parts: Iterable[np.ndarray]) -> int:
    """Write ``parts`` (record arrays of ``dtype``, consumed one at a time) as one ``.npy`` file at
    ``path``; fsyncs; returns the row count."""
    with open(path, "wb") as f:
        f.write(_header(dtype, 0))
        n = _write_parts(f, dtype, parts)
        f.seek(0)
        f.write(_header(dtype, n))
        f.flush()
        os.fsync(f.fileno())
    return n


def append_to(path: str | Path, dtype: np.dtype, rows_before: int, parts: Iterable[np.ndarray]) -> int:
    """Append ``parts`` to a file written by ``write_new`` holding ``rows_before`` rows, then rewrite its
    header's shape (same size, so the data offset stays); fsyncs. Returns the new row count."""
    with open(path, "r+b") as f:
        f.seek(data_offset(dtype) + rows_before * dtype.itemsize)
        n = rows_before + _write_parts(f, dtype, parts)
        f.truncate()
        f.seek(0)
        f.write(_header(dtype, n))
        f.flush()
        os.fsync(f.fileno())
    return n


def _write_parts(f: BinaryIO, dtype: np.dtype, parts: Iterable[np.ndarray]) -> int:
    n = 0
    for p in parts:
        f.write(np.ascontiguousarray(p, dtype=dtype).tobytes())
        n += len(p)
    return n


# -- the result group (.csg) ------------------------------------------------------------------

CSG_VERSION = "v4.4.1"  # the layout of cryoSPARC 4.4's exported result groups, which this follows


def csg_text(cs_name: str, dtype: np.dtype, rows: int, created: datetime.datetime | None = None) -> str:
    """A cryoSPARC result-group file (YAML) for ``cs_name`` in the same folder: ``created``,
    ``group`` (type ``particle``), ``results`` (one entry per field group present, each
    ``metafile: '>NAME.cs'``, ``num_items``, ``type: particle.<group>``) and ``version``, as
    cryoSPARC's own exports (``<job>_particles_exported.csg``)."""
    import yaml

    groups = {n.split("/")[0] for n in dtype.names or () if "/" in n}
    results = {
        g: {"metafile": f">{cs_name}", "num_items": int(rows), "type": f"particle.{g}"}
        for g in CSG_GROUPS if g in groups
    }
    doc = {
        "created": created or datetime.datetime.now(),
        "group": {
            "description": "Per-particle motion-corrected particles written by lmc",
            "name": "particles",
            "title": "lmc particles",
            "type": "particle",
        },
        "results": results,
        "version": CSG_VERSION,
    }
    return yaml.safe_dump(doc, default_flow_style=False, sort_keys=True)
