"""Cost of the stage-2 orthogonal term: step time with lambda_1 = 1 against no orthogonal
term, on the real trainer (frozen base under ZeRO-3, N ranks), measured in the same run.

    deepspeed --num_gpus 2 bench/orth_overhead.py --model runs/quickstart/stage2-base \
        --data data/sample/stage2.jsonl [--steps 20] [--key value ...]

(`bash launch/quickstart.sh` makes runs/quickstart/stage2-base.) Steps alternate between the
two variants over the same batches, so drift and warm-up hit both alike; medians are printed,
with the orthogonal term's own forward+backward time.
"""

import statistics
import sys
import time

import torch

from medcare_dist.data.batching import plan_global_batches
from medcare_dist.method.stage2 import orthogonal_penalty
from medcare_dist.training.recipe import build_trainer, config_from_argv
from medcare_dist.artefacts.stage2_base import adapters_on_stage2_base, check_stage2_base
from medcare_dist.method.stage2 import OrthogonalObjective
from medcare_dist.training.trainer import Objective


def main():
    argv = sys.argv[1:]
    steps = 20
    if "--steps" in argv:
        i = argv.index("--steps")
        steps = int(argv[i + 1])
        del argv[i:i + 2]
    cfg = config_from_argv(argv + ["--output_dir", "/tmp/orth_overhead"], stage=2)
    trainer = build_trainer(cfg, adapters_on_stage2_base, lambda a, c: OrthogonalObjective(a, 1.0), lambda c: {"stage2_base": check_stage2_base(c.model)})
    variants = {"lambda=1": trainer.objective, "no ortho term": Objective()}
    batches = plan_global_batches(trainer.lengths, cfg.global_batch_size, cfg.seed, 0)
    times = {name: [] for name in variants}
    for step in range(2 * steps + 2):
        name = list(variants)[step % 2]
        trainer.objective = variants[name]
        start = time.perf_counter()
        trainer.train_step(batches[(step // 2) % len(batches)])
        if step >= 2:  # the first pair is warm-up
            times[name].append(time.perf_counter() - start)
    term = []
    for _ in range(50):
        start = time.perf_counter()
        orthogonal_penalty(trainer.adapters).backward()
        term.append(time.perf_counter() - start)
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.world.is_main:
        with_term, without = statistics.median(times["lambda=1"]), statistics.median(times["no ortho term"])
        print(f"world size {trainer.world.world_size}, {steps} steps each, global batch {cfg.global_batch_size}")
        print(f"step time, lambda=1:         {with_term * 1e3:8.1f} ms")
        print(f"step time, no ortho term:    {without * 1e3:8.1f} ms")
        print(f"ratio:                       {with_term / without:8.3f}  (target <= 1.02)")
        print(f"orthogonal term fwd+bwd:     {statistics.median(term) * 1e3:8.2f} ms  ({statistics.median(term) / without:.2%} of a step)")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
