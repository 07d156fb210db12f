#!/usr/bin/env bash
# The test command: system packages the distributed tests use, the project, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && ! command -v mpirun >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi
# A one-node SLURM for tests/test_cluster.py (the test starts munged, slurmctld and slurmd
# itself, under a temp dir, and stops them after).
if command -v apt-get >/dev/null 2>&1 && ! { command -v munged && command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null
fi
bash launch/setup.sh test,mpi,plot,tensorboard
. .venv/bin/activate
export DS_ACCELERATOR=cpu
python -m pytest -q "$@"
