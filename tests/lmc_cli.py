"""Run the real ``lmc`` command line in a subprocess (``python -m streamer.cli``), as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def lmc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``lmc ARGS...`` in ``cwd``, output captured as text, at most 300 s; the exit code is not checked."""
    return subprocess.run([sys.executable, "-m", "streamer.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)
