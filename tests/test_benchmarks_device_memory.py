"""benchmarks/device_memory.py at a tiny frame size: the model counts what it says it counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_memory.py"


def test_device_memory_model_per_stage(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--shape", "256", "384", "--frames", "6", "--particles", "4", "--box", "64",
           "--fcrop-box", "32", "--workdir", str(tmp_path), "--card-gib", "0.012", "--reserve-gib", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CPU MODEL of the GPU memory footprint" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    tiff, eer = report["movies"]
    assert tiff["shape"] == [6, 256, 384] and eer["shape"] == [6, 512, 768] and eer["upsampling"] == 2
    for m in (tiff, eer):
        n_f, h, w = m["shape"]
        assert m["raw_dtype"] == "uint8" and m["raw_bytes"] == n_f * h * w  # host only, listed apart
        assert m["decode_peak"] >= m["raw_bytes"]
        stages = {st["stage"]: st for st in m["stages"]}
        assert list(stages) == ["gain", "motion", "picks", "local", "extract", "micrograph"]
        gain = stages["gain"]
        # the device holds the float32 movie from the gain stage on; the GPU-only uploads are the
        # multiplier and one 4-frame raw chunk; the raw movie itself is not on the device
        assert gain["gpu_only"] == h * w * 4 + 4 * h * w
        assert gain["traced_peak"] >= m["float32_bytes"] and gain["held_after"] >= m["float32_bytes"]
        assert gain["held_after"] < m["float32_bytes"] + m["raw_bytes"]
        assert all(st["peak"] >= m["float32_bytes"] for st in m["stages"])
    # a 0.012 GiB card: the small TIFF fits, the EER at upsampling 2 (4x the pixels) does not
    assert max(st["peak"] for st in tiff["stages"]) <= 0.012 * 2**30 < max(st["peak"] for st in eer["stages"])
    blocks = out.stdout.split("\neer ")
    assert ": fits a 0.012 GiB card" in blocks[0] and "does NOT fit a 0.012 GiB card" in blocks[1]
