"""cryoSPARC particle ``.cs`` files: a NumPy structured array in ``.npy`` format (read by cryosparc-tools).

Fields (cryoSPARC names): ``uid`` u8; ``blob/path`` (fixed-width bytes, the stack relative to the
output folder), ``blob/idx`` u4 (0-based), ``blob/shape`` 2 x u4, ``blob/psize_A`` f4, ``blob/sign``
f4 (-1: dark protein, as cryoSPARC's own extraction; +1 when contrast was inverted),
``blob/import_sig`` u8; ``location/micrograph_uid`` u8, ``location/micrograph_path`` (bytes),
``location/micrograph_shape`` 2 x u4 (h, w), ``location/micrograph_psize_A`` f4,
``location/center_x_frac`` = x / w, ``location/center_y_frac`` = y / h (f4); and, when the picks
carry defocus, ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``, ``ctf/df1_A`` (rlnDefocusU),
``ctf/df2_A`` (rlnDefocusV), ``ctf/df_angle_rad`` (rlnDefocusAngle in radians),
``ctf/phase_shift_rad`` (rlnPhaseShift in radians) — all f4.

Strings are fixed-width ``S`` fields (``np.save`` cannot store objects without pickling, and
cryoSPARC's own files use ``S``). Widths are rounded up; a longer path later widens the folder's
dtype (one full rewrite). The file's ``.npy`` header is padded to a size that does not depend on
the row count, so appending records only rewrites the header's shape and the data offset never moves.
"""

from __future__ import annotations

import ast
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


def make_dtype(path_width: int, mic_width: int, ctf: bool) -> np.dtype:
    """The record dtype with byte-string fields of the given widths."""
    fields: list[tuple] = [
        ("uid", "<u8"),
        ("blob/path", f"S{path_width}"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("blob/sign", "<f4"),
        ("blob/import_sig", "<u8"),
        ("location/micrograph_uid", "<u8"),
        ("location/micrograph_path", f"S{mic_width}"),
        ("location/micrograph_shape", "<u4", (2,)),
        ("location/micrograph_psize_A", "<f4"),
        ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
    ]
    if ctf:
        fields += [(f"ctf/{k}", "<f4") for k in
                   ("accel_kv", "cs_mm", "amp_contrast", "df1_A", "df2_A", "df_angle_rad", "phase_shift_rad")]
    return np.dtype(fields)


def has_ctf(dtype: np.dtype) -> bool:
    return "ctf/df1_A" in (dtype.names or ())


def widths(dtype: np.dtype) -> tuple[int, int]:
    return dtype["blob/path"].itemsize, dtype["location/micrograph_path"].itemsize


def fit_dtype(current: np.dtype | None, blob_path_len: int, mic_path_len: int, ctf: bool) -> np.dtype:
    """``current`` if its string fields are wide enough, else a widened dtype (or a new one when None)."""
    if current is None:
        return make_dtype(_round_width(blob_path_len, 32), _round_width(mic_path_len, 32), ctf)
    pw, mw = widths(current)
    if blob_path_len <= pw and mic_path_len <= mw:
        return current
    return make_dtype(max(pw, _round_width(blob_path_len, 32)), max(mw, _round_width(mic_path_len, 32)),
                      has_ctf(current))


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
    r["location/micrograph_uid"] = np.uint64(stable_u64(movie))
    r["location/micrograph_path"] = movie.encode()
    r["location/micrograph_shape"] = (h, w)
    r["location/micrograph_psize_A"] = micrograph_psize
    r["location/center_x_frac"] = np.asarray(x, dtype=np.float64) / w
    r["location/center_y_frac"] = np.asarray(y, dtype=np.float64) / h
    if has_ctf(dtype):
        r["ctf/accel_kv"] = kv
        r["ctf/cs_mm"] = cs_mm
        r["ctf/amp_contrast"] = amp_contrast
        if "rlnDefocusU" in carried:
            r["ctf/df1_A"] = carried["rlnDefocusU"]
            r["ctf/df2_A"] = carried.get("rlnDefocusV", carried["rlnDefocusU"])
        if "rlnDefocusAngle" in carried:
            r["ctf/df_angle_rad"] = np.deg2rad(np.asarray(carried["rlnDefocusAngle"], dtype=np.float64))
        if "rlnPhaseShift" in carried:
            r["ctf/phase_shift_rad"] = np.deg2rad(np.asarray(carried["rlnPhaseShift"], dtype=np.float64))
    return r


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
