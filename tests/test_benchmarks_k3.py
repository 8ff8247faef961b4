"""benchmarks/k3_movie.py --worker end to end at a tiny frame size (the K3 figures are run by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "k3_movie.py"


@pytest.mark.parametrize("fmt,shape,local", [("tiff", (384, 512), True), ("eer", (256, 256), False)])
def test_worker_mode_reports_steady_state_with_every_next_movie_decoded_ahead(
    tmp_path: Path, fmt: str, shape: tuple[int, int], local: bool
) -> None:
    cmd = [sys.executable, str(SCRIPT), "--format", fmt, "--shape", *map(str, shape), "--frames", "5",
           "--particles", "4", "--box", "64", "--fcrop-box", "32", "--worker", "3", "--workdir", str(tmp_path)]
    out = subprocess.run(cmd + ([] if local else ["--no-local"]), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    run, dec = report["worker"], report["decode"]
    assert dec["frames_shape"] == [5, *shape]
    assert run["movies"] == 3 and run["prefetched"] == 2  # movies 2 and 3 came from the background decode
    assert run["particles"] == 4 and run["peak_rss_mb"] > 50
    done = run["completions_s"]
    # steady state: first to second-to-last completion (the last movie has no decode beside it)
    assert done == sorted(done) and run["steady_s"] == pytest.approx(done[-2] - done[0], abs=2e-3)
    assert {"decode", "gain", "motion", "local", "extract", "wait_prefetch", "encode"} <= set(run["stages"])
    assert "worker steady state:" in out.stdout and "x the I/O floor" in out.stdout
    # every job answered for its own movie, in order (a worker writes no files: the session's writer does)
    assert [name.split(".")[0][-5:] for name in run["results"]] == ["_w000", "_w001", "_w002"]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--worker", "1", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--worker N needs N >= 2" in bad.stderr
