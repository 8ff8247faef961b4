"""Wire format: JSON header + raw frames, strict validation, MovieResult round trips."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from streamer.live import protocol
from streamer.live.protocol import ProtocolError, decode, decode_result, encode, encode_result
from streamer.types import MovieResult


def _result(n: int = 4, frames: int = 6, box: int = 8, seed: int = 0) -> MovieResult:
    rng = np.random.default_rng(seed)
    return MovieResult(
        movie="/data/raw/FoilHole_1_Data_2_fractions.tiff",
        particles=rng.normal(size=(n, box, box)).astype(np.float32),
        x=rng.uniform(0, 4000, n),
        y=rng.uniform(0, 4000, n),
        columns={
            "rlnDefocusU": rng.uniform(5000, 20000, n),
            "rlnClassNumber": np.arange(n, dtype=np.int64),
            "rlnMicrographName": np.array([f"mic_{i}.mrc" for i in range(n)], dtype=object),
        },
        skipped=[(1.5, 2.5, "outside the 4096x4096 frame"), (np.float64(3.0), 4.0, "NaN coordinate")],
        frame_shifts=rng.normal(size=(frames, 2)),
        traj_raw=rng.normal(size=(n, frames, 2)),
        traj_smooth=rng.normal(size=(n, frames, 2)),
        micrograph_shape=(4096, 4096),
        apix=0.83,
        stats={"motion_total_A": np.float32(12.5), "n_particles": np.int64(n), "warnings": ["w1"], "quality_gain": None},
    )


def _wire(frames: list) -> list[bytes]:
    """What the peer receives: plain bytes per frame."""
    return [bytes(f) for f in frames]


def test_result_round_trip_is_exact() -> None:
    r = _result()
    back = decode_result(decode(_wire(encode_result("job-1", r))))
    assert back.movie == r.movie
    assert back.particles.dtype == np.float32
    np.testing.assert_array_equal(back.particles, r.particles)
    for key in ("x", "y", "frame_shifts", "traj_raw", "traj_smooth"):
        np.testing.assert_array_equal(getattr(back, key), getattr(r, key))
    np.testing.assert_array_equal(back.columns["rlnDefocusU"], r.columns["rlnDefocusU"])
    assert back.columns["rlnClassNumber"].dtype == np.int64
    assert list(back.columns["rlnMicrographName"]) == [f"mic_{i}.mrc" for i in range(4)]
    assert back.skipped == [(1.5, 2.5, "outside the 4096x4096 frame"), (3.0, 4.0, "NaN coordinate")]
    assert back.micrograph_shape == (4096, 4096) and back.apix == pytest.approx(0.83)
    assert back.stats["motion_total_A"] == pytest.approx(12.5) and back.stats["n_particles"] == 4
    assert back.stats["quality_gain"] is None


def test_float16_transport_halves_bytes_and_matches_a_float16_cast() -> None:
    r = _result(n=3, box=16)
    f32 = encode_result("j", r)
    f16 = encode_result("j", r, float16=True)
    assert len(bytes(f16[1])) * 2 == len(bytes(f32[1]))
    back = decode_result(decode(_wire(f16)))
    assert back.particles.dtype == np.float32
    np.testing.assert_array_equal(back.particles, r.particles.astype(np.float16).astype(np.float32))


def test_empty_result_round_trip() -> None:
    r = _result(n=0)
    r.columns = {}
    back = decode_result(decode(_wire(encode_result("j", r))))
    assert back.n == 0 and back.particles.shape == (0, 8, 8) and back.traj_raw.shape == (0, 6, 2)


def test_header_declares_each_array() -> None:
    frames = encode("job", {"job_id": "a", "movie": "m", "picks": None, "config": {}}, {"v": np.arange(6, dtype=np.int32).reshape(2, 3)})
    head = json.loads(bytes(frames[0]))
    assert head["arrays"] == [{"name": "v", "dtype": "int32", "shape": [2, 3]}]
    msg = decode(_wire(frames))
    assert msg.type == "job" and msg.arrays["v"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_big_endian_input_is_sent_little_endian() -> None:
    a = np.arange(4, dtype=">f4")
    msg = decode(_wire(encode("heartbeat", None, {"a": a})))
    assert msg.arrays["a"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(msg.arrays["a"], [0, 1, 2, 3])


def _job_header(**over: object) -> bytes:
    head = {"v": protocol.VERSION, "type": "job", "job_id": "a", "movie": "m", "picks": None, "config": {}, "arrays": []}
    head.update(over)
    return json.dumps(head).encode()


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([], "empty message"),
        ([b"\x80\x04garbage"], "not UTF-8 JSON"),
        ([pickle.dumps({"v": 1, "type": "job"})], "not UTF-8 JSON"),
        ([b"[1, 2]"], "not a JSON object"),
        ([_job_header(v=2)], "protocol version"),
        ([_job_header(type="exec")], "unknown message type"),
        ([_job_header(job_id=5)], "wrong type"),
        ([json.dumps({"v": 1, "type": "job"}).encode()], "missing field"),
        ([_job_header(arrays=[{"name": "a", "dtype": "float32", "shape": [2]}])], "declares 1 arrays but 0"),
        ([_job_header(arrays=[{"name": "a", "dtype": "float32", "shape": [2]}]), b"\0" * 7], "needs 8"),
        ([_job_header(arrays=[{"name": "a", "dtype": "object", "shape": [1]}]), b"\0" * 8], "not allowed"),
        ([_job_header(arrays=[{"name": "a", "dtype": "<U2", "shape": [1]}]), b"\0" * 8], "not allowed"),
        ([_job_header(arrays=[{"name": "a", "dtype": "uint8", "shape": [-1]}]), b""], "bad shape"),
        ([_job_header(arrays=[{"name": "a", "dtype": "uint8", "shape": [True]}]), b"\0"], "bad shape"),
        ([_job_header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1, 1, 1, 1, 1]}]), b"\0"], "bad shape"),
        ([_job_header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1]}] * 2), b"\0", b"\0"], "declared twice"),
        ([b" " * (protocol.MAX_HEADER_BYTES + 1)], "exceeds"),
    ],
)
def test_malformed_messages_are_rejected(frames: list[bytes], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode(frames)


def test_direction_filter() -> None:
    frames = _wire(encode("stop"))
    assert decode(frames, allowed=protocol.DISPATCHER_TYPES).type == "stop"
    with pytest.raises(ProtocolError, match="not accepted"):
        decode(frames, allowed=protocol.WORKER_TYPES)


def test_inconsistent_result_shapes_are_rejected() -> None:
    r = _result(n=3)
    r.traj_smooth = r.traj_smooth[:2]
    with pytest.raises(ProtocolError, match="traj_smooth"):
        decode_result(decode(_wire(encode_result("j", r))))
    r = _result(n=3)
    r.columns["rlnDefocusV"] = np.zeros(5)
    with pytest.raises(ProtocolError, match="rlnDefocusV"):
        decode_result(decode(_wire(encode_result("j", r))))
    r = _result(n=3)
    r.particles = np.zeros((3, 8, 6), np.float32)
    with pytest.raises(ProtocolError, match="particles"):
        decode_result(decode(_wire(encode_result("j", r))))


def test_objects_cannot_be_encoded() -> None:
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode("heartbeat", None, {"a": np.array([object()], dtype=object)})
    with pytest.raises(ProtocolError, match="unknown message type"):
        encode("exec")
