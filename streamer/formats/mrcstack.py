"""Append-only MRC2014 image stacks with a hand-written header, so an append costs O(new images).

Layout (MRC2014, little-endian): a 1024-byte header, no extended header, then NZ images of
``(ny, nx)`` float32 (mode 2) or float16 (mode 12), row-major. Image stacks use ISPG = 0,
MX = NX, MY = NY, MZ = 1 and CELLA = (NX * apix, NY * apix, apix) — the convention of the
MRC2014 paper, RELION and ``mrcfile`` for stacks — so only NZ changes when images are appended.
Header statistics are marked "not computed" (DMAX < DMIN, DMEAN < min(DMIN, DMAX), RMS < 0), so
no append has to read old data.

Invariant kept by every write here: the header's NZ never exceeds the images whose bytes are on
disk. Data is written and fsync'ed before NZ grows; NZ is lowered before data is cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

HEADER_BYTES = 1024
MODES: dict[int, np.dtype] = {2: np.dtype("<f4"), 12: np.dtype("<f2")}
_MAP_ID = b"MAP "
_MACHST_LE = b"\x44\x44\x00\x00"
_LABEL = b"lmc: per-particle motion-corrected particles"

HEADER_DTYPE = np.dtype(
    [
        ("nx", "<i4"),
        ("ny", "<i4"),
        ("nz", "<i4"),
        ("mode", "<i4"),
        ("nxstart", "<i4"),
        ("nystart", "<i4"),
        ("nzstart", "<i4"),
        ("mx", "<i4"),
        ("my", "<i4"),
        ("mz", "<i4"),
        ("cella", "<f4", (3,)),
        ("cellb", "<f4", (3,)),
        ("mapc", "<i4"),
        ("mapr", "<i4"),
        ("maps", "<i4"),
        ("dmin", "<f4"),
        ("dmax", "<f4"),
        ("dmean", "<f4"),
        ("ispg", "<i4"),
        ("nsymbt", "<i4"),
        ("extra1", "V8"),
        ("exttyp", "S4"),
        ("nversion", "<i4"),
        ("extra2", "V84"),
        ("origin", "<f4", (3,)),
        ("map", "S4"),
        ("machst", "V4"),
        ("rms", "<f4"),
        ("nlabl", "<i4"),
        ("label", "S80", (10,)),
    ]
)
assert HEADER_DTYPE.itemsize == HEADER_BYTES
_NZ_OFFSET = HEADER_DTYPE.fields["nz"][1]


class StackError(ValueError):
    """A stack file is not what this module wrote, or disagrees with what is asked."""


def _new_header(box: int, mode: int, apix: float) -> np.ndarray:
    h = np.zeros((), dtype=HEADER_DTYPE)
    h["nx"] = h["ny"] = h["mx"] = h["my"] = box
    h["nz"] = 0
    h["mz"] = 1
    h["mode"] = mode
    h["cella"] = (box * apix, box * apix, apix)
    h["cellb"] = (90.0, 90.0, 90.0)
    h["mapc"], h["mapr"], h["maps"] = 1, 2, 3
    # "not computed" statistics (MRC2014): dmax < dmin, dmean < both, rms < 0
    h["dmin"], h["dmax"], h["dmean"], h["rms"] = 0.0, -1.0, -2.0, -1.0
    h["ispg"] = 0
    h["nversion"] = 20141
    h["map"] = _MAP_ID
    h["machst"] = np.void(_MACHST_LE)
    h["nlabl"] = 1
    h["label"][0] = _LABEL
    return h


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: str | Path) -> np.ndarray:
    """The header of ``path`` as a 0-d structured array; raises StackError if it is not an MRC stack we can extend."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise StackError(f"{path}: not an MRC file: {len(raw)} bytes, shorter than the 1024-byte header")
    h = np.frombuffer(raw, dtype=HEADER_DTYPE)[0]
    if h["map"] != _MAP_ID:
        raise StackError(f"{path}: not an MRC2014 file (map field is {h['map']!r}, expected b'MAP ')")
    if bytes(h["machst"])[:2] != _MACHST_LE[:2]:
        raise StackError(f"{path}: big-endian MRC file; this writer only extends little-endian stacks")
    if int(h["mode"]) not in MODES:
        raise StackError(f"{path}: MRC mode {int(h['mode'])}; only 2 (float32) and 12 (float16) stacks are extended")
    if int(h["nsymbt"]) != 0:
        raise StackError(f"{path}: has an extended header ({int(h['nsymbt'])} bytes); not written by lmc")
    if int(h["nx"]) <= 0 or int(h["ny"]) <= 0 or int(h["nz"]) < 0:
        raise StackError(f"{path}: bad dimensions {int(h['nx'])}x{int(h['ny'])}x{int(h['nz'])}")
    return h


def _image_bytes(h: np.ndarray) -> int:
    return int(h["nx"]) * int(h["ny"]) * MODES[int(h["mode"])].itemsize


def images_on_disk(path: str | Path) -> int:
    """Whole images whose bytes are in the file (may exceed the header's NZ after an interrupted append)."""
    h = read_header(path)
    return (os.path.getsize(path) - HEADER_BYTES) // _image_bytes(h)


def count(path: str | Path) -> int:
    """Number of images (header NZ), after checking that the file size agrees exactly."""
    path = Path(path)
    h = read_header(path)
    nz = int(h["nz"])
    expected = HEADER_BYTES + nz * _image_bytes(h)
    size = path.stat().st_size
    if size != expected:
        raise StackError(
            f"{path}: header says {nz} images ({expected} bytes) but the file holds {size} bytes "
            "(interrupted write? reopening the output folder repairs it)"
        )
    return nz


def _write_nz(f, nz: int) -> None:
    f.seek(_NZ_OFFSET)
    f.write(np.array(nz, dtype="<i4").tobytes())
    f.flush()
    os.fsync(f.fileno())


def append(
    path: str | Path,
    images: np.ndarray,
    apix: float,
    on_step: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Append ``images`` (n, b, b) float32 or float16 to the stack at ``path``; returns (first 0-based index, n).

    Creates the file (and fsyncs its folder) when missing. Writes the data after the header's
    last image (overwriting any uncommitted tail), cuts anything beyond, fsyncs, then sets NZ and
    fsyncs again. ``on_step("stack_data")`` is called between the two fsyncs (crash testing).
    """
    path = Path(path)
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise StackError(f"{path}: images must be (n, b, b), got shape {images.shape}")
    mode = {np.dtype("float32"): 2, np.dtype("float16"): 12}.get(images.dtype)
    if mode is None:
        raise StackError(f"{path}: images must be float32 or float16, got {images.dtype}")
    box = int(images.shape[1])
    if not path.exists():
        tmp = path.with_name(path.name + ".new")
        with open(tmp, "wb") as f:
            f.write(_new_header(box, mode, apix).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    h = read_header(path)
    if int(h["nx"]) != box or int(h["ny"]) != box:
        raise StackError(f"{path}: holds {int(h['nx'])}x{int(h['ny'])} images, cannot append {box}x{box}")
    if int(h["mode"]) != mode:
        raise StackError(f"{path}: is MRC mode {int(h['mode'])}, cannot append {images.dtype} images (mode {mode})")
    file_apix = float(h["cella"][0]) / box
    if not np.isclose(file_apix, apix, rtol=1e-5):
        raise StackError(f"{path}: pixel size {file_apix:.5g} Å, cannot append images of {apix:.5g} Å")
    first = int(h["nz"])
    n = int(images.shape[0])
    data = np.ascontiguousarray(images, dtype=MODES[mode])
    end = HEADER_BYTES + (first + n) * _image_bytes(h)
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + first * _image_bytes(h))
        f.write(data.tobytes())
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
        if on_step is not None:
            on_step("stack_data")
        _write_nz(f, first + n)
    return first, n


def truncate(path: str | Path, n: int) -> None:
    """Cut the stack to its first ``n`` images and set NZ = n (NZ is lowered first, then the data cut)."""
    path = Path(path)
    h = read_header(path)
    on_disk = images_on_disk(path)
    if n > on_disk:
        raise StackError(f"{path}: cannot keep {n} images, the file holds only {on_disk}")
    with open(path, "r+b") as f:
        if int(h["nz"]) != n:
            _write_nz(f, n)
        f.truncate(HEADER_BYTES + n * _image_bytes(h))
        f.flush()
        os.fsync(f.fileno())


def read(path: str | Path, first: int = 0, n: int | None = None) -> np.ndarray:
    """Images ``first .. first + n - 1`` (0-based) as (n, b, b) in the file's dtype (memory-mapped read)."""
    h = read_header(path)
    total = int(h["nz"])
    n = total - first if n is None else n
    if first < 0 or n < 0 or first + n > total:
        raise StackError(f"{path}: images {first}..{first + n - 1} requested, the stack holds {total}")
    shape = (n, int(h["ny"]), int(h["nx"]))
    if n == 0:
        return np.zeros(shape, dtype=MODES[int(h["mode"])])
    mm = np.memmap(path, dtype=MODES[int(h["mode"])], mode="r", offset=HEADER_BYTES + first * _image_bytes(h), shape=shape)
    return np.array(mm)
