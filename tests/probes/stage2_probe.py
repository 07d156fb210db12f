"""Run under `deepspeed --num_gpus 2` by tests/e2e/test_stage2.py (not a pytest file).

Builds the real stage-2 trainer (frozen base under ZeRO-3, adapters outside it) and records,
per rank, into --probe_out:
- collective calls made while the orthogonal term is computed and differentiated (and, as a
  positive control showing the counter sees ZeRO-3's traffic, during one LM forward/backward);
- the gradient of the orthogonal term alone, and the full summed gradient of one global batch
  (all-reduced in buckets during the last backward: each bucket's all-reduce is recorded, with
  whether backward was still running), and of a short global batch of 7 records (this rank's
  last micro-batch is then empty on rank 1) under activation checkpointing;
- after every one of a few optimizer steps: how much of the base is materialised on this rank;
- the peak anonymous resident memory during those steps.
"""

import json
import sys
from pathlib import Path

# Libraries the run imports later, imported before the baseline memory reading so that it
# counts the model and its buffers, not code (pyarrow alone is ~40 MB).
import datasets  # noqa: F401
import deepspeed  # noqa: F401
import pyarrow.compute  # noqa: F401
import tqdm  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoTokenizer  # noqa: F401
import torch
import torch.distributed
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
from safetensors.torch import save_file

from collectives import CollectivePatch  # tests/probes, the script's own directory

from medcare_dist.data.batching import plan_global_batches
from medcare_dist.training.recipe import build_trainer, config_from_argv
from medcare_dist.method.stage2 import orthogonal_penalty
from medcare_dist.training.zero3 import enable_activation_checkpointing
from medcare_dist.artefacts.stage2_base import adapters_on_stage2_base, check_stage2_base
from medcare_dist.method.stage2 import OrthogonalObjective

class CollectiveCounter(CollectivePatch):
    """Counts calls to every collective of torch.distributed and deepspeed.comm while active."""

    def __init__(self):
        import deepspeed.comm

        super().__init__([torch.distributed, deepspeed.comm])
        self.calls: list[str] = []

    def wrap(self, module, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(f"{module.__name__}.{name}")
            return fn(*args, **kwargs)

        return counted


class GradientLaunches(CollectivePatch):
    """Whether each all-reduce on `group` (the adapter gradient group) was made while the
    autograd engine was running a backward."""

    def __init__(self, group):
        super().__init__([torch.distributed])
        self.group, self.in_backward = group, []

    def wrap(self, module, name, fn):
        def recorded(*args, **kwargs):
            if name == "all_reduce" and kwargs.get("group") is self.group:
                self.in_backward.append(torch._C._current_graph_task_id() != -1)  # -1: no backward running
            return fn(*args, **kwargs)

        return recorded


def status_line(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class AnonPeak:
    """Highest anonymous resident memory (RssAnon: tensors, not files or the shared-memory
    buffers of DeepSpeed's CPU collectives) seen by a 2 ms sampling thread."""

    def __enter__(self):
        import threading

        self.value, self._stop = status_line("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.value = max(self.value, status_line("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def resident_base(model) -> tuple[int, int, list[str]]:
    """(elements of base weights materialised on this rank, elements in all, names of large
    params that are not released)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    resident = total = 0
    held = []
    for name, p in model.named_parameters():
        resident += p.data.numel()
        total += p.ds_numel
        if p.ds_numel > 100_000 and (p.ds_status != ZeroParamStatus.NOT_AVAILABLE or p.data.numel() > 0):
            held.append(name)
    return resident, total, held


def main():
    argv = sys.argv[1:]
    i = argv.index("--probe_out")
    out = Path(argv[i + 1])
    del argv[i:i + 2]
    rss_before_model = status_line("RssAnon")
    cfg = config_from_argv(argv, stage=2)
    trainer = build_trainer(cfg, adapters_on_stage2_base, lambda a, c: OrthogonalObjective(a, c.ortho_lambda), lambda c: {"stage2_base": check_stage2_base(c.model)})
    rank = trainer.world.rank
    rss_after_setup = status_line("RssAnon")
    names = [n for n, _ in trainer.adapters.named_parameters()]
    save_file({n: p.detach().clone() for n, p in trainer.adapters.named_parameters()}, str(out / f"initial_rank{rank}.safetensors"))

    with CollectiveCounter() as ortho_counter:
        orthogonal_penalty(trainer.adapters).backward()
    ortho_grads = {n: p.grad.clone() for n, p in trainer.adapters.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)

    batches = plan_global_batches(trainer.lengths, cfg.global_batch_size, cfg.seed, 0)
    with CollectiveCounter() as lm_counter, GradientLaunches(trainer.grad_sync.group) as launches:
        trainer.compute_gradients(batches[0])
    step_grads = {n: p.grad.clone() for n, p in trainer.adapters.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    enable_activation_checkpointing(trainer.model)
    short_batch = batches[0][:7]
    trainer.compute_gradients(short_batch)
    short_grads = {n: p.grad.clone() for n, p in trainer.adapters.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    save_file({f"ortho.{n}": g for n, g in ortho_grads.items()} | {f"step.{n}": g for n, g in step_grads.items()}
              | {f"short.{n}": g for n, g in short_grads.items()}, str(out / f"grads_rank{rank}.safetensors"))

    rss_at_start = status_line("RssAnon")
    after_steps = []
    with AnonPeak() as peak:
        for step, batch in enumerate(batches[1:4]):
            trainer.train_step(batch)
            trainer.state.step += 1
            resident, total, held = resident_base(trainer.model)
            after_steps.append({"step": step + 1, "resident": resident, "total": total, "held": held})
    report = {
        "rank": rank,
        "world_size": trainer.world.world_size,
        "adapter_param_names": names,
        "ortho_collectives": ortho_counter.calls,
        "lm_step_collectives": len(lm_counter.calls),
        "after_steps": after_steps,
        "rss_anon_before_model": rss_before_model,
        "rss_anon_after_setup": rss_after_setup,
        "rss_anon_before_steps": rss_at_start,
        "peak_rss_anon_during_steps": peak.value,
        "first_global_batch": batches[0],
        "short_global_batch": short_batch,
        "gradient_buckets": len(trainer.grad_sync.buckets),
        "bucket_launches_in_backward": launches.in_backward,
    }
    (out / f"report_rank{rank}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
