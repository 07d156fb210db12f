"""Run by tests/e2e/test_reliability.py (not a pytest file): a world of 2 plain processes
(torch.distributed over gloo) in which each rank resolves `--resume auto` against the output
dir given for it (argv[1 + rank]); prints the agreed checkpoint or the error."""

import datetime
import sys

import torch.distributed as dist

from medcare_dist.artefacts.checkpoint import CheckpointError
from medcare_dist.training.resume import agreed_resume_checkpoint

dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=2))
try:
    path = agreed_resume_checkpoint(sys.argv[1 + dist.get_rank()], "auto")
    print(f"rank {dist.get_rank()}: agreed on {path.name if path else None}", flush=True)
except CheckpointError as err:
    print(f"rank {dist.get_rank()}: CheckpointError: {err}", flush=True)
dist.destroy_process_group()
