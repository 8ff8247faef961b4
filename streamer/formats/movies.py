"""Movie readers: MRC/MRCS (plain or bzip2), TIFF and EER, in the file's native dtype (no float conversion:
a K3 movie is 5760x4092x40 and memory matters), plus cheap header and readiness checks for live watching.

MRC follows MRC2014 (modes 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16; ``.mrc.bz2`` is bzip2 of the
whole file). Mode 0 is read as uint8 when the header carries the IMOD stamp without IMOD's "signed bytes"
flag (IMOD's convention for unsigned byte data). TIFF movies hold one page per frame.
"""

from __future__ import annotations

import bz2
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile.dtypes
import mrcfile.utils
import numpy as np
import tifffile

from streamer.config import EerConfig
from streamer.errors import MovieError
from streamer.formats.eer import EER_COMPRESSIONS, eer_header, quiet_tifffile, read_eer, tiff_problem

__all__ = [
    "MOVIE_SUFFIXES",
    "Movie",
    "MovieError",
    "is_movie",
    "movie_header",
    "movie_is_whole",
    "read_movie",
]

MOVIE_SUFFIXES = (".mrc", ".mrcs", ".mrc.bz2", ".tif", ".tiff", ".eer")
_TEMPORARY_SUFFIXES = (".tmp", ".part")
_MRC_MODES = (0, 1, 2, 6, 12)
_IMOD_STAMP = 1146047817
_IMOD_SIGNED_BYTES = 1
_BZ2_CHUNK = 1 << 20


@dataclass
class Movie:
    """A decoded movie. ``frames`` is ``(F, h, w)`` in the file's dtype (EER: summed counts, uint8/uint16)."""

    path: str
    frames: np.ndarray
    kind: str  # "mrc", "mrc.bz2", "tiff", "eer"
    upsampling: int = 1
    n_raw_frames: int = 0
    leftover_raw_frames: int = 0
    warnings: list[str] = field(default_factory=list)
    apix: float | None = None  # pixel size the file records (MRC header: cella.x / mx), Å/px; None: not recorded


def is_movie(path: str | os.PathLike) -> bool:
    """True for a movie file name (case-insensitive suffix), False for temporary names being written
    (dotfiles, ``*.tmp``, ``*.part``, names containing ``downloading``)."""
    name = Path(path).name.lower()
    if name.startswith(".") or name.endswith(_TEMPORARY_SUFFIXES) or "downloading" in name:
        return False
    return name.endswith(MOVIE_SUFFIXES)


def _kind(path: str) -> str:
    name = path.lower()
    if name.endswith(".bz2"):
        return "mrc.bz2"
    if name.endswith((".mrc", ".mrcs")):
        return "mrc"
    if name.endswith(".eer"):
        return "eer"
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    raise MovieError(path, f"not a movie file (known suffixes: {', '.join(MOVIE_SUFFIXES)})")


# -- MRC ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MrcLayout:
    nz: int
    ny: int
    nx: int
    dtype: np.dtype  # as stored (byte order included)
    data_offset: int
    warnings: tuple[str, ...]
    apix: float | None = None

    @property
    def frame_bytes(self) -> int:
        return self.ny * self.nx * self.dtype.itemsize

    @property
    def data_bytes(self) -> int:
        return self.nz * self.frame_bytes


def _mrc_layout(raw: bytes, path: str) -> _MrcLayout:
    """Parse the 1024-byte MRC header ``raw`` (mrcfile's header layout and byte-order rules)."""
    dt = mrcfile.dtypes.HEADER_DTYPE
    if len(raw) < dt.itemsize:
        raise MovieError(path, f"MRC header incomplete ({len(raw)} of {dt.itemsize} bytes)")
    header = np.frombuffer(raw[: dt.itemsize], dt)[0]
    notes = []
    if bytes(header["map"])[:3] != b"MAP":
        notes.append("MRC map ID 'MAP ' missing")
    try:
        order = mrcfile.utils.byte_order_from_machine_stamp(header["machst"])
    except ValueError:
        order = "<"
        notes.append("invalid MRC machine stamp; assuming little-endian")
    header = np.frombuffer(raw[: dt.itemsize], dt.newbyteorder(order))[0]
    mode = int(header["mode"])
    if mode not in _MRC_MODES:
        raise MovieError(path, f"unsupported MRC mode {mode} (supported: {', '.join(map(str, _MRC_MODES))})")
    nx, ny, nz, ext = (int(header[k]) for k in ("nx", "ny", "nz", "nsymbt"))
    if min(nx, ny, nz) < 1 or ext < 0:
        raise MovieError(path, f"invalid MRC header: nx={nx} ny={ny} nz={nz} nsymbt={ext}")
    dtype = mrcfile.utils.dtype_from_mode(mode).newbyteorder(order)
    if mode == 0:
        extra2 = bytes(header["extra2"])
        stamp, flags = struct.unpack(order + "ii", extra2[40:48])  # IMOD stamp / flags at bytes 152 / 156
        if stamp == _IMOD_STAMP and not flags & _IMOD_SIGNED_BYTES:
            dtype = np.dtype(np.uint8)
    return _MrcLayout(nz, ny, nx, dtype, dt.itemsize + ext, tuple(notes), _header_apix(header))


def _header_apix(header: np.void) -> float | None:
    """The pixel size an MRC header records: cell length / sampling along x (MRC2014's voxel size);
    None when unset (0) or not a finite positive number."""
    mx = int(header["mx"])
    cell = float(header["cella"]["x"])
    if mx <= 0 or not np.isfinite(cell) or cell <= 0:
        return None
    return cell / mx


def movie_pixel_size(path: str | os.PathLike) -> float | None:
    """The pixel size (Å/px) a movie's header records, reading the header only: MRC and .mrc.bz2
    (cella.x / mx); None for formats that record none lmc can trust (TIFF, EER) or an unset header."""
    path = str(path)
    kind = _kind(path)
    if kind not in ("mrc", "mrc.bz2"):
        return None
    return _mrc_layout(_read_head(path, kind == "mrc.bz2"), path).apix


def _read_head(path: str, compressed: bool, n: int = 1024) -> bytes:
    try:
        if compressed:
            with bz2.open(path, "rb") as f:
                return f.read(n)
        with open(path, "rb") as f:
            return f.read(n)
    except (OSError, EOFError, ValueError) as exc:
        raise MovieError(
            path, f"cannot read the file ({'corrupt bzip2 stream: ' if compressed else ''}{exc})"
        ) from None


def _truncation(layout: _MrcLayout, available: int) -> str:
    frames = max(0, available) // layout.frame_bytes
    return f"truncated: header says {layout.nz} frames, file holds {frames}"


def _native(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _read_mrc(path: str) -> Movie:
    layout = _mrc_layout(_read_head(path, False), path)
    size = os.path.getsize(path)
    if size - layout.data_offset < layout.data_bytes:
        raise MovieError(path, _truncation(layout, size - layout.data_offset))
    frames = np.fromfile(path, layout.dtype, layout.nz * layout.ny * layout.nx, offset=layout.data_offset)
    frames = _native(frames.reshape(layout.nz, layout.ny, layout.nx))
    return Movie(path, frames, "mrc", 1, layout.nz, 0, list(layout.warnings), layout.apix)


def _read_mrc_bz2(path: str) -> Movie:
    try:
        with bz2.open(path, "rb") as f:
            layout = _mrc_layout(f.read(1024), path)
            f.seek(layout.data_offset)  # forward seek on a bz2 stream decompresses and discards
            buf = bytearray(layout.data_bytes)
            view = memoryview(buf)
            got = 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except MovieError:
        raise
    except (OSError, EOFError, ValueError) as exc:
        raise MovieError(path, f"corrupt bzip2 stream ({exc})") from None
    if got < layout.data_bytes:
        raise MovieError(path, _truncation(layout, got))
    frames = np.frombuffer(buf, layout.dtype).reshape(layout.nz, layout.ny, layout.nx)
    return Movie(path, _native(frames), "mrc.bz2", 1, layout.nz, 0, list(layout.warnings), layout.apix)


def _bz2_whole(path: str) -> tuple[bool, str]:
    """Decompress to the end without keeping the output: whole when every bzip2 stream (pbzip2 writes
    several) reached its end-of-stream marker and the data cover the MRC header's size."""
    head = b""
    total = 0
    decomp = bz2.BZ2Decompressor()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_BZ2_CHUNK):
                while chunk:
                    if decomp.eof:
                        decomp = bz2.BZ2Decompressor()
                    out = decomp.decompress(chunk)
                    total += len(out)
                    if len(head) < 1024:
                        head += out[: 1024 - len(head)]
                    chunk = decomp.unused_data if decomp.eof else b""
    except (OSError, EOFError, ValueError) as exc:
        return False, f"bzip2 stream not readable ({exc})"
    if not decomp.eof:
        return False, "bzip2 end-of-stream marker not reached"
    try:
        layout = _mrc_layout(head, path)
    except MovieError as exc:
        return False, exc.what
    if total - layout.data_offset < layout.data_bytes:
        return False, _truncation(layout, total - layout.data_offset)
    return True, ""


def _mrc_whole(path: str) -> tuple[bool, str]:
    try:
        layout = _mrc_layout(_read_head(path, False), path)
    except MovieError as exc:
        return False, exc.what
    available = os.path.getsize(path) - layout.data_offset
    if available < layout.data_bytes:
        return False, _truncation(layout, available)
    return True, ""


# -- TIFF --------------------------------------------------------------------------------------------


def _open_tiff(path: str) -> tifffile.TiffFile:
    try:
        with quiet_tifffile():
            return tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises many types on damaged files
        raise MovieError(path, f"not a readable TIFF file ({exc})") from None


def _is_eer_tiff(tf: tifffile.TiffFile) -> bool:
    """Whether the raw frames are EER-compressed (an uncompressed first page is an integrated image)."""
    try:
        with quiet_tifffile():
            pages = tf.pages
            first = pages.first.compression
            return first in EER_COMPRESSIONS or (
                first == 1 and len(pages) > 1 and pages[1].compression in EER_COMPRESSIONS
            )
    except Exception:  # damaged structure: the TIFF reader reports it
        return False


def _read_tiff(path: str, threads: int) -> Movie:
    with _open_tiff(path) as tf:
        try:
            with quiet_tifffile():  # damage is reported in one line, below
                pages = [tf.pages[i] for i in range(len(tf.pages))]
                problem = tiff_problem(tf, pages)
        except Exception as exc:
            raise MovieError(path, f"unreadable TIFF structure ({exc})") from None
        if problem:
            raise MovieError(path, problem)
        first = pages[0]
        for page in pages[1:]:
            if page.shape != first.shape or page.dtype != first.dtype:
                raise MovieError(
                    path, f"page {page.index} is {page.shape} {page.dtype}, page 0 is {first.shape} {first.dtype}"
                )
        if len(first.shape) != 2:
            raise MovieError(path, f"pages must be single-channel images (page 0 has shape {first.shape})")
        try:
            frames = tf.asarray(key=range(len(pages)), maxworkers=threads or os.cpu_count() or 1)
        except Exception as exc:
            raise MovieError(path, f"corrupt TIFF data ({exc})") from None
    frames = _native(np.asarray(frames).reshape(len(pages), *first.shape))
    return Movie(path, frames, "tiff", 1, len(pages), 0, [])


def _tiff_whole(path: str) -> tuple[bool, str]:
    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tf:
            tf.pages.useframes = True  # IFD offsets and strips suffice here; thousands of EER pages parse fast
            pages = [tf.pages[i] for i in range(len(tf.pages))]
            problem = tiff_problem(tf, pages)
    except Exception as exc:
        return False, f"TIFF structure not readable ({exc})"
    return (not problem), problem


# -- public ------------------------------------------------------------------------------------------


def read_movie(path: str | os.PathLike, eer: EerConfig | None = None, threads: int = 0) -> Movie:
    """Read a whole movie.

    MRC/MRCS and ``.mrc.bz2`` are checked against the header (a short file raises, naming the header's and
    the file's frame counts). TIFF: every page must have the same shape and lie inside the file; pages are
    decoded with ``threads`` workers (0 = all cores). EER (``.eer``, or a TIFF whose pages are EER-compressed)
    is fractionated per ``eer`` (default ``EerConfig()``); raw frames left over are counted and reported in
    ``warnings``. Raises ``MovieError`` (``"{path}: {what}"``).
    """
    path = str(path)
    kind = _kind(path)
    if not os.path.isfile(path):
        raise MovieError(path, "no such file")
    if kind == "mrc":
        return _read_mrc(path)
    if kind == "mrc.bz2":
        return _read_mrc_bz2(path)
    if kind == "tiff":
        with _open_tiff(path) as tf:
            is_eer = _is_eer_tiff(tf)
        if not is_eer:
            return _read_tiff(path, threads)
    eer = eer or EerConfig()
    frames, n_raw, leftover = read_eer(path, eer.upsampling, eer.fractions, threads)
    notes = []
    if leftover:
        notes.append(
            f"{leftover} of {n_raw} raw EER frames not used: {eer.fractions} fractions of {n_raw // eer.fractions}"
        )
    return Movie(path, frames, "eer", eer.upsampling, n_raw, leftover, notes)


def movie_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(n_frames, h, w)`` without decoding the data. EER: raw frame count and the detector grid."""
    path = str(path)
    kind = _kind(path)
    if kind in ("mrc", "mrc.bz2"):
        layout = _mrc_layout(_read_head(path, kind == "mrc.bz2"), path)
        return layout.nz, layout.ny, layout.nx
    with _open_tiff(path) as tf:
        is_eer = _is_eer_tiff(tf)
        if not is_eer:
            try:
                with quiet_tifffile():
                    n = len(tf.pages)
            except Exception as exc:
                raise MovieError(path, f"unreadable TIFF structure ({exc})") from None
            h, w = tf.pages.first.shape[-2:]
            return n, int(h), int(w)
    return eer_header(path)


# reasons from ``movie_is_whole`` that mean "shorter than it says it is" (a transfer that may resume),
# as opposed to a header or structure that is invalid whatever comes next
_SHORT = ("truncated", "MRC header incomplete", "bzip2 end-of-stream marker not reached", "no such file")


def is_truncation(reason: str) -> bool:
    """True when a ``movie_is_whole`` reason says the file is short (it may still be completed)."""
    return reason.startswith(_SHORT)


def movie_is_whole(path: str | os.PathLike) -> tuple[bool, str]:
    """Cheap check that a movie still being written is complete: ``(True, "")`` or ``(False, reason)``.

    MRC: header readable and the file at least as long as it declares. ``.mrc.bz2``: decompresses to the
    end-of-stream marker (reads the whole file) and covers the header's size. TIFF/EER: every IFD parses,
    every page's strips lie inside the file and the last IFD links to no further page. Never raises.
    """
    path = str(path)
    try:
        kind = _kind(path)
        if not os.path.isfile(path):
            return False, "no such file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "mrc":
                return _mrc_whole(path)
            if kind == "mrc.bz2":
                return _bz2_whole(path)
            return _tiff_whole(path)
    except Exception as exc:  # a readiness probe must answer, whatever the file holds
        return False, f"{type(exc).__name__}: {exc}"
