from __future__ import annotations

import pytest

from gpu.backend import gpu_available


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm for the whole test session (tests/slurm_cluster.py), or a skip with
    the reason (not root, packages missing and not allowed to install them). ``SLURM_CONF`` is
    exported while it runs, so sbatch/squeue/scancel in the tests and in lmc find it. In CI (``CI`` set)
    a cluster that cannot be set up fails the tests instead of skipping them."""
    import os

    from slurm_cluster import SlurmCluster, unavailable

    reason = unavailable()
    if reason and os.environ.get("CI"):
        # CI runs as root on Debian: the Slurm tests must run there, never skip quietly
        pytest.fail(f"Slurm could not be set up in CI: {reason}")
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster().start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.stop()
