#!/bin/sh
# Install the Debian packages the Slurm tests start (slurmctld, slurmd, slurm-client, munge).
# Idempotent and quick when they are there; does nothing (and says why) when not root or not Debian.
# The tests skip with the reason when Slurm cannot be started; as root in CI they run.
set -u
need=""
for b in munged mungekey slurmctld slurmd sbatch squeue scancel scontrol sinfo; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || need="$need $b"
done
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: missing$need; not root or no apt-get: the Slurm tests will skip" >&2
    exit 0
fi
echo "install_slurm.sh: installing slurmctld slurmd slurm-client munge (missing:$need)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || echo "install_slurm.sh: apt-get failed: the Slurm tests will skip (and fail under CI)" >&2
exit 0
