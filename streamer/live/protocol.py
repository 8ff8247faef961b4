"""Wire format between the dispatcher and its workers: a JSON header plus raw array frames.

A message is a ZeroMQ multipart ``[header, frame_1, ..., frame_k]``. ``header`` is UTF-8 JSON
with ``v`` (protocol version), ``type`` and ``arrays``: one ``{"name", "dtype", "shape"}`` entry
per following frame, in order; each frame holds exactly ``prod(shape) * itemsize`` bytes of
little-endian, C-ordered data of a whitelisted dtype. Nothing is ever pickled: arrays are rebuilt
with ``numpy.frombuffer`` from the declared dtype and shape, and anything that does not match the
declaration raises :class:`ProtocolError` (the receiver logs and drops the message).

Message types (worker -> dispatcher): ``ready`` (``worker``: name/host/pid/device/gpu/wid),
``heartbeat``, ``started`` (``job_id``), ``result`` (``job_id`` + a MovieResult),
``error`` (``job_id``, ``movie``, ``reason``, ``user_error``), ``cancelled`` (``job_id``: a
prefetched job dropped unstarted), ``bye``.
(dispatcher -> worker): ``job`` (``job_id``, ``movie``, ``picks``, ``config``), ``heartbeat``,
``reset`` (register again), ``cancel`` (``job_id``: drop it unless already started), ``stop``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamer.formats.columns import _CONTROL_RE, ColumnError, ColumnSet, check_finite
from streamer.types import MovieResult

VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_NDIM = 4

# wire name -> explicit little-endian dtype; nothing else is accepted
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("|u1"),
    "bool": np.dtype("|b1"),
}

# required header fields (name -> accepted Python types) per message type
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ready": {"worker": (dict,)},
    "heartbeat": {},
    "started": {"job_id": (str,)},
    "result": {"job_id": (str,), "movie": (str,), "result": (dict,)},
    "error": {"job_id": (str,), "movie": (str,), "reason": (str,), "user_error": (bool,)},
    "bye": {},
    "cancelled": {"job_id": (str,)},
    "job": {"job_id": (str,), "movie": (str,), "picks": (str, type(None)), "config": (dict,)},
    "reset": {},
    "cancel": {"job_id": (str,)},
    "stop": {},
}
WORKER_TYPES = frozenset({"ready", "heartbeat", "started", "result", "error", "cancelled", "bye"})
DISPATCHER_TYPES = frozenset({"job", "heartbeat", "reset", "cancel", "stop"})


class ProtocolError(ValueError):
    """A message that does not follow the wire format (logged and dropped by the receiver)."""


@dataclass
class Message:
    """A decoded message: the JSON header (without ``arrays``) and the named arrays."""

    type: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _wire_dtype(a: np.ndarray) -> tuple[str, np.dtype]:
    for name, dt in DTYPES.items():
        if a.dtype.kind == dt.kind and a.dtype.itemsize == dt.itemsize:
            return name, dt
    raise ProtocolError(f"array dtype {a.dtype} cannot be sent (allowed: {', '.join(DTYPES)})")


def encode(type_: str, header: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None) -> list[Any]:
    """Frames for ``send_multipart(frames, copy=False)``: JSON header, then one buffer per array."""
    if type_ not in _FIELDS:
        raise ProtocolError(f"unknown message type {type_!r}")
    head: dict[str, Any] = {"v": VERSION, "type": type_, **(header or {})}
    specs: list[dict[str, Any]] = []
    frames: list[Any] = []
    for name, a in (arrays or {}).items():
        a = np.asarray(a)
        wire, dt = _wire_dtype(a)
        a = np.ascontiguousarray(a, dtype=dt)
        specs.append({"name": name, "dtype": wire, "shape": list(a.shape)})
        frames.append(memoryview(a.reshape(-1).view(np.uint8)))
    head["arrays"] = specs
    raw = json.dumps(head, default=_json_default, allow_nan=True).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return [raw, *frames]


def _buffer(frame: Any) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return memoryview(frame.buffer)
    return memoryview(frame)


def decode(frames: list[Any], allowed: frozenset[str] | None = None) -> Message:
    """Validate and decode a multipart message; raise ProtocolError with the reason otherwise."""
    if not frames:
        raise ProtocolError("empty message")
    head_buf = _buffer(frames[0])
    if len(head_buf) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head_buf)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        head = json.loads(bytes(head_buf).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("header is not UTF-8 JSON") from None
    if not isinstance(head, dict):
        raise ProtocolError("header is not a JSON object")
    if head.get("v") != VERSION:
        raise ProtocolError(f"protocol version {head.get('v')!r}, expected {VERSION}")
    type_ = head.get("type")
    if not isinstance(type_, str) or type_ not in _FIELDS:
        raise ProtocolError(f"unknown message type {type_!r}")
    if allowed is not None and type_ not in allowed:
        raise ProtocolError(f"message type {type_!r} not accepted here")
    for key, types_ in _FIELDS[type_].items():
        if key not in head:
            raise ProtocolError(f"{type_}: missing field {key!r}")
        if not isinstance(head[key], types_):
            raise ProtocolError(f"{type_}: field {key!r} has the wrong type ({type(head[key]).__name__})")
    specs = head.pop("arrays", [])
    if not isinstance(specs, list):
        raise ProtocolError("'arrays' is not a list")
    if len(specs) != len(frames) - 1:
        raise ProtocolError(f"header declares {len(specs)} arrays but {len(frames) - 1} frames follow")
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames[1:], strict=True):
        arrays_name, a = _decode_array(spec, _buffer(frame))
        if arrays_name in arrays:
            raise ProtocolError(f"array {arrays_name!r} declared twice")
        arrays[arrays_name] = a
    return Message(type=type_, header=head, arrays=arrays)


def _decode_array(spec: Any, buf: memoryview) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict):
        raise ProtocolError("array spec is not an object")
    name, wire, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not name:
        raise ProtocolError("array spec without a name")
    if wire not in DTYPES:
        raise ProtocolError(f"array {name!r}: dtype {wire!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ProtocolError(f"array {name!r}: bad shape {shape!r}")
    dt = DTYPES[wire]
    expected = math.prod(shape) * dt.itemsize
    if buf.nbytes != expected:
        raise ProtocolError(f"array {name!r}: {buf.nbytes} bytes, shape {shape} {wire} needs {expected}")
    a = np.frombuffer(buf, dtype=dt).reshape(shape) if expected else np.zeros(shape, dtype=dt)
    return name, a


# -- MovieResult <-> message ------------------------------------------------------------------

_COL = "col/"
PLOT = "plot_png"
MAX_PLOT_BYTES = 32 << 20  # the diagnostic PNG (about 1000 px wide: a few MB at most)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def result_limit(n_picks: int, out_box: int, frames: int, n_columns: int) -> int:
    """The most bytes a result for this job can take: its particles (float32), coordinates, carried
    columns (8 bytes each, text bounded by the header limit), trajectories (raw + smooth, float64),
    full-frame shifts, the diagnostic PNG and the JSON header."""
    n, f = max(int(n_picks), 0), max(int(frames), 1)
    per_particle = 4 * out_box * out_box + 2 * 8 + 8 * n_columns + 2 * f * 2 * 8
    return n * per_particle + f * 2 * 8 + MAX_PLOT_BYTES + MAX_HEADER_BYTES


@dataclass(frozen=True)
class ResultSpec:
    """What the session expects of one job's result; anything else is refused.

    ``out_box``: particle box; ``n_picks``: rows of the job's pick file (particles + skips must equal
    it); ``frames``: the most frames the movie can give; ``apix``: the session's pixel size (None: not checked);
    ``columns``: the folder's ColumnSet and ``expected``: the carried labels this job must deliver
    (exactly); ``max_bytes``: the message size limit (``result_limit``)."""

    out_box: int
    n_picks: int
    frames: int
    apix: float | None
    columns: ColumnSet
    expected: dict[str, str]
    max_bytes: int


def encode_result(job_id: str, result: MovieResult, float16: bool = False) -> list[Any]:
    """A ``result`` message; particles travel as float16 when ``float16`` (half the bytes). The plot
    (``result.plot_png``) travels as a uint8 array: the session's writer writes it."""
    arrays: dict[str, np.ndarray] = {
        "particles": np.asarray(result.particles, dtype=np.float16 if float16 else np.float32),
        "x": np.asarray(result.x, dtype=np.float64),
        "y": np.asarray(result.y, dtype=np.float64),
        "frame_shifts": np.asarray(result.frame_shifts, dtype=np.float64),
        "traj_raw": np.asarray(result.traj_raw, dtype=np.float64),
        "traj_smooth": np.asarray(result.traj_smooth, dtype=np.float64),
    }
    text_columns: dict[str, list[str]] = {}
    for label, col in result.columns.items():
        col = np.asarray(col)
        if col.dtype.kind in "OUS":
            text_columns[label] = [str(v) for v in col.tolist()]
        else:
            arrays[_COL + label] = col
    if result.plot_png is not None:
        arrays[PLOT] = np.frombuffer(result.plot_png, dtype=np.uint8)
    meta = {
        "micrograph_shape": [int(v) for v in result.micrograph_shape],
        "apix": float(result.apix),
        "skipped": [[float(x), float(y), str(r)] for x, y, r in result.skipped],
        "stats": result.stats,
        "text_columns": text_columns,
    }
    return encode("result", {"job_id": job_id, "movie": result.movie, "result": meta}, arrays)


def decode_result(msg: Message, spec: ResultSpec | None = None) -> MovieResult:
    """Rebuild the MovieResult of a decoded ``result`` message, checking its shapes agree and, with
    ``spec``, its content against what the session expects (ProtocolError says what is wrong)."""
    if msg.type != "result":
        raise ProtocolError(f"expected a result message, got {msg.type!r}")
    meta = msg.header["result"]
    a = msg.arrays
    for key in ("particles", "x", "y", "frame_shifts", "traj_raw", "traj_smooth"):
        if key not in a:
            raise ProtocolError(f"result: array {key!r} missing")
    p = a["particles"]
    if p.ndim != 3 or p.shape[1] != p.shape[2]:
        raise ProtocolError(f"result: particles shape {p.shape} is not (n, b, b)")
    n = p.shape[0]
    fs = a["frame_shifts"]
    if fs.ndim != 2 or fs.shape[1] != 2:
        raise ProtocolError(f"result: frame_shifts shape {fs.shape} is not (F, 2)")
    n_frames = fs.shape[0]
    for key in ("x", "y"):
        if a[key].shape != (n,):
            raise ProtocolError(f"result: {key} shape {a[key].shape} is not ({n},)")
    for key in ("traj_raw", "traj_smooth"):
        if a[key].shape != (n, n_frames, 2):
            raise ProtocolError(f"result: {key} shape {a[key].shape} is not ({n}, {n_frames}, 2)")
    columns: dict[str, np.ndarray] = {}
    for key, col in a.items():
        if key.startswith(_COL):
            columns[key[len(_COL):]] = col
        elif key not in _RESULT_ARRAYS:
            raise ProtocolError(f"result: unexpected array {key!r}")
    text = meta.get("text_columns") or {}
    if not isinstance(text, dict):
        raise ProtocolError("result: text_columns is not an object")
    for label, values in text.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ProtocolError(f"result: text column {label!r} is not a list of strings")
        columns[label] = np.asarray(values, dtype=object)
    for label, col in columns.items():
        if col.shape != (n,):
            raise ProtocolError(f"result: column {label!r} shape {col.shape} is not ({n},)")
    shape = meta.get("micrograph_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ProtocolError(f"result: bad micrograph_shape {shape!r}")
    apix = meta.get("apix")
    if not isinstance(apix, (int, float)) or isinstance(apix, bool) or not apix > 0:
        raise ProtocolError(f"result: bad apix {apix!r}")
    skipped_raw = meta.get("skipped", [])
    try:
        skipped = [(float(x), float(y), str(r)) for x, y, r in skipped_raw]
    except (TypeError, ValueError):
        raise ProtocolError("result: skipped is not a list of [x, y, reason]") from None
    stats = meta.get("stats") or {}
    if not isinstance(stats, dict):
        raise ProtocolError("result: stats is not an object")
    bad = _bad_string([stats, skipped])
    if bad is not None:
        raise ProtocolError(f"result: text {bad[:60]!r} holds a control character")
    plot = a.get(PLOT)
    if plot is not None:
        if plot.ndim != 1 or plot.dtype != np.uint8 or plot.nbytes > MAX_PLOT_BYTES or bytes(plot[:8]) != _PNG_MAGIC:
            raise ProtocolError("result: plot_png is not a PNG image within the size limit")
    if spec is not None:
        _check_spec(spec, p, a, columns, skipped, shape, float(apix), msg.header["movie"])
    result = MovieResult(
        movie=msg.header["movie"],
        particles=p.astype(np.float32),
        x=a["x"].copy(),
        y=a["y"].copy(),
        columns={k: v.copy() for k, v in columns.items()},
        skipped=skipped,
        frame_shifts=fs.copy(),
        traj_raw=a["traj_raw"].copy(),
        traj_smooth=a["traj_smooth"].copy(),
        micrograph_shape=(shape[0], shape[1]),
        apix=float(apix),
        stats=stats,
    )
    if plot is not None:
        result.plot_png = plot.tobytes()
    return result


_RESULT_ARRAYS = frozenset({"particles", "x", "y", "frame_shifts", "traj_raw", "traj_smooth", PLOT})


def _bad_string(obj: Any, depth: int = 0) -> str | None:
    """The first string in a JSON-like ``obj`` holding a control character (or too deeply nested)."""
    if depth > 8:
        return "(nested too deeply)"
    if isinstance(obj, str):
        return obj if _CONTROL_RE.search(obj) else None
    items = obj.items() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        for part in (item if isinstance(obj, dict) else (item,)):
            bad = _bad_string(part, depth + 1)
            if bad is not None:
                return bad
    return None


def message_bytes(frames: list[Any]) -> int:
    return sum(_buffer(f).nbytes for f in frames)


def _check_spec(spec: ResultSpec, p: np.ndarray, a: dict[str, np.ndarray], columns: dict[str, np.ndarray],
                skipped: list[tuple[float, float, str]], shape: list[int], apix: float, movie: str) -> None:
    n = p.shape[0]
    if p.shape[1] != spec.out_box:
        raise ProtocolError(f"result: particle box {p.shape[1]}, the session extracts {spec.out_box}")
    if n + len(skipped) != spec.n_picks:
        raise ProtocolError(f"result: {n} particles + {len(skipped)} skipped picks, the pick file has {spec.n_picks}")
    if a["frame_shifts"].shape[0] > spec.frames:
        raise ProtocolError(f"result: {a['frame_shifts'].shape[0]} frames, the movie has at most {spec.frames}")
    if spec.apix is not None and abs(apix - spec.apix) > 1e-6 * spec.apix:
        raise ProtocolError(f"result: pixel size {apix}, the session's is {spec.apix}")
    try:
        check_finite({k: a[k] for k in ("particles", "x", "y", "frame_shifts", "traj_raw", "traj_smooth")}, "result")
        spec.columns.check(columns, spec.expected, n, f"result for {movie}")
    except ColumnError as exc:
        raise ProtocolError(str(exc)) from None
    h, w = shape
    x, y = a["x"], a["y"]
    if n and (x.min() < 0 or y.min() < 0 or x.max() >= w or y.max() >= h):
        raise ProtocolError(f"result: a particle centre lies outside the {w}x{h} micrograph")
