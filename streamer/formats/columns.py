"""The per-particle columns of an output folder, and the text values STAR and .cs files can carry.

``ColumnSet``: lmc's own columns (``BASE``) plus the columns carried from the pick files, each a
RELION label (``rln...``, written to particles.star and .cs) or a cryoSPARC field (``cs:<field>``,
``cs:<field>#k``: particles.cs only) with a kind (``f`` floating, ``i`` integer, ``s`` text). The SESSION fixes it (from a
pick file it reads itself) and stores it in the ledger; a worker's result never decides it. A
result is accepted only with exactly the carried labels the session expects for that movie.

Text values (``check_text``, ``star_quote``). What the readers do with a loop value (facts relied on):

* RELION (``src/strings.cpp``, 3.1-5.0): every data line first goes through ``simplify()``, which
  drops ``\\n \\v \\b \\r \\f \\a``, turns ``\\t`` into a space and collapses every run of spaces
  (inside quotes too); ``nextTokenInSTAR()`` then splits on spaces, takes a token starting with
  ``"`` or ``'`` as quoted up to the matching quote followed by a space or the end of the line, and
  a token starting with ``#`` as a comment. RELION's writer (``escapeStringForSTAR``) writes ``""``
  for an empty string and double-quotes a value that contains a space/tab or starts with a quote.
* starfile (Python, 0.5): replaces every ``'`` of a loop by ``"`` and reads it with pandas'
  ``read_csv(delimiter=r"\\s+", comment="#")`` (``"`` quoting).

So a value round-trips through both exactly when it has no control character, no quote character
(``"`` or ``'``), no run of two spaces and no leading/trailing space; it is written double-quoted when
it is empty, contains a space or a ``#``, or starts with a character or word STAR reserves (``_``,
``$``, ``;``, ``data_``, ``loop_``, ``save_``, ``global_``, ``stop_``). Anything else is refused with
one line naming the value, never written (a newline would otherwise start a new row).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from streamer.errors import InputError

BASE: tuple[tuple[str, str], ...] = (
    ("rlnImageName", "s"),
    ("rlnMicrographName", "s"),
    ("rlnCoordinateX", "f"),
    ("rlnCoordinateY", "f"),
    ("rlnOpticsGroup", "i"),
)
BASE_LABELS = frozenset(label for label, _ in BASE)
KINDS = frozenset("fis")
LABEL_RE = re.compile(r"^rln[A-Za-z0-9_]+$")
# a cryoSPARC field carried from an input .cs into particles.cs only: cs:<field>, cs:<field>#<element>
CS_LABEL_RE = re.compile(r"^cs:[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*(#[0-9]+)?$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_RESERVED_RE = re.compile(r"^(data_|loop_|save_|global_|stop_)", re.IGNORECASE)
MAX_TEXT = 4096


def writable_label(label: str) -> bool:
    """A RELION label (particles.star and .cs) or a cryoSPARC field (particles.cs)."""
    return bool(LABEL_RE.match(label) or CS_LABEL_RE.match(label))


class ColumnError(InputError):
    """A column set, a column or a text value that the output files cannot carry."""


def kind_of(values: np.ndarray) -> str:
    """'i' integer/bool, 'f' floating, 's' text."""
    k = np.asarray(values).dtype.kind
    return "i" if k in "iub" else "f" if k == "f" else "s"


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be written to a STAR/.cs text field unchanged, or None."""
    if not isinstance(value, str):
        return f"not text ({type(value).__name__})"
    if len(value) > MAX_TEXT:
        return f"longer than {MAX_TEXT} characters"
    m = _CONTROL_RE.search(value)
    if m:
        return f"contains a control character ({m.group()!r})"
    if '"' in value or "'" in value:
        return "contains a quote character (RELION and starfile readers cannot read it back)"
    if "  " in value or value != value.strip():
        return "has leading, trailing or repeated spaces (RELION's reader collapses them)"
    return None


def check_text(value: str, what: str) -> str:
    """``value`` if it can be written; else ColumnError naming ``what`` and the reason."""
    problem = text_problem(value)
    if problem:
        raise ColumnError(f"{what} {value!r}: {problem}")
    return value


def star_quote(value: str) -> str:
    """``value`` as a STAR loop token (checked with ``check_text`` first)."""
    check_text(value, "STAR value")
    if not value or " " in value or "#" in value or value[0] in "_$;" or _RESERVED_RE.match(value):
        return f'"{value}"'
    return value


@dataclass(frozen=True)
class ColumnSet:
    """lmc's columns plus the carried ones: ``carried`` = ((label, kind), ...) in output order."""

    carried: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for item in self.carried:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ColumnError(f"column {item!r}: expected (label, kind)")
            label, kind = item
            if not isinstance(label, str) or not (LABEL_RE.match(label) or CS_LABEL_RE.match(label)):
                raise ColumnError(f"column {label!r}: not a RELION label (rln[A-Za-z0-9_]+) "
                                  "or a cryoSPARC field (cs:<field>[#k])")
            if kind not in KINDS:
                raise ColumnError(f"column {label}: kind {kind!r} is not one of f, i, s")
            if label in BASE_LABELS:
                raise ColumnError(f"column {label}: written by lmc itself, cannot be carried")
            if label in seen:
                raise ColumnError(f"column {label}: declared twice")
            seen.add(label)

    @classmethod
    def of(cls, carried: Mapping[str, str] | Iterable[tuple[str, str]]) -> ColumnSet:
        """From ``{label: kind}`` or pairs: the labels an output file can hold (``rln...`` and
        ``cs:...``), lmc's own labels left out (lmc writes them). Other labels of a pick file (a
        program's private columns) have nowhere to go and are not carried."""
        items = carried.items() if isinstance(carried, Mapping) else carried
        return cls(tuple((str(k), str(v)) for k, v in items if k not in BASE_LABELS and writable_label(str(k))))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.carried)

    @property
    def kinds(self) -> dict[str, str]:
        return dict(self.carried)

    def star_columns(self) -> list[tuple[str, str]]:
        """Every column of ``particles.star`` in order: lmc's, then the carried RELION ones (``cs:``
        fields go to ``particles.cs`` only)."""
        return [*BASE, *((label, kind) for label, kind in self.carried if LABEL_RE.match(label))]

    def to_json(self) -> str:
        return json.dumps([list(c) for c in (*BASE, *self.carried)])

    @classmethod
    def from_json(cls, text: str) -> ColumnSet:
        """Inverse of ``to_json`` (also reads the ledger meta ``star_columns`` of older folders)."""
        try:
            cols = [tuple(c) for c in json.loads(text)]
        except (ValueError, TypeError):
            raise ColumnError(f"stored column set {text[:80]!r} is not JSON") from None
        return cls(tuple((str(a), str(b)) for a, b in cols if a not in BASE_LABELS))

    def expected(self, available: Mapping[str, str]) -> dict[str, str]:
        """What one movie's result must carry, given its pick file's ``{label: kind}`` (as
        ``picks.pick_summary`` reads it): exactly those columns (the worker reads the same file). A
        label the folder carries with an incompatible kind is refused (the folder's column would mix)."""
        mine = self.kinds
        for label, kind in available.items():
            if label in mine and not _kind_fits(kind, mine[label]):
                raise ColumnError(f"column {label}: {_KIND_NAME[kind]} in this pick file, "
                                  f"{_KIND_NAME[mine[label]]} in this output folder")
        return dict(available)

    def carried_of(self, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The columns of a checked result that this folder carries (the others are not written)."""
        mine = self.kinds
        return {k: v for k, v in columns.items() if k in mine}

    def check(self, columns: Mapping[str, np.ndarray], expected: Mapping[str, str] | None, n: int,
              what: str) -> None:
        """Refuse (ColumnError) ``columns`` unless they are exactly ``expected`` (when given: the pick
        file's columns; else a subset of this set), each (n,), of its kind (and, where this folder
        carries it, of the folder's kind), numbers finite, text writable."""
        labels = set(columns)
        want = set(expected) if expected is not None else set(self.kinds)
        if (expected is not None and labels != want) or not labels <= want:
            missing, extra = sorted(want - labels) if expected is not None else [], sorted(labels - want)
            raise ColumnError(f"{what}: columns differ from the pick file's "
                              f"(missing {', '.join(missing) or '-'}; unexpected {', '.join(extra) or '-'})"
                              if expected is not None else
                              f"{what}: column {', '.join(extra)} is not one of this output folder's columns")
        mine = self.kinds
        for label, values in columns.items():
            kind = expected[label] if expected is not None else mine[label]
            check_values(values, kind, n, f"{what}: column {label}")
            if label in mine:
                check_values(values, mine[label], n, f"{what}: column {label}")


_KIND_NAME = {"f": "numbers", "i": "integers", "s": "text"}


def _kind_fits(actual: str, declared: str) -> bool:
    """Integers fit a floating column; nothing else changes kind."""
    return actual == declared or (actual == "i" and declared == "f")


def check_values(values: np.ndarray, kind: str, n: int, what: str) -> None:
    """One column: shape (n,), of ``kind``; numbers finite; text writable (ColumnError otherwise)."""
    a = np.asarray(values)
    if a.shape != (n,):
        raise ColumnError(f"{what}: shape {a.shape}, expected ({n},)")
    actual = kind_of(a)
    if not _kind_fits(actual, kind):
        raise ColumnError(f"{what}: holds {_KIND_NAME[actual]}, the folder's column holds {_KIND_NAME[kind]}")
    if kind in "fi":
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ColumnError(f"{what}: holds a value that is not a finite number")
        return
    for v in a.tolist():
        check_text(v, what)


def check_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    """Every floating array finite (ColumnError naming the first that is not)."""
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise ColumnError(f"{what}: {name} holds a value that is not a finite number")
