"""Sessions whose workers are Slurm jobs, against a real single-node Slurm (tests/slurm_cluster.py).

`lmc run/watch --workers 0 --slurm-workers 2`: the jobs are submitted with sbatch, run the real
`lmc worker` (the real pipeline on tiny simulated movies) with the session's CURVE keys over TCP,
and every particle is written exactly once; a job cancelled mid-session is replaced and its movie
redone, nothing lost or doubled; a session killed outright leaves jobs that the next session on
the same folder cancels; after every session no job of it is left in squeue.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_live import check_output, ledger_state, lmc, movie_names, populate, running, session_args, wait_for

from streamer.live.keys import create_keys
from streamer.live.slurm import job_name
from streamer.sim.simulate import SimParams, simulate_session


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("scope")
    simulate_session(src, SimParams(movies=6, frames=10, shape=(256, 256), particles=5, seed=5))
    return src


@pytest.fixture(autouse=True)
def no_jobs_left(slurm_cluster) -> Iterator[None]:
    """Every job gone after each test, also after a failed one (whose session was SIGKILLed and
    cancelled nothing): its jobs would hold the node's GPUs and fail the next test too."""
    yield
    slurm_cluster.cancel_all()


def slurm_args(tmp: Path, *extra: str) -> list[str]:
    keys = tmp / "keys"
    if not keys.exists():
        create_keys(keys)
    return ["--workers", "0", "--slurm-workers", "2", "--keys", str(keys), *(extra or ("--slurm-args=--gres=gpu:1",))]


def our_jobs(cluster, out: Path) -> list[str]:
    res = subprocess.run(["squeue", "-h", f"--name={job_name(out)}", "-o", "%i"], capture_output=True, text=True,
                         env=cluster.env, check=True)
    return res.stdout.split()


def movies_done_by_jobs(out: Path) -> Counter[str]:
    """How many times a Slurm worker finished each movie (from the jobs' logs)."""
    seen: Counter[str] = Counter()
    for log in (out / "logs").glob("slurm-*.log"):
        for line in log.read_text().splitlines():
            if " particles in " in line:
                seen[line.split(" INFO ", 1)[1].split(": ", 1)[0]] += 1
    return seen


def status(out: Path) -> dict:
    try:
        return json.loads((out / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def test_run_with_two_slurm_workers_writes_every_particle_once(slurm_cluster, tmp_path: Path, source: Path) -> None:
    good = populate(tmp_path, source, movie_names(source))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "streamer.cli", *session_args("run", tmp_path, source, out),
                          *slurm_args(tmp_path), "--slurm-host", "127.0.0.1"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    check_output(out, good)
    log = (out / "logs" / "lmc.log").read_text()
    assert log.count("slurm: submitted worker job") == 2
    assert "started local worker" not in log  # --workers 0: the head node only dispatches and writes
    # a loopback address for the jobs: fine on one node, said for a real cluster
    assert "slurm: jobs will connect to tcp://127.0.0.1:" in log and "jobs on other nodes need --slurm-host" in log
    done_by = Counter(r["worker"] for r in status(out)["recent"])
    assert sum(done_by.values()) == len(good) and all(w.startswith("slurm-") for w in done_by)
    assert sorted(movies_done_by_jobs(out).values()) == [1] * len(good)
    assert "slurm: cancelled worker jobs" in log
    assert our_jobs(slurm_cluster, out) == []
    shown = subprocess.run([sys.executable, "-m", "streamer.cli", "status", str(out)], capture_output=True, text=True,
                           timeout=60)
    assert "slurm    2 worker jobs wanted; all cancelled when the session ended" in shown.stdout


def test_a_cancelled_job_is_replaced_and_nothing_is_lost_or_doubled(slurm_cluster, tmp_path: Path, source: Path) -> None:
    good = populate(tmp_path, source, movie_names(source), copies=3)
    out = tmp_path / "out"
    with running([*session_args("watch", tmp_path, source, out, "--headless"), *slurm_args(tmp_path)], cwd=tmp_path) as proc:
        # the victim is a job whose worker has joined (so it runs; with movies still queued it holds
        # a running and a prefetched one). On a loaded machine one job can still be pending (the
        # last test's jobs hold the node) while the other commits movies: cancelling a pending job
        # tests nothing of the requeue. The log says at once who joined; the tiny movies leave no
        # time for squeue or status.json polls (all 18 are done within a second).
        def joined_job() -> str | None:
            found = re.search(r"worker slurm-(\d+) joined", (out / "logs" / "lmc.log").read_text())
            return found.group(1) if found else None

        wait_for(lambda: len(ledger_state(out)[0]) >= 2 and joined_job() is not None, 60, proc)
        victim = joined_job()
        assert victim is not None
        subprocess.run(["scancel", victim], env=slurm_cluster.env, check=True)
        assert len(ledger_state(out)[0]) < len(good)

        def replaced() -> bool:
            jobs = (status(out).get("slurm") or {}).get("jobs") or []
            return len(jobs) == 2 and victim not in {j["job_id"] for j in jobs}

        wait_for(replaced, 60, proc)
        wait_for(lambda: len(ledger_state(out)[0]) == len(good), 90, proc)
        proc.send_signal(signal.SIGINT)  # drain and end the session
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    check_output(out, good)
    log = (out / "logs" / "lmc.log").read_text()
    assert f"slurm job {victim} on {slurm_cluster.node} ended: CANCELLED" in log
    assert log.count("slurm: submitted worker job") == 3
    assert f"worker slurm-{victim} lost" in log  # its movies went back to the queue at once
    done = movies_done_by_jobs(out)
    assert set(done) == good and all(n in (1, 2) for n in done.values())  # a movie the victim held is redone
    assert our_jobs(slurm_cluster, out) == []


def test_jobs_of_a_killed_session_are_cancelled_by_the_next_one(slurm_cluster, tmp_path: Path, source: Path) -> None:
    names = movie_names(source)
    good = populate(tmp_path, source, names[:3])
    out = tmp_path / "out"
    proc = lmc([*session_args("watch", tmp_path, source, out, "--headless"), *slurm_args(tmp_path)], cwd=tmp_path)
    try:
        wait_for(lambda: len(ledger_state(out)[0]) == len(good), 60, proc)

        def shown() -> list[dict]:
            jobs = (status(out).get("slurm") or {}).get("jobs") or []
            return jobs if all(j.get("worker") and j.get("gpus") for j in jobs) and len(jobs) == 2 else []

        wait_for(lambda: bool(shown()), 30, proc)
        assert sorted(j["gpus"] for j in shown()) == ["0", "1"]  # each job's GPU, as Slurm allocated it
        assert {j["state"] for j in shown()} == {"running"} and {j["node"] for j in shown()} == {slurm_cluster.node}
        left = our_jobs(slurm_cluster, out)
        assert len(left) == 2
    finally:
        proc.kill()  # SIGKILL: no clean-up at all
        proc.wait()
    assert our_jobs(slurm_cluster, out) == left  # the jobs outlive their session...
    good |= populate(tmp_path, source, names[3:])
    res = subprocess.run([sys.executable, "-m", "streamer.cli", *session_args("run", tmp_path, source, out),
                          *slurm_args(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (out / "logs" / "lmc.log").read_text()
    assert f"cancelled 2 worker job(s) left by an earlier session on {out}: {', '.join(left)}" in log  # ...until the next
    check_output(out, good)
    assert sorted(movies_done_by_jobs(out).values()) == [1] * len(good)
    assert our_jobs(slurm_cluster, out) == []


def test_slurm_workers_alongside_a_local_worker(slurm_cluster, tmp_path: Path, source: Path) -> None:
    (tmp_path / "movies").mkdir()
    (tmp_path / "picks").mkdir()
    out = tmp_path / "out"
    with running([*session_args("watch", tmp_path, source, out, "--headless"), "--workers", "1", "--slurm-workers", "1"],
                 cwd=tmp_path) as proc:
        wait_for(lambda: len(status(out).get("workers") or []) == 2, 60, proc)  # the local one and the job's
        good = populate(tmp_path, source, movie_names(source), copies=2)
        wait_for(lambda: len(ledger_state(out)[0]) == len(good), 90, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    check_output(out, good)
    by = Counter(r["worker"] for r in status(out)["recent"])
    assert by["cpu0"] >= 1 and sum(n for w, n in by.items() if w.startswith("slurm-")) >= 1, by
    assert our_jobs(slurm_cluster, out) == []


def test_a_bad_partition_stops_the_session_with_one_line(slurm_cluster, tmp_path: Path, source: Path) -> None:
    populate(tmp_path, source, movie_names(source)[:1])
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "streamer.cli", *session_args("run", tmp_path, source, out),
                          *slurm_args(tmp_path, "--slurm-args", "--partition=nosuch --time=10")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "lmc: slurm: sbatch refused the worker job: invalid partition specified: nosuch; Batch job submission "
        "failed: Invalid partition name specified (slurm.args = --partition=nosuch --time=10)")
    assert our_jobs(slurm_cluster, out) == []


def test_jobs_use_the_output_folders_own_keys_by_default(slurm_cluster, tmp_path: Path, source: Path) -> None:
    good = populate(tmp_path, source, movie_names(source)[:2])
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "streamer.cli", *session_args("run", tmp_path, source, out),
                          "--workers", "0", "--slurm-workers", "1"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    check_output(out, good)
    script = (out / "logs" / "slurm-job.sh").read_text()
    assert f"--keys {out / 'keys'} --name \"slurm-${{SLURM_JOB_ID}}\"" in script
    assert oct((out / "keys").stat().st_mode & 0o777) == "0o700"
    assert our_jobs(slurm_cluster, out) == []
