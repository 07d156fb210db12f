"""Run by tests/e2e/test_reliability.py (not a pytest file): a world of 2 plain processes
(torch.distributed over gloo, no DeepSpeed) with the liveness channel. The rank named by
--stop stops itself with SIGSTOP after joining; the other waits in a barrier, which nothing
but the liveness channel can end (the collective timeout is 10 minutes)."""

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from medcare_dist.dist.process_group import gather_objects
from medcare_dist.dist.rank_env import World
from medcare_dist.dist.liveness import Liveness, unresponsive_after

stop = int(sys.argv[1])
dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
world = World(rank=dist.get_rank(), local_rank=0, world_size=dist.get_world_size(), device=torch.device("cpu"))
liveness = Liveness.start(world, grace_s=2.0, gather_objects=gather_objects, silence_s=unresponsive_after(600))
dist.barrier()
if world.rank == stop:
    os.kill(os.getpid(), signal.SIGSTOP)
print(f"rank {world.rank}: waiting in a barrier since {time.time():.3f}", flush=True)
dist.barrier()
print(f"rank {world.rank}: the barrier returned", flush=True)
