"""SlurmPool against a real single-node Slurm (tests/slurm_cluster.py): submit, watch, replace,
back off, cancel; a dead session's jobs are cancelled by the next one. The jobs here run a plain
Python sleeper (the pool's business is the jobs; test_slurm_session.py runs real lmc workers)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.config import SlurmConfig
from streamer.errors import ConfigError
from streamer.live import slurm
from streamer.live.slurm import SlurmPool, job_name

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)", "worker"]


def _until(cond, timeout: float, what: str, pool: SlurmPool | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        if pool is not None:
            pool.tick(time.monotonic())
        time.sleep(0.1)


def _active(cluster, out: Path) -> list[str]:
    res = subprocess.run(["squeue", "-h", f"--name={job_name(out)}", "-o", "%i"], capture_output=True, text=True,
                         env=cluster.env, check=True)
    return res.stdout.split()


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(slurm, "POLL_S", 0.2)
    monkeypatch.setattr(slurm, "BACKOFF_S", 0.2)


def test_pool_keeps_n_jobs_replaces_a_cancelled_one_and_cancels_all_at_close(slurm_cluster, tmp_path, fast):
    pool = SlurmPool(SlurmConfig(workers=2, args="--gres=gpu:1"), tmp_path, SLEEPER)
    pool.start()
    assert len(pool.jobs) == 2
    _until(lambda: all(j.state == "RUNNING" for j in pool.jobs.values()), 30, "both jobs running", pool)
    rows = pool.snapshot([], time.monotonic())
    assert {r["state"] for r in rows} == {"starting"}  # running, but no worker joined the pool
    assert all(r["node"] == slurm_cluster.node for r in rows)
    assert sorted(r["gpus"] for r in rows) == ["0", "1"]  # one of the node's two GPUs each
    first = sorted(pool.jobs)
    subprocess.run(["scancel", first[0]], env=slurm_cluster.env, check=True)
    ended: list = []

    def replaced() -> bool:
        ended.extend(pool.tick(time.monotonic()))
        return first[0] not in pool.jobs and len(pool.jobs) == 2

    _until(replaced, 30, "a replacement job")
    _until(lambda: all(j.state == "RUNNING" for j in pool.jobs.values()), 30, "the replacement running", pool)
    assert sorted(j.gpus for j in pool.jobs.values()) == ["0", "1"]  # the freed GPU went to the replacement
    assert [e.job.job_id for e in ended] == [first[0]]
    assert "CANCELLED" in ended[0].message and "its worker never joined" in ended[0].message
    assert first[1] in pool.jobs
    assert sorted(_active(slurm_cluster, tmp_path)) == sorted(pool.jobs)
    pool.close()
    assert _active(slurm_cluster, tmp_path) == []
    assert pool.jobs == {}


def test_a_job_cancelled_while_pending_is_reported_as_never_seen_running(slurm_cluster, tmp_path, fast):
    """Three one-GPU jobs on the two-GPU node: the third waits; cancelled there, it is logged as such."""
    pool = SlurmPool(SlurmConfig(workers=3, args="--gres=gpu:1"), tmp_path, SLEEPER)
    pool.start()
    _until(lambda: sorted(j.state for j in pool.jobs.values()) == ["PENDING", "RUNNING", "RUNNING"], 30,
           "two jobs running, one pending", pool)
    waiting = next(j.job_id for j in pool.jobs.values() if j.state == "PENDING")
    subprocess.run(["scancel", waiting], env=slurm_cluster.env, check=True)
    ended: list = []

    def gone() -> bool:
        ended.extend(pool.tick(time.monotonic()))
        return waiting not in pool.jobs

    _until(gone, 30, "the pending job's end")
    assert [e.job.job_id for e in ended] == [waiting]
    assert f"slurm job {waiting} ended: CANCELLED" in ended[0].message  # no node: it never ran
    assert "before it was seen running" in ended[0].message and "worker never joined" not in ended[0].message
    pool.close()
    assert _active(slurm_cluster, tmp_path) == []


def test_a_dead_sessions_jobs_are_cancelled_by_the_next(slurm_cluster, tmp_path, fast):
    old = subprocess.run(["sbatch", "--parsable", f"--job-name={job_name(tmp_path)}", f"--output={tmp_path}/old-%j.log",
                          "--wrap", "sleep 300"], capture_output=True, text=True, env=slurm_cluster.env, check=True)
    old_id = old.stdout.strip()
    other = subprocess.run(["sbatch", "--parsable", "--job-name=not-lmc", f"--output={tmp_path}/other-%j.log",
                            "--wrap", "sleep 300"], capture_output=True, text=True, env=slurm_cluster.env, check=True)
    pool = SlurmPool(SlurmConfig(workers=1), tmp_path, SLEEPER)
    try:
        assert pool.start() == [old_id]
        _until(lambda: old_id not in _active(slurm_cluster, tmp_path), 20, "the old job gone")
        assert list(pool.jobs) == _active(slurm_cluster, tmp_path)
        assert other.stdout.strip() in slurm_cluster.squeue()  # another user's/tool's job is left alone
    finally:
        pool.close()
        subprocess.run(["scancel", other.stdout.strip()], env=slurm_cluster.env, check=False)


def test_sbatch_refusing_the_first_job_is_one_clear_error(slurm_cluster, tmp_path):
    pool = SlurmPool(SlurmConfig(workers=2, args="--partition=no-such-partition"), tmp_path, SLEEPER)
    with pytest.raises(ConfigError, match=r"slurm: sbatch refused the worker job: invalid partition.*--partition=no-such"):
        pool.start()
    assert _active(slurm_cluster, tmp_path) == []


def test_jobs_failing_at_once_back_off_and_raise_an_alert(slurm_cluster, tmp_path, fast):
    pool = SlurmPool(SlurmConfig(workers=1), tmp_path, [sys.executable, "-c", "raise SystemExit(3)", "worker"])
    pool.start()
    ends: list[float] = []

    def alerted() -> bool:
        ends.extend(e.job.ended for e in pool.tick(time.monotonic()))
        return bool(pool.alert)

    try:
        _until(alerted, 60, "the failing-jobs alert")
    finally:
        pool.close()
    assert len(ends) >= slurm.ALERT_AFTER
    assert "in a row failed" in pool.alert and "FAILED" in pool.alert and "exit 3:0" in pool.alert
    assert "slurm-" in pool.alert and ".log" in pool.alert
    assert pool.next_submit - ends[-1] >= 0.2 * 2 ** (slurm.ALERT_AFTER - 1) - 0.01  # the back-off doubled
    assert _active(slurm_cluster, tmp_path) == []


def test_the_job_script_template_wraps_the_worker_command(slurm_cluster, tmp_path, fast):
    template = tmp_path / "job.sh"
    marker = tmp_path / "marker"
    template.write_text(f"#!/bin/bash\n#SBATCH --time=7\necho module-loaded > {marker}\n{{command}}\n")
    pool = SlurmPool(SlurmConfig(workers=1, script=str(template)), tmp_path,
                     [sys.executable, "-c", f"import sys; open('{marker}', 'a').write(' '.join(sys.argv[1:]))", "worker"])
    assert "--name \"slurm-${SLURM_JOB_ID}\"" in pool.script
    pool.start()
    job_id = next(iter(pool.jobs))
    _until(lambda: marker.exists() and "slurm-" in marker.read_text(), 30, "the job's command ran")
    pool.close()
    assert marker.read_text() == f"module-loaded\nworker --name slurm-{job_id} --threads 1"
    assert pool._field(job_id, "TimeLimit") == "00:07:00"  # the template's #SBATCH lines count


def test_a_template_without_the_command_is_refused(tmp_path):
    template = tmp_path / "job.sh"
    template.write_text("#!/bin/bash\nmodule load cuda\n")
    with pytest.raises(ConfigError, match=r"job.sh: slurm.script has no \{command\}"):
        SlurmPool(SlurmConfig(workers=1, script=str(template)), tmp_path, SLEEPER)


def test_a_worker_whose_session_is_gone_exits_after_its_orphan_timeout(tmp_path):
    """A batch job outliving a crashed session must free its node: `lmc worker --orphan-timeout`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    from streamer.live.keys import create_keys

    create_keys(tmp_path / "keys")  # every worker needs keys (there is no unauthenticated dispatcher)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "streamer.cli", "worker", "--connect", f"tcp://127.0.0.1:{port}",
                          "--keys", str(tmp_path / "keys"), "--orphan-timeout", "2", "--heartbeat", "0.2", "--liveness", "2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert 2.0 <= time.monotonic() - t0 < 30
    assert "the session is gone" in res.stderr


def test_a_running_job_whose_worker_never_joins_raises_an_alert(slurm_cluster, tmp_path, fast, monkeypatch):
    """A node that cannot reach the head node (firewall, wrong --slurm-host): said, not silent."""
    monkeypatch.setattr(slurm, "JOIN_WARN_S", 1.0)
    pool = SlurmPool(SlurmConfig(workers=1), tmp_path, [*SLEEPER, "--connect", "tcp://head.example:5555"])
    pool.start()
    try:
        _until(lambda: bool(pool.alert), 30, "the join alert", pool)
    finally:
        pool.close()
    (job_id,) = [j for j in pool.alert.split() if j.isdigit()][:1]
    assert pool.alert.startswith(f"slurm: job {job_id} has run on {slurm_cluster.node} for ")
    assert "its worker has not joined: can that node reach tcp://head.example:5555?" in pool.alert


def test_a_job_waiting_for_resources_is_shown_pending_with_the_reason(slurm_cluster, tmp_path, fast):
    """Three one-GPU jobs on a two-GPU node: the third waits, shown as pending (Resources), not lost."""
    pool = SlurmPool(SlurmConfig(workers=3, args="--gres=gpu:1"), tmp_path, SLEEPER)
    pool.start()
    try:
        def settled() -> bool:
            states = sorted(j.state for j in pool.jobs.values())
            return states == ["PENDING", "RUNNING", "RUNNING"] and any(j.reason for j in pool.jobs.values())

        _until(settled, 30, "two running, one pending", pool)
        for _ in range(3):  # it stays pending: never counted as ended, never replaced
            time.sleep(0.3)
            assert pool.tick(time.monotonic()) == []
        rows = {r["state"]: r for r in pool.snapshot([], time.monotonic())}
        assert rows["pending"]["reason"] == "Resources" and rows["pending"]["waited_s"] > 0
        assert len(pool.jobs) == 3 and pool.ended_count == 0
    finally:
        pool.close()
    assert _active(slurm_cluster, tmp_path) == []


def test_a_requeued_job_stays_one_of_the_n_and_its_worker_is_reported_gone(slurm_cluster, tmp_path, fast):
    """Preemption with requeue (here `scontrol requeue`): the job is pending again, not replaced."""
    pool = SlurmPool(SlurmConfig(workers=1), tmp_path, SLEEPER)
    pool.start()
    try:
        (job_id,) = pool.jobs
        _until(lambda: pool.jobs[job_id].state == "RUNNING", 30, "the job running", pool)
        subprocess.run(["scontrol", "requeue", job_id], env=slurm_cluster.env, check=True)
        events: list = []

        def requeued() -> bool:
            events.extend(pool.tick(time.monotonic()))
            return bool(events)

        _until(requeued, 30, "the requeue noticed")
        assert [(e.job.job_id, e.requeued, e.quick) for e in events] == [(job_id, True, False)]
        assert "went back to the queue" in events[0].message
        assert list(pool.jobs) == [job_id] and pool.jobs[job_id].state == "PENDING"
        assert pool.jobs[job_id].started is None and pool.ended_count == 0
        (row,) = pool.snapshot([], time.monotonic())
        assert row["state"] == "pending" and row["reason"] == "BeginTime"
    finally:
        pool.close()
    assert _active(slurm_cluster, tmp_path) == []


def test_sbatch_refusing_a_replacement_backs_off_with_a_clear_error(slurm_cluster, tmp_path, fast):
    """The partition goes inactive mid-session: each refused replacement doubles the wait, and the
    alert carries sbatch's reason; when the partition is back, the replacement goes in."""
    pool = SlurmPool(SlurmConfig(workers=1), tmp_path, SLEEPER)
    pool.start()
    part = f"PartitionName={slurm_cluster.partition}"
    try:
        (first,) = pool.jobs
        subprocess.run(["scontrol", "update", part, "State=INACTIVE"], env=slurm_cluster.env, check=True)
        subprocess.run(["scancel", first], env=slurm_cluster.env, check=True)
        _until(lambda: "sbatch refused" in pool.alert, 30, "the refusal alert", pool)
        assert "inactive" in pool.alert.lower() and pool.jobs == {}
        streak = pool.quick_in_row
        _until(lambda: pool.quick_in_row > streak, 30, "a second refused try", pool)
        subprocess.run(["scontrol", "update", part, "State=UP"], env=slurm_cluster.env, check=True)
        _until(lambda: len(pool.jobs) == 1, 30, "the replacement submitted", pool)
        assert first not in pool.jobs
    finally:
        subprocess.run(["scontrol", "update", part, "State=UP"], env=slurm_cluster.env, check=False)
        pool.close()
    assert _active(slurm_cluster, tmp_path) == []


def test_no_sbatch_on_the_path_is_one_clear_error(tmp_path):
    pool = SlurmPool(SlurmConfig(workers=1), tmp_path, SLEEPER, env={"PATH": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"^slurm.workers is set but sbatch is not on PATH"):
        pool.start()
