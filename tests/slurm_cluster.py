"""A real single-node Slurm for the tests: munged, slurmctld and slurmd in a temporary folder.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` packages, started as root in
the foreground (``-D``/``-F``, so this process owns and reaps them) with a generated
``slurm.conf``: ports of their own, ``ProctrackType=proctrack/linuxproc`` and
``TaskPlugin=task/none`` (no cgroups needed), no accounting, state/spool/logs/sockets under the
temporary folder, one node with this machine's CPUs and memory (``slurmd -C``), one partition.
The node also declares ``gpus`` GPUs (``Gres=gpu:N``) whose device files are empty files in the
temporary folder: Slurm's GPU bookkeeping for real (``--gres=gpu:1`` is allocated, the job gets
``CUDA_VISIBLE_DEVICES`` and ``scontrol show job -d`` its ``IDX``), with no hardware behind it.
Nothing under /etc is read or changed: every client command finds the cluster through
``SLURM_CONF``, and munge through ``AuthInfo=socket=...``.

:func:`unavailable` says why Slurm cannot run here (or installs the packages first, as root, when
``LMC_SLURM_INSTALL=1`` or ``CI`` is set); :class:`SlurmCluster` starts and stops it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
INSTALLER = Path(__file__).with_name("install_slurm.sh")


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def unavailable() -> str | None:
    """None when a cluster can be started here, else the reason (for a skip)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "Slurm tests need Linux"
    if os.geteuid() != 0:
        return "Slurm tests start slurmctld/slurmd and need root"
    missing = _missing()
    if missing and (os.environ.get("LMC_SLURM_INSTALL") == "1" or os.environ.get("CI")):
        subprocess.run(["sh", str(INSTALLER)], check=False, timeout=600)
        missing = _missing()
    if missing:
        return (f"Slurm packages missing ({', '.join(missing)}): run `sh {INSTALLER}` as root "
                "(or set LMC_SLURM_INSTALL=1)")
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line(name: str) -> str:
    """This machine as slurmd sees it (``slurmd -C``), with a little memory held back."""
    try:
        first = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(kv.split("=", 1) for kv in first.splitlines()[0].split() if "=" in kv)
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        fields = {}
    cpus = fields.get("CPUs", str(os.cpu_count() or 1))
    mem = int(fields.get("RealMemory", "1024"))
    topo = " ".join(f"{k}={fields[k]}" for k in ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
                    if k in fields)
    return f"NodeName={name} NodeAddr=127.0.0.1 CPUs={cpus} {topo} RealMemory={max(mem * 9 // 10, 100)} State=UNKNOWN"


class SlurmCluster:
    """munged + slurmctld + slurmd under ``root`` (a fresh temporary folder when None)."""

    def __init__(self, root: Path | None = None, gpus: int = 2) -> None:
        # munged wants every folder above its socket searchable by all: not under pytest's 0700 tmp
        self.root = Path(root or tempfile.mkdtemp(prefix="lmc-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.partition = "lmc"
        self.gpus = gpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_seconds = 0.0

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        lines = [
            "ClusterName=lmctest",
            "GresTypes=gpu",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/run/munge.sock",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "ReturnToService=2",
            "MinJobAge=300",
            "KillWait=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            _node_line(self.node) + (f" Gres=gpu:{self.gpus}" if self.gpus else ""),
            # tiny test workers: let more jobs share the two cores than there are cores
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # gres.conf is read from slurm.conf's folder
        devices = [r / "dev" / f"fakegpu{i}" for i in range(self.gpus)]
        (r / "dev").mkdir(exist_ok=True)
        for d in devices:
            d.touch()
        (r / "gres.conf").write_text("".join(f"NodeName={self.node} Name=gpu File={d}\n" for d in devices))

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        t0 = time.monotonic()
        r = self.root
        for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
            (r / sub).mkdir(exist_ok=True)
            (r / sub).chmod(mode)
        key = r / "munge" / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        self._write_conf()
        self.procs["munged"] = subprocess.Popen(
            [_binary("munged"), "-F", f"--key-file={key}", f"--socket={r}/run/munge.sock",
             f"--pid-file={r}/run/munged.pid", f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/seed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait(lambda: (r / "run" / "munge.sock").exists(), timeout, "munged")
        for daemon in ("slurmctld", "slurmd"):
            with open(r / "log" / f"{daemon}.out", "ab") as out:
                self.procs[daemon] = subprocess.Popen(
                    [_binary(daemon), "-D", "-f", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                    env=self.env, start_new_session=True)
        self._wait(self._idle, timeout, "slurmd (node idle in sinfo)")
        self.start_seconds = time.monotonic() - t0
        return self

    def _idle(self) -> bool:
        res = subprocess.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], capture_output=True, text=True, env=self.env)
        return res.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout:.0f} s: {self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        tails = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").strip().splitlines()[-5:]
            tails.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(tails)

    def squeue(self) -> list[str]:
        """Ids of the jobs the cluster still lists as pending, running or completing."""
        res = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env, check=True)
        return res.stdout.split()

    def cancel_all(self, timeout: float = 30.0) -> None:
        ids = self.squeue()
        if ids:
            subprocess.run(["scancel", *ids], env=self.env, check=False)
        deadline = time.monotonic() + timeout
        while self.squeue() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                p = self.procs.pop(name, None)
                if p is None:
                    continue
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
            shutil.rmtree(self.root, ignore_errors=True)
