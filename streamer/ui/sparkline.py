"""One-line trends drawn with the eight Unicode block heights (▁..█)."""

from __future__ import annotations

import math
from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"


def _finite(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def resample(values: Sequence[object], width: int) -> list[float | None]:
    """``values`` fitted to ``width`` cells: the newest ``width`` values as they are, or, when there
    are more, the mean of each of ``width`` consecutive groups (so the whole session stays visible).
    Missing / non-finite values are None (a gap)."""
    vals = [_finite(v) for v in values]
    if width <= 0:
        return []
    if len(vals) <= width:
        return vals
    out: list[float | None] = []
    n = len(vals)
    for i in range(width):
        group = [v for v in vals[i * n // width:(i + 1) * n // width] if v is not None]
        out.append(sum(group) / len(group) if group else None)
    return out


def sparkline(values: Sequence[object], width: int, lo: float | None = None, hi: float | None = None) -> str:
    """A string of at most ``width`` block characters, one per (resampled) value.

    Cell height is ``round((v - lo) / (hi - lo) * 7)`` over ``BLOCKS``; ``lo``/``hi`` default to the
    data range (a constant series draws at the lowest block). Gaps are spaces.
    """
    cells = resample(values, width)
    finite = [v for v in cells if v is not None]
    if not finite:
        return " " * len(cells)
    lo = min(finite) if lo is None else lo
    hi = max(finite) if hi is None else hi
    span = hi - lo
    chars = []
    for v in cells:
        if v is None:
            chars.append(" ")
            continue
        level = 0 if span <= 0 else round((min(max(v, lo), hi) - lo) / span * (len(BLOCKS) - 1))
        chars.append(BLOCKS[level])
    return "".join(chars)
