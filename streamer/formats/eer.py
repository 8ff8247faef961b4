"""EER movies (Thermo Fisher Falcon 4/4i): read with fractionation and upsampling; write (for tests and simulation).

The format, as established against ``imagecodecs.eer_decode`` (the decoder tifffile uses) and the public
description of Guo et al., IUCrJ 7:860 (2020):

* A BigTIFF with one page per raw detector frame, compression 65000 (8-bit skips), 65001 (7-bit skips) or
  65002 (skip / sub-pixel bit widths in tags 65007 / 65008 / 65009). The first page carries the acquisition
  metadata XML in tag 65001 (type UNDEFINED, starting with ``b"<metadata>"``): tifffile recognises EER by it.
  An uncompressed first page, where present, is an integrated image and not a raw frame.
* A page's strip is a bit stream read least-significant bit first. Pixels are visited in raster order
  (``p = y * w + x``) from ``p = 0``. Each code starts with a skip of S bits (S = 7 or 8): ``p += skip``.
  A skip of ``2**S - 1`` is a continuation (no electron, the next code follows at once). Any other skip is
  followed by 4 sub-pixel bits; an electron is placed at pixel ``p`` and ``p += 1``. Hence a raw frame holds
  at most ONE electron per detector pixel.
* Sub-pixel bits store ``offset ^ 2`` (x in bits 0-1, y in bits 2-3): on the 16x-area ("16K" for a 4K
  sensor) grid the event sits at ``x16 = 4 * x + ((sub & 3) ^ 2)``, ``y16 = 4 * y + ((sub >> 2 & 3) ^ 2)``.
  Upsampling ``u`` (1, 2, 4) puts it in pixel ``x16 // (4 // u)``.
* A frame ends when ``p`` reaches ``w * h`` exactly (a final code landing on ``p == w * h`` places no
  electron). The decoder rejects streams that overshoot, and strips of odd byte length, so the encoder pads
  with a zero byte.
* The decoder reads a code only if it starts MORE than ``S + 4`` bits before the end of the strip (its loop
  runs while ``bit < 8 * nbytes - (S + 4)``), and silently stops otherwise. An electron code that ends
  exactly on the strip's end is therefore dropped, which happens whenever the last pixel holds an electron
  and the stream stops right after it with no padding left over. The encoder always ends a frame with a
  terminating code (a skip of 0 when the last pixel holds an electron), so at least ``S`` bits follow the
  last electron code.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from streamer.errors import MovieError

EER_COMPRESSIONS = (65000, 65001, 65002)
SUBPIXEL_BITS = 2  # per axis, in the 65000/65001 codes (65002 states its own in tags 65008/65009)


# -- reading ---------------------------------------------------------------------------------------


def _eer_pages(tf: tifffile.TiffFile, path: str) -> list:
    """The raw-frame pages of an open EER file (an integrated first page is skipped). Pages after the first
    raw one are tifffile frames (IFD offsets and strips only) so that thousands of pages parse quickly."""
    first = tf.pages.first
    start = 0
    if first.compression not in EER_COMPRESSIONS:
        if len(tf.pages) < 2:
            raise MovieError(path, f"not an EER movie (compression {first.compression})")
        start = 1
    tf.pages.useframes = True
    tf.pages.set_keyframe(start)
    key = tf.pages[start]
    if key.compression not in EER_COMPRESSIONS:
        raise MovieError(path, f"not an EER movie (compression {key.compression})")
    return [tf.pages[i] for i in range(start, len(tf.pages))]


def _code_bits(key: tifffile.TiffPage) -> tuple[int, int, int]:
    """(skip bits, horizontal sub-pixel bits, vertical sub-pixel bits) of an EER key page."""
    if key.compression == 65002:
        return (
            int(key.tags.valueof(65007, 7)),
            int(key.tags.valueof(65008, SUBPIXEL_BITS)),
            int(key.tags.valueof(65009, SUBPIXEL_BITS)),
        )
    return (8 if key.compression == 65000 else 7), SUBPIXEL_BITS, SUBPIXEL_BITS


def eer_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """(number of raw frames, h, w) at upsampling 1, from the IFDs only (no decoding)."""
    path = str(path)
    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tf:
            pages = _eer_pages(tf, path)
            h, w = pages[0].keyframe.shape[-2:]
            return len(pages), int(h), int(w)
    except MovieError:
        raise
    except Exception as exc:  # tifffile raises many types on damaged files
        raise MovieError(path, f"not a readable EER/TIFF file ({exc})") from None


@contextmanager
def quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's log warnings ("invalid page offset") about files still being written: a watcher
    probes them every few seconds."""
    logger = logging.getLogger("tifffile")
    drop = logging.Filter(name="\0")  # matches no logger name: drops every record
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _next_ifd(tf: tifffile.TiffFile, page: tifffile.TiffPage | tifffile.TiffFrame) -> int:
    """Offset of the IFD after ``page`` as written in the file (0 = last page)."""
    t = tf.tiff
    fh = tf.filehandle
    fh.seek(page.offset)
    (ntags,) = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))
    fh.seek(page.offset + t.tagnosize + ntags * t.tagsize)
    raw = fh.read(t.offsetsize)
    if len(raw) < t.offsetsize:
        return -1
    return struct.unpack(t.offsetformat, raw)[0]


def tiff_problem(tf: tifffile.TiffFile, pages: list) -> str:
    """Why the pages of an open TIFF are not all present in the file ('' when they are)."""
    size = tf.filehandle.size
    if not pages:
        return "no pages"
    for page in pages:
        offsets = np.asarray(page.dataoffsets, np.int64)
        ends = offsets + np.asarray(page.databytecounts, np.int64)
        if len(ends) == 0 or ends.max() > size or (offsets == 0).any():
            return f"truncated: page {page.index} lies beyond the end of the file ({size} bytes)"
    following = _next_ifd(tf, pages[-1])
    if following != 0:
        return f"truncated: the file declares more than the {len(pages)} pages it holds"
    return ""


@contextmanager
def _open_whole_eer(path: str) -> Iterator[tuple[tifffile.TiffFile, list]]:
    """The open file and its raw-frame pages, after checking that every page lies inside the file."""
    try:
        with quiet_tifffile():  # damage is reported in one line, below
            tf = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises many types on damaged files
        raise MovieError(path, f"not a readable EER/TIFF file ({exc})") from None
    with tf:
        try:
            with quiet_tifffile():
                pages = _eer_pages(tf, path)
                problem = tiff_problem(tf, pages)
        except MovieError:
            raise
        except Exception as exc:
            raise MovieError(path, f"unreadable EER page structure ({exc})") from None
        if problem:
            raise MovieError(path, problem)
        yield tf, pages


def read_eer(path: str | os.PathLike, upsampling: int, fractions: int, threads: int = 0) -> tuple[np.ndarray, int, int]:
    """Decode an EER movie into ``fractions`` summed frames.

    Returns ``(frames, n_raw, leftover)``: ``frames`` is ``(fractions, h * u, w * u)`` electron counts (uint8
    when a fraction sums at most 255 raw frames, else uint16); raw frames ``[f * n, (f + 1) * n)`` with
    ``n = n_raw // fractions`` make fraction ``f``; the last ``leftover = n_raw - fractions * n`` raw frames are
    not used (the caller reports them). ``u = upsampling`` is 1 (detector grid), 2 or 4 (using the sub-pixel
    bits). Fractions are decoded in parallel (``threads`` workers, 0 = all cores), each accumulating its raw
    frames straight into its output frame, so no raw frame is ever held decoded.
    """
    path = str(path)
    if upsampling not in (1, 2, 4):
        raise MovieError(path, f"EER upsampling must be 1, 2 or 4 (got {upsampling})")
    level = {1: 0, 2: 1, 4: 2}[upsampling]
    with _open_whole_eer(path) as (tf, pages):
        n_raw = len(pages)
        if fractions < 1 or fractions > n_raw:
            raise MovieError(path, f"eer.fractions = {fractions} but the movie has {n_raw} raw frames")
        key = pages[0].keyframe
        h, w = (int(s) for s in key.shape[-2:])
        skipbits, horzbits, vertbits = _code_bits(key)
        uy, ux = 2 ** min(vertbits, level), 2 ** min(horzbits, level)
        if (uy, ux) != (upsampling, upsampling):
            raise MovieError(
                path, f"upsampling {upsampling} needs {level} sub-pixel bits; the file has {horzbits}x{vertbits}"
            )
        rows = int(key.rowsperstrip) or h
        per = n_raw // fractions
        dtype = np.uint8 if per <= np.iinfo(np.uint8).max else np.uint16
        frames = np.zeros((fractions, h * upsampling, w * upsampling), dtype)
        fh = tf.filehandle
        lock = threading.Lock()

        def read_strip(offset: int, count: int) -> bytes:
            with lock:  # one shared handle: seek + read must not interleave
                fh.seek(offset)
                return fh.read(count)

        full_y, full_x = 2**vertbits, 2**horzbits

        def decode_strip(data: bytes, rows_in_strip: int, out: np.ndarray) -> None:
            shape = (rows_in_strip * upsampling, w * upsampling)
            if level == 0 or (shape[0] % full_y == 0 and shape[1] % full_x == 0):
                imagecodecs.eer_decode(data, shape, skipbits, horzbits, vertbits, superres=level, out=out)
                return
            # imagecodecs only upsamples grids that are multiples of the full sub-pixel factor (odd sizes at
            # upsampling 2): decode at full sub-pixel resolution and bin down instead
            fine = imagecodecs.eer_decode(
                data,
                (rows_in_strip * full_y, w * full_x),
                skipbits,
                horzbits,
                vertbits,
                superres=max(vertbits, horzbits),
            )
            by, bx = full_y // upsampling, full_x // upsampling
            out += fine.reshape(shape[0], by, shape[1], bx).sum(axis=(1, 3), dtype=out.dtype)

        def decode_fraction(f: int) -> None:
            out = frames[f]
            for page in pages[f * per : (f + 1) * per]:
                for s, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
                    r0, r1 = s * rows, min(h, (s + 1) * rows)
                    data = read_strip(int(offset), int(count))
                    try:
                        decode_strip(data, r1 - r0, out[r0 * upsampling : r1 * upsampling])
                    except Exception as exc:
                        raise MovieError(path, f"raw frame {page.index}: corrupt EER data ({exc})") from None

        workers = max(1, min(threads or os.cpu_count() or 1, fractions))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(decode_fraction, range(fractions)))  # list(): re-raise a worker's error here
    return frames, n_raw, n_raw - fractions * per


# -- writing ---------------------------------------------------------------------------------------


def _pack_codes(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate codes ``values[i]`` of ``widths[i]`` bits, least-significant bit first, padded with zero
    bits to an even number of bytes."""
    offsets = np.cumsum(widths, dtype=np.int64) - widths
    total = int(offsets[-1] + widths[-1]) if len(widths) else 0
    nbytes = -(-total // 8)
    nbytes += nbytes % 2
    bits = np.zeros(nbytes * 8, np.uint8)
    for b in range(int(widths.max()) if len(widths) else 0):
        sel = widths > b
        bits[offsets[sel] + b] = (values[sel] >> b) & 1
    return np.packbits(bits, bitorder="little").tobytes()


def encode_frame(pixels: np.ndarray, subpixels: np.ndarray, npix: int, skipbits: int) -> bytes:
    """EER bit stream of one raw frame.

    ``pixels``: strictly increasing raster indices ``y * w + x`` of the electrons (at most one per pixel);
    ``subpixels``: their 4 sub-pixel bits as stored (``(x16 & 3) ^ 2 | ((y16 & 3) ^ 2) << 2``).
    """
    cont = (1 << skipbits) - 1
    pixels = np.asarray(pixels, np.int64)
    previous_end = np.concatenate(([0], pixels[:-1] + 1))
    gaps = pixels - previous_end
    # the terminating run to p == npix: continuations, then one code whose electron falls off the end
    tail = npix - (int(pixels[-1]) + 1 if len(pixels) else 0)
    gaps = np.concatenate((gaps, [tail]))
    sub = np.concatenate((np.asarray(subpixels, np.int64), [0]))
    n_cont = gaps // cont
    last_code = gaps % cont
    has_code = np.ones(len(gaps), bool)
    # an exact multiple of the continuation already lands on npix; an empty tail (electron in the last pixel)
    # still gets a skip-0 code: the decoder ignores a code that ends on the last bit of the strip (docstring)
    has_code[-1] = last_code[-1] != 0 or n_cont[-1] == 0
    per_event = n_cont + has_code
    total = int(per_event.sum())
    owner = np.repeat(np.arange(len(gaps)), per_event)
    within = np.arange(total) - np.repeat(np.cumsum(per_event) - per_event, per_event)
    is_code = has_code[owner] & (within == n_cont[owner])
    values = np.where(is_code, last_code[owner] | (sub[owner] << skipbits), cont)
    widths = np.where(is_code, skipbits + 4, skipbits)
    return _pack_codes(values, widths)


def _events_to_codes(xs: np.ndarray, ys: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(sorted unique raster pixels, their stored sub-pixel bits, number of events dropped as duplicates)."""
    w = shape[1]
    pix = (ys >> 2) * w + (xs >> 2)
    sub = ((xs & 3) ^ 2) | (((ys & 3) ^ 2) << 2)
    order = np.argsort(pix, kind="stable")  # stable: the first listed event of a pixel is the one kept
    pix, sub = pix[order], sub[order]
    keep = np.ones(len(pix), bool)
    keep[1:] = pix[1:] != pix[:-1]
    return pix[keep], sub[keep], int(len(pix) - keep.sum())


def _refuse_array_encoding(*args: object, **kwargs: object) -> bytes:
    raise NotImplementedError("EER pages are written from pre-encoded bit streams only")


@contextmanager
def _tifffile_accepts(code: int) -> Iterator[None]:
    """Let tifffile write strips of compression ``code`` given as pre-encoded bytes.

    tifffile looks up an encoder for every compression it writes, even when handed encoded bytes, and has
    none for EER; there is no public hook, so a stub that is never called is placed in its codec cache
    for the duration of the write.
    """
    codecs = getattr(tifffile.TIFF.COMPRESSORS, "_codecs", None)
    if not isinstance(codecs, dict):
        raise RuntimeError("this tifffile version offers no way to write EER pages")
    previous = codecs.get(code)
    codecs[code] = _refuse_array_encoding
    try:
        yield
    finally:
        if previous is None:
            codecs.pop(code, None)
        else:
            codecs[code] = previous


def write_eer(
    path: str | os.PathLike,
    events: Iterable[tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, int],
    compression: int = 65001,
) -> int:
    """Write an EER movie; returns the number of events dropped.

    ``events[i] = (xs, ys)``: integer coordinates of raw frame ``i``'s electrons on the 4x super-resolution
    grid (``0 <= xs < 4 * w``, ``0 <= ys < 4 * h``, ``shape = (h, w)`` the detector grid). The format holds at
    most one electron per DETECTOR pixel per raw frame (see the module docstring), so further events in an
    already occupied pixel of the same raw frame are dropped (the first listed is kept) and counted; use
    ``split_counts`` to spread counts over raw frames without loss. ``compression``: 65001 (7-bit skips),
    65000 (8-bit skips) or 65002 (7-bit skips, 2+2 sub-pixel bits, stated in tags 65007-65009).
    """
    path = str(path)
    if compression not in EER_COMPRESSIONS:
        raise ValueError(f"{path}: EER compression must be one of {EER_COMPRESSIONS} (got {compression})")
    h, w = (int(s) for s in shape)
    skipbits = 8 if compression == 65000 else 7
    npix = h * w
    meta = (
        "<metadata>"
        f'<item name="sensorImageWidth">{w}</item>'
        f'<item name="sensorImageHeight">{h}</item>'
        '<item name="software">lmc write_eer</item>'
        "</metadata>"
    ).encode()
    code_tags = [(65007, "H", 1, skipbits, True), (65008, "H", 1, 2, True), (65009, "H", 1, 2, True)]
    dropped = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _tifffile_accepts(compression), tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, (xs, ys) in enumerate(events):
            xs = np.asarray(xs, np.int64).ravel()
            ys = np.asarray(ys, np.int64).ravel()
            if xs.shape != ys.shape:
                raise ValueError(f"{path}: raw frame {i}: {len(xs)} x coordinates but {len(ys)} y coordinates")
            if len(xs) and (xs.min() < 0 or ys.min() < 0 or xs.max() >= 4 * w or ys.max() >= 4 * h):
                raise ValueError(f"{path}: raw frame {i}: event outside the {4 * h}x{4 * w} super-resolution grid")
            pix, sub, n_dup = _events_to_codes(xs, ys, (h, w))
            dropped += n_dup
            strip = encode_frame(pix, sub, npix, skipbits)
            extratags = [(65001, 7, len(meta), meta, True)] if i == 0 else []
            if compression == 65002:
                extratags = extratags + code_tags
            tw.write(
                iter([strip]),
                shape=(h, w),
                dtype=np.uint8,
                compression=compression,
                photometric="minisblack",
                rowsperstrip=h,
                extratags=extratags,
                metadata=None,
            )
    return dropped


# -- simulation helpers ----------------------------------------------------------------------------


def counts_to_events(
    counts: np.ndarray, rng: np.random.Generator, max_per_pixel: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Electron counts of one raw frame ``(h, w)`` -> event coordinates ``(xs, ys)`` on the 4x grid.

    Each pixel's electrons get distinct sub-pixel positions drawn uniformly from its 4x4 cells. Counts are
    clipped to ``max_per_pixel`` (at most 16, the number of cells). The default 1 is what one EER raw frame
    can hold (``write_eer`` drops the rest); spread larger counts over raw frames with ``split_counts``.
    """
    if not 1 <= max_per_pixel <= 16:
        raise ValueError(f"max_per_pixel must be 1..16 (got {max_per_pixel})")
    counts = np.clip(np.asarray(counts), 0, max_per_pixel).astype(np.int64)
    ys, xs = np.nonzero(counts)
    c = counts[ys, xs]
    # a random permutation of the 16 cells per pixel; its first c entries are the distinct positions
    cells = np.argsort(rng.random((len(c), 16)), axis=1)
    take = np.arange(16) < c[:, None]
    cell = cells[take]
    owner = np.repeat(np.arange(len(c)), c)
    return 4 * xs[owner] + (cell & 3), 4 * ys[owner] + (cell >> 2)


def split_counts(counts: np.ndarray, n_raw: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Spread counts ``(h, w)`` over ``n_raw`` raw frames, at most one electron per pixel per frame.

    Yields ``n_raw`` bool frames ``(h, w)``; each pixel's ``min(count, n_raw)`` electrons fall in a uniformly
    random subset of the frames (selection sampling: keep frame t with probability remaining / frames left),
    holding one frame at a time.
    """
    remaining = np.clip(np.asarray(counts), 0, n_raw).astype(np.int64)
    for t in range(n_raw):
        hit = rng.random(remaining.shape) * (n_raw - t) < remaining
        remaining -= hit
        yield hit
