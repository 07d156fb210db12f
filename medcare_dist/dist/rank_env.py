"""Who am I in the world: rank discovery for every launcher we support, in one place.

- the `deepspeed` runner (local, `--hostfile` over ssh/pdsh, `--no_ssh --node_rank`) and
  `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are already set (the
  runner also appends `--local_rank=N` to the script's arguments: `without_local_rank`);
- SLURM (`srun`): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST are
  mapped to those; the port comes from the job id (`slurm_master_port`, which the sbatch
  templates call too);
- `mpirun` (also `deepspeed --launcher openmpi`): rank, size and local rank are discovered
  through mpi4py; MASTER_ADDR is rank 0's address unless set (`mpirun -x MASTER_ADDR=...`);
  MASTER_PORT is a free port chosen by rank 0 unless set;
- a single process with none of these is a world of one.

Nothing here imports torch: the sbatch templates call this module before any training import.
The process group itself, the pre-join checks and the collectives are in process_group.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medcare_dist.errors import DistributedSetupError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slurm_master_port(job_id: str | int | None = None) -> int:
    """The rendezvous port of a SLURM job: 20000 + job id % 20000, so two jobs sharing a
    node do not collide (29500 without a job id)."""
    job = str(os.environ.get("SLURM_JOB_ID", "") if job_id is None else job_id)
    return 20000 + int(job) % 20000 if job.isdigit() else 29500


def without_local_rank(argv: list[str]) -> list[str]:
    """The arguments less the `--local_rank=N` (or `--local-rank N`) the deepspeed runner
    appends: LOCAL_RANK in the environment says the same."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def env_from_launcher() -> bool:
    """Set the torch.distributed variables from SLURM's or MPI's when one of them started
    us (True); False when they are already set, or for a plain single process."""
    return _env_from_slurm() or _env_from_mpi()


def _env_from_slurm() -> bool:
    """Map SLURM's task variables to the torch.distributed ones when srun started us."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return False
    ntasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    if ntasks is None:
        return False
    if "SLURM_STEP_ID" not in os.environ and int(ntasks) > 1:
        raise DistributedSetupError(
            f"running inside a SLURM job of {ntasks} tasks but not under srun (no SLURM_STEP_ID): "
            "start the ranks with `srun python launch/stageN.py ...` (see launch/slurm/stage1.sbatch)"
        )
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = ntasks
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(slurm_master_port(os.environ.get("SLURM_JOB_ID", "")))
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
        os.environ["MASTER_ADDR"] = _first_slurm_host(nodelist)
    os.environ["MEDCARE_LAUNCHED_BY"] = "srun"
    return True


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as "gpu[03-05,07],cpu1" -> "gpu03"."""
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in first:
        return first
    prefix, rest = first.split("[", 1)
    return prefix + rest.split("]")[0].split(",")[0].split("-")[0]


_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def _launched_by_mpi() -> bool:
    return "RANK" not in os.environ and any(v in os.environ for v in _MPI_RANK_VARS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _own_address() -> str:
    """This host's address as other hosts should dial it: the first non-loopback address its
    name resolves to, else the first of `hostname -I`."""
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addr = info[4][0]
            if not addr.startswith("127."):
                return addr
    except OSError:
        pass
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostname()


def _env_from_mpi() -> bool:
    """Rank discovery under mpirun, through mpi4py (rank 0's address and a port for everyone)."""
    if not _launched_by_mpi():
        return False
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedSetupError(
            "started by an MPI launcher (OMPI_COMM_WORLD_RANK/PMI_RANK set) but mpi4py is not installed: "
            "`pip install mpi4py` (the project's [mpi] extra) in the environment every rank runs"
        ) from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    local_rank = hosts[:rank].count(hosts[rank])
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else _own_address())
        port = os.environ.get("MASTER_PORT") or str(free_port())
        master = (addr, port)
    else:
        master = None
    addr, port = comm.bcast(master, root=0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank), MASTER_ADDR=addr, MASTER_PORT=port)
    os.environ["MEDCARE_LAUNCHED_BY"] = "mpirun"
    return True


def launch_world_size() -> int | None:
    """The world size the launcher asked for, read from the environment before any process
    group exists (None for a plain single process)."""
    for var in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if "SLURM_PROCID" in os.environ and os.environ.get("SLURM_NTASKS", "").isdigit():
        return int(os.environ["SLURM_NTASKS"])
    return None


_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def started_by_launcher() -> bool:
    """A launcher (deepspeed, torchrun, srun, mpirun) started this process: it set a rank."""
    return any(os.environ.get(var, "").isdigit() for var in _RANK_VARIABLES)


def launch_rank() -> int:
    """This process's rank as the launcher set it, read before any process group exists
    (0 for a plain single process)."""
    for var in _RANK_VARIABLES:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def launch_local_rank() -> int:
    """This process's rank within its node as the launcher set it (0 for a plain single process)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def world_size_origin() -> str:
    """Where the world size comes from, in words, for error messages."""
    launcher = os.environ.get("MEDCARE_LAUNCHED_BY")
    if launcher == "srun" or ("RANK" not in os.environ and "SLURM_PROCID" in os.environ):
        return "SLURM tasks (--nodes x --ntasks-per-node)"
    if launcher == "mpirun" or _launched_by_mpi():
        return "mpirun -np"
    if "CROSS_SIZE" in os.environ or "LOCAL_SIZE" in os.environ:
        return "the deepspeed runner: the sum of the hostfile's slots (or --num_nodes x --num_gpus)"
    return "the launcher (WORLD_SIZE)"
