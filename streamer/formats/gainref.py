"""Gain references and defect maps, oriented and shaped to the movie frames.

This module reads the files and checks that they fit the movie (naming the user's file when they do
not); the array operations are the engine's, stated and tested once in ``gpu.gain``: orientation
(:func:`gpu.gain.orient_gain`: first ``numpy.rot90(g, k=rotate)``, quarter turns counter-clockwise
on ``(h, w)``, then ``flip_x`` reverses columns, then ``flip_y`` reverses rows) and the float32
MULTIPLIER (:func:`gpu.gain.gain_multiplier`) so the engine always computes ``corrected = raw * m``:
``multiply`` gains are used as they are, ``divide`` gains are inverted, 0 where the gain is not
finite or (divide) 0.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import tifffile

from gpu.gain import gain_multiplier, orient_gain
from streamer.config import GainConfig
from streamer.errors import GainError

_IMAGE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".gain")


def _read_image(path: str, what: str) -> np.ndarray:
    """A 2-D image from .mrc/.mrcs (mrcfile) or a TIFF (.tif/.tiff/EER .gain, tifffile); a 3-D file with one
    section is accepted."""
    try:
        if path.lower().endswith((".mrc", ".mrcs")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # gains from some cameras have minor header defects
                with mrcfile.open(path, permissive=True) as mrc:
                    if mrc.data is None:
                        raise GainError(f"{path}: {what}: MRC data block unreadable (truncated or unknown mode)")
                    image = np.array(mrc.data)
        else:
            image = tifffile.imread(path)
    except GainError:
        raise
    except FileNotFoundError:
        raise GainError(f"{path}: {what} not found") from None
    except Exception as exc:  # the readers raise many types on damaged files
        raise GainError(f"{path}: {what} not readable ({exc})") from None
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise GainError(f"{path}: {what} must be one 2-D image (got shape {image.shape})")
    return image


def _fit(image: np.ndarray, frame_shape: tuple[int, int], upsampling: int, path: str, what: str) -> np.ndarray:
    """Repeat a detector-grid image ``upsampling`` times per axis when the frames are upsampled (EER)."""
    frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
    if image.shape == frame_shape:
        return image
    u = int(upsampling)
    if u > 1 and (image.shape[0] * u, image.shape[1] * u) == frame_shape:
        return np.repeat(np.repeat(image, u, axis=0), u, axis=1)
    hint = ""
    if image.shape[::-1] == frame_shape or (u > 1 and (image.shape[1] * u, image.shape[0] * u) == frame_shape):
        hint = " (the transposed shape matches: try gain.rotate: 1)"
    elif frame_shape[0] % image.shape[0] == 0 and frame_shape[0] // image.shape[0] == frame_shape[1] / image.shape[1]:
        hint = f" (frames are {frame_shape[0] // image.shape[0]}x finer: check eer.upsampling or super-resolution)"
    elif image.shape[0] % frame_shape[0] == 0 and image.shape[0] // frame_shape[0] == image.shape[1] / frame_shape[1]:
        hint = f" ({what} is {image.shape[0] // frame_shape[0]}x finer than the frames: binned movies?)"
    raise GainError(
        f"{path}: {what} is {image.shape[0]}x{image.shape[1]} (h x w) after orientation but frames are "
        f"{frame_shape[0]}x{frame_shape[1]}{hint}"
    )


def gain_mode(path: str | os.PathLike, mode: str) -> str:
    """``multiply`` or ``divide``; ``auto`` is ``divide`` for EER ``.gain`` files and ``multiply`` otherwise."""
    if mode == "auto":
        return "divide" if str(path).lower().endswith(".gain") else "multiply"
    if mode not in ("multiply", "divide"):
        raise GainError(f"{path}: gain.mode must be multiply, divide or auto (got {mode!r})")
    return mode


def read_gain(
    path: str | os.PathLike, gain: GainConfig, frame_shape: tuple[int, int], upsampling: int = 1
) -> np.ndarray:
    """The gain as a float32 multiplier ``(h, w)`` for frames of ``frame_shape``.

    Reads ``.mrc`` (mrcfile), ``.tif/.tiff`` and EER ``.gain`` (TIFF) files; orients per ``gain.rotate``,
    ``gain.flip_x``, ``gain.flip_y``; ``divide`` gains become ``1 / g`` (0 where ``g`` is 0 or not finite),
    ``multiply`` gains are used as they are (0 where not finite). A detector-grid gain is repeated
    ``upsampling`` x ``upsampling`` per pixel for upsampled EER frames. Raises ``GainError``.
    """
    path = str(path)
    mode = gain_mode(path, gain.mode)
    image = _read_image(path, "gain reference").astype(np.float32, copy=False)
    image = orient_gain(image, gain.rotate, gain.flip_x, gain.flip_y)
    image = _fit(image, frame_shape, upsampling, path, "gain reference")
    out = gain_multiplier(image, mode)
    if not out.any():
        raise GainError(f"{path}: gain reference is zero everywhere (or not finite)")
    return out


_NUMBER = re.compile(r"[\s,]+")


def _defects_from_text(path: str, frame_shape: tuple[int, int]) -> np.ndarray:
    h, w = frame_shape
    mask = np.zeros((h, w), bool)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GainError(f"{path}: defect list not readable ({exc})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        fields = _NUMBER.split(body)
        try:
            values = [int(v) for v in fields]
        except ValueError:
            values = []
        if len(values) not in (2, 4):
            raise GainError(f"{path}:{lineno}: expected 'x y' or 'x y w h' (0-based pixels), got {line.strip()!r}")
        x, y = values[:2]
        bw, bh = values[2:] if len(values) == 4 else (1, 1)
        if bw < 1 or bh < 1 or x < 0 or y < 0 or x + bw > w or y + bh > h:
            raise GainError(f"{path}:{lineno}: defect {line.strip()!r} lies outside the {w}x{h} (w x h) frame")
        mask[y : y + bh, x : x + bw] = True
    return mask


def read_defects(path: str | os.PathLike, frame_shape: tuple[int, int], upsampling: int = 1) -> np.ndarray:
    """Defect mask ``(h, w)`` bool (True = bad pixel).

    An image file (``.mrc/.mrcs/.tif/.tiff``: nonzero = defect) or a text list with one defect per line,
    ``x y`` (a pixel) or ``x y w h`` (a rectangle of w columns and h rows from (x, y)), 0-based, separated by
    spaces or commas; ``#`` starts a comment. Coordinates are in the frames' pixels; an image at the
    detector grid is repeated for ``upsampling``-times upsampled EER frames. Not oriented: defects are
    given in the movie's own frame. Raises ``GainError`` naming the file (and line).
    """
    path = str(path)
    frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
    if path.lower().endswith(_IMAGE_SUFFIXES):
        image = _read_image(path, "defect map")
        return _fit(image != 0, frame_shape, upsampling, path, "defect map")
    if not os.path.isfile(path):
        raise GainError(f"{path}: defect file not found")
    return _defects_from_text(path, frame_shape)
