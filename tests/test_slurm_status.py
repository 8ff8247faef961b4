"""The Slurm worker jobs in the console and in `lmc status` (rendered from a snapshot)."""

from __future__ import annotations

import os

from rich.console import Console

from streamer.output.status import render_status
from streamer.ui.console import render

SNAP = {
    "phase": "running",
    "time": 1000.0,
    "session": {"movies": "/data/movies", "picks": "/data/picks", "out": "/data/lmc", "uptime_s": 300},
    "workers": [{"name": "slurm-41", "device": "gpu0", "gpu": 0, "state": "busy", "movie": "/data/movies/m007.tiff",
                 "job_seconds": 3.5, "done": 6, "mean_s": 4.2, "gpu_mem_mb": 2048}],
    "slurm": {"wanted": 2, "ended": 1, "alert": "", "jobs": [
        {"job_id": "41", "state": "running", "reason": "", "node": "gpu-node-07", "gpus": "3", "worker": "slurm-41",
         "movie": "/data/movies/m007.tiff", "done": 6, "waited_s": None, "running_s": 250.0},
        {"job_id": "42", "state": "pending", "reason": "Resources", "node": "", "gpus": "", "worker": None,
         "movie": None, "done": 0, "waited_s": 95.0, "running_s": None},
    ]},
}


def _text(snap, width=100, height=40) -> str:
    console = Console(record=True, width=width, height=height, file=open(os.devnull, "w"), color_system=None)
    console.print(render(snap, width, height))
    return console.export_text(clear=False)


def test_console_shows_running_and_pending_slurm_jobs() -> None:
    text = _text(SNAP)
    assert "slurm 1 running, 1 pending" in text
    assert "gpu-node-07:gpu0" in text  # the joined worker: node and device
    assert "job 42" in text and "pending (Resources) 1m35s" in text


def test_lmc_status_lists_each_slurm_job() -> None:
    text = render_status(SNAP, now=1001.0)
    assert "slurm    2 of 2 worker jobs; 1 ended and replaced so far" in text
    assert "job 41         running on gpu-node-07 GPU 3  done 6  m007.tiff" in text
    assert "job 42         pending (Resources) for" in text and "done 0" in text


def test_an_alert_about_failing_jobs_is_shown() -> None:
    snap = {**SNAP, "slurm": {**SNAP["slurm"], "alert": "slurm: 3 worker jobs in a row ended within 60 s"}}
    assert "! slurm: 3 worker jobs in a row" in render_status(snap, now=1001.0)


def test_lmc_status_after_the_session_says_the_jobs_were_cancelled() -> None:
    snap = {**SNAP, "phase": "finished", "slurm": {"wanted": 2, "ended": 1, "alert": "", "jobs": []}}
    assert "slurm    2 worker jobs wanted; all cancelled when the session ended (1 ended and were replaced" in \
        render_status(snap, now=1001.0)
