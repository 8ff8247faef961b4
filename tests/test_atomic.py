"""streamer.formats.atomic: whole-file replacement on real files, failures mid-write, a concurrent reader process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamer.formats import atomic


def _entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_write_bytes_creates_then_replaces(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    atomic.write_bytes(path, b"\x00\x01first")
    assert path.read_bytes() == b"\x00\x01first"
    atomic.write_bytes(path, bytearray(b"second, longer than the first"))
    assert path.read_bytes() == b"second, longer than the first"
    atomic.write_bytes(path, memoryview(b"3"))
    assert path.read_bytes() == b"3"  # shorter: nothing of the old content is left behind
    assert _entries(tmp_path) == ["out.bin"]


def test_write_text_is_utf8(tmp_path: Path) -> None:
    path = tmp_path / "note.star"
    text = "data_\nloop_\n_rlnMicrographName #1\nÅngström_µ.mrc\n"
    atomic.write_text(path, text)
    assert path.read_bytes() == text.encode("utf-8")
    assert _entries(tmp_path) == ["note.star"]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "particles.star"
    path.write_bytes(b"old content\n")
    with pytest.raises(Boom):
        with atomic.replacing(path, mode) as fh:
            fh.write(b"half of the new" if mode == "wb" else "half of the new")
            fh.flush()  # the partial content really is on disk, in the temp file
            (tmp,) = [n for n in _entries(tmp_path) if n != "particles.star"]
            assert (tmp_path / tmp).read_bytes() == b"half of the new"
            raise Boom("disk full")
    assert path.read_bytes() == b"old content\n"
    assert _entries(tmp_path) == ["particles.star"]


def test_library_failure_mid_write_and_interrupt(tmp_path: Path) -> None:
    path = tmp_path / "picks.cs"
    good = np.arange(5, dtype=np.int32)
    with atomic.replacing(path) as fh:
        np.save(fh, good, allow_pickle=False)
    with pytest.raises(ValueError):  # np.save writes its header, then refuses object data
        with atomic.replacing(path) as fh:
            np.save(fh, np.array([{"a": 1}], dtype=object), allow_pickle=False)
    with pytest.raises(KeyboardInterrupt):  # BaseException too: a Ctrl-C mid-write
        with atomic.replacing(path) as fh:
            fh.write(b"\x93NUMPY partial")
            raise KeyboardInterrupt
    np.testing.assert_array_equal(np.load(path), good)
    assert _entries(tmp_path) == ["picks.cs"]


def test_no_new_file_when_first_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "new.png"
    with pytest.raises(Boom):
        with atomic.replacing(path) as fh:
            fh.write(b"\x89PNG")
            raise Boom("render failed")
    assert _entries(tmp_path) == []


def test_temp_is_hidden_in_the_same_folder_until_the_end(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    path.write_bytes(b"before")
    with atomic.replacing(path) as fh:
        fh.write(b"after")
        others = [n for n in _entries(tmp_path) if n != "plot.png"]
        assert len(others) == 1 and others[0].startswith(".plot.png.") and others[0].endswith(".tmp")
        assert path.read_bytes() == b"before"  # readers still see the old file
    assert path.read_bytes() == b"after"
    assert _entries(tmp_path) == ["plot.png"]


def test_permissions_follow_the_umask_like_open(tmp_path: Path) -> None:
    reference = tmp_path / "plain.txt"
    with open(reference, "w") as fh:
        fh.write("x")
    path = tmp_path / "atomic.txt"
    atomic.write_text(path, "x")
    assert (path.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)
    os.chmod(path, 0o600)  # a replaced file gets fresh permissions, as open(path, "w") on a new file would
    atomic.write_text(path, "y")
    assert (path.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)


def test_caller_may_close_the_file(tmp_path: Path) -> None:
    path = tmp_path / "closed.bin"
    with atomic.replacing(path) as fh:
        fh.write(b"done")
        fh.close()
    assert path.read_bytes() == b"done"
    assert _entries(tmp_path) == ["closed.bin"]


def test_bad_mode_and_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    with pytest.raises(ValueError, match=r"x\.bin: atomic replacement mode must be one of"):
        with atomic.replacing(path, "ab"):
            pass
    with pytest.raises(FileNotFoundError):
        atomic.write_bytes(tmp_path / "missing" / "x.bin", b"1")
    assert _entries(tmp_path) == []
    atomic.fsync_dir(tmp_path)  # a real folder syncs without error
    with pytest.raises(FileNotFoundError):
        atomic.fsync_dir(tmp_path / "missing")


_READER = """
import sys
path, size, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import os
open(stop + ".ready", "w").close()
seen = set()
while not os.path.exists(stop):
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) != size or len(set(data)) != 1:
        print("torn", len(data), sorted(set(data))[:4])
        sys.exit(1)
    seen.add(data[0])
print(len(seen))
"""


def test_concurrent_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    # a separate process reads while this one replaces the file: each read must be one whole version
    path = tmp_path / "snapshot.bin"
    stop = tmp_path / "stop"
    size = 256 * 1024
    atomic.write_bytes(path, bytes([0]) * size)
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), str(size), str(stop)], stdout=subprocess.PIPE, text=True
    )
    try:
        while not (tmp_path / "stop.ready").exists():
            assert reader.poll() is None
        for i in range(1, 60):
            with atomic.replacing(path) as fh:
                for _ in range(4):  # written in pieces: a plain rewrite would be visible half done
                    fh.write(bytes([i % 256]) * (size // 4))
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    assert reader.returncode == 0, out
    assert int(out) >= 2  # it did read while versions were changing
    assert path.read_bytes() == bytes([59]) * size
    assert _entries(tmp_path) == ["snapshot.bin", "stop", "stop.ready"]


def test_a_name_at_name_max_is_replaced_atomically_and_side_names_fit(tmp_path) -> None:
    from streamer.formats.atomic import name_max, side_name, write_text

    longest = "m" * name_max(tmp_path)  # a legal name: the temp name beside it must still be legal
    write_text(tmp_path / longest, "x")
    assert (tmp_path / longest).read_text() == "x" and not list(tmp_path.glob("*.tmp"))
    stem = "FoilHole_" + "y" * 250
    a, b = side_name(tmp_path, stem, ".star"), side_name(tmp_path, stem + "z", ".star")
    assert a != b and a.endswith(".star") and len(a.encode()) <= name_max(tmp_path) - 14
    assert side_name(tmp_path, "short", ".png") == "short.png"
