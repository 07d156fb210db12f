"""Process-group setup and the few collectives the trainer needs.

Works under every launcher we support: the `deepspeed` runner (RANK/WORLD_SIZE/... set),
`torchrun`, SLURM (`srun`, SLURM_* variables) and `mpirun` (rank discovery through
mpi4py, done by DeepSpeed's `auto_mpi_discovery`). A single process with none of these is a
world of one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_from_slurm() -> None:
    """Map SLURM's task variables to the torch.distributed ones when srun started us."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
        os.environ["MASTER_ADDR"] = _first_slurm_host(nodelist)


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as "gpu[03-05,07],cpu1" -> "gpu03"."""
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in first:
        return first
    prefix, rest = first.split("[", 1)
    return prefix + rest.split("]")[0].split(",")[0].split("-")[0]


def _launched_by_mpi() -> bool:
    return "RANK" not in os.environ and any(
        v in os.environ for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
    )


def init_distributed(timeout_minutes: float = 30.0) -> World:
    """Join (or create) the process group; gloo on CPU, nccl on CUDA."""
    import deepspeed

    _env_from_slurm()
    use_cuda = torch.cuda.is_available()
    deepspeed.init_distributed(
        dist_backend="nccl" if use_cuda else "gloo",
        auto_mpi_discovery=_launched_by_mpi(),
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
    )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown() -> None:
    """Destroy the process group so that MPI and gloo exit cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_on_flat(tensors: list[torch.Tensor], collective) -> None:
    """Run one collective over all `tensors` packed into one buffer, then unpack in place."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        collective(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the adapters' gradients over ranks, in one collective.

    The loss on each rank is already divided by the token count of the *global* batch,
    so the sum is the gradient of the global mean, whatever the world size.
    """
    for p in params:
        if p.grad is None:  # a param this rank's micro-batches did not reach
            p.grad = torch.zeros_like(p)
    _collective_on_flat([p.grad for p in params], lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))


def broadcast_params(params: list[torch.Tensor], src: int = 0) -> None:
    """Make every rank start from rank `src`'s adapter weights."""
    _collective_on_flat(list(params), lambda flat: dist.broadcast(flat, src=src))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over ranks (for logging)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
