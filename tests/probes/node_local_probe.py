"""Collective traffic per process group during training, on simulated nodes.

Two uses:
- under the deepspeed runner (RANK set), by `run_simulated_nodes` below: builds the real
  stage-1 trainer, then records every collective (operation, the global ranks of its group,
  payload bytes, forward or not) during one gradient pass and a few optimizer steps, and
  writes per rank into --probe_out: report_rank{R}.json, the summed gradients of the first
  global batch and the adapter weights after the steps;
- imported (tests/probes/test_node_local.py, bench/cross_node_bytes.py): `run_simulated_nodes`
  starts one `deepspeed --no_ssh --node_rank N` runner per simulated node, as a scheduler
  would, and returns the reports.

Payload of a call = the bytes of its result buffer on this rank (the gathered tensor of an
all-gather, the reduced tensor of an all-reduce). Only the outermost call is counted, so a
deepspeed.comm function that calls torch.distributed is one call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared helpers
from helpers import free_port  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
from collectives import CollectivePatch  # noqa: E402

STEPS = 3  # optimizer steps recorded after the gradient pass
# ZeRO-3 settings under which even the tiny test model is gathered submodule by submodule in
# forward and again in backward (nothing persistent, prefetched or kept for reuse), as a
# multi-billion model is under the shipped values. Partitioning itself is left as shipped.
GATHER_EVERY_USE = {
    "stage3_param_persistence_threshold": 0,
    "stage3_prefetch_bucket_size": 0,
    "stage3_max_live_parameters": 0,
    "stage3_max_reuse_distance": 0,
}


class CollectiveRecorder(CollectivePatch):
    """Records every collective of torch.distributed and deepspeed.comm while active."""

    def __init__(self):
        import deepspeed.comm
        import deepspeed.comm.comm
        import torch.distributed
        import torch.distributed.distributed_c10d

        super().__init__([torch.distributed, torch.distributed.distributed_c10d, deepspeed.comm, deepspeed.comm.comm])
        self.calls: dict[tuple, int] = defaultdict(int)
        self.label, self.phase = "", "after_forward"
        self._depth = threading.local()

    def wrap(self, module, name, fn):
        def recorded(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                self.calls[(self.label, self.phase, name, tuple(group_ranks(args, kwargs)), payload_bytes(args, kwargs))] += 1
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        return recorded

    def watch_forward(self, model) -> None:
        """Label calls made inside `model`'s forward (ZeRO-3's hooks included) "forward"."""
        model.register_forward_pre_hook(lambda *_: setattr(self, "phase", "forward"), prepend=True)
        model.register_forward_hook(lambda *_: setattr(self, "phase", "after_forward"))

    def records(self) -> list[dict]:
        """One record per (label, phase, operation, group, payload bytes of one call)."""
        keys = ("label", "phase", "op", "ranks", "bytes")
        return [dict(zip(keys, k), ranks=list(k[3]), calls=n) for k, n in self.calls.items()]


def group_ranks(args, kwargs) -> list[int]:
    import torch.distributed as dist

    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    if group is None or group == dist.GroupMember.WORLD:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


def payload_bytes(args, kwargs) -> int:
    """The largest tensor argument, or list of tensors summed: the result buffer."""
    import torch

    sizes = [0]
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            sizes.append(a.numel() * a.element_size())
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            sizes.append(sum(t.numel() * t.element_size() for t in a))
    return max(sizes)


def hpz_state(model) -> dict:
    """How many base params hold a secondary (node-local) shard, the group size, and the
    bytes of this rank's primary and secondary shards."""
    params = list(model.parameters())
    secondary = [p.ds_secondary_tensor for p in params if getattr(p, "ds_secondary_tensor", None) is not None]
    return {"params": len(params), "with_secondary": len(secondary),
            "group_size": getattr(params[0], "ds_secondary_tensor_group_size", None),
            "primary_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
            "secondary_bytes": sum(t.numel() * t.element_size() for t in secondary)}


def probe_main(argv: list[str]) -> None:
    import torch
    import torch.distributed
    from safetensors.torch import save_file

    from medcare_dist.data.batching import plan_global_batches
    from medcare_dist.method.stage1 import stage1_adapters
    from medcare_dist.dist.node_local import node_id
    from medcare_dist.training.recipe import build_trainer, config_from_argv
    from medcare_dist.method.stage1 import RouterObjective

    i = argv.index("--probe_out")
    out = Path(argv[i + 1])
    del argv[i:i + 2]
    cfg = config_from_argv(argv, stage=1)
    trainer = build_trainer(cfg, stage1_adapters, lambda a, c: RouterObjective(a, c.router_aux_loss_coef))
    rank = trainer.world.rank
    adapters = dict(trainer.adapters.named_parameters())
    batches = plan_global_batches(trainer.lengths, cfg.global_batch_size, cfg.seed, 0)
    hpz_before = hpz_state(trainer.model)
    recorder = CollectiveRecorder()
    recorder.watch_forward(trainer.model)
    losses = []
    with recorder:
        recorder.label = "gradients"
        trainer.compute_gradients(batches[0])
        grads = {f"grad.{n}": p.grad.clone() for n, p in adapters.items() if p.grad is not None}
        trainer.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(batches[1:STEPS + 1], start=1):
            recorder.label = f"step{step}"
            result = trainer.train_step(batch)
            trainer.state.step += 1
            losses.append(result.losses)
    save_file(grads | {f"weight.{n}": p.detach().clone() for n, p in adapters.items()}, str(out / f"adapters_rank{rank}.safetensors"))
    report = {
        "rank": rank,
        "world_size": trainer.world.world_size,
        "node": node_id(),
        "adapter_grad_bytes": sum(p.numel() * p.element_size() for p in trainer.params),
        "hpz_before_steps": hpz_before,
        "hpz_after_steps": hpz_state(trainer.model),
        "losses": losses,
        "collectives": recorder.records(),
    }
    (out / f"report_rank{rank}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Starting the simulated nodes (run outside the launcher)
# ---------------------------------------------------------------------------------------

def stage1_args(model: str, ds_config: Path, out: Path, world: int) -> list[str]:
    """A short stage-1 run on the sample data: one micro-batch of 2 records per rank per step."""
    repo = Path(__file__).resolve().parents[2]
    return ["--model", model, "--data", str(repo / "data" / "sample" / "stage1.jsonl"), "--output_dir", str(out),
            "--ds_config", str(ds_config), "--global_batch_size", str(2 * world), "--micro_batch_size", "2",
            "--max_length", "128", "--num_experts", "4", "--lora_r", "8"]


def gather_every_use(ds_config: Path, out: Path) -> Path:
    """A copy of `ds_config` with GATHER_EVERY_USE, written to `out`."""
    ds = json.loads(ds_config.read_text())
    ds["zero_optimization"].update(GATHER_EVERY_USE)
    out.write_text(json.dumps(ds, indent=1))
    return out


def run_simulated_nodes(train_args: list[str], out: Path, port: int, nodes: int = 2, ranks_per_node: int = 2, timeout: float = 1500) -> list[dict]:
    """One `deepspeed --no_ssh --node_rank N` runner per simulated node (same host, a hostfile
    of `nodes` hosts with `ranks_per_node` slots), each starting its ranks of this probe.
    Returns every rank's report, in rank order; raises with the log tails if a runner fails."""
    repo = Path(__file__).resolve().parents[2]
    out.mkdir(parents=True, exist_ok=True)
    hostfile = out / "hostfile"
    hostfile.write_text("".join(f"node-{n} slots={ranks_per_node}\n" for n in range(nodes)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs, logs = [], [out / f"node{n}.log" for n in range(nodes)]
    for n in reversed(range(nodes)):  # the master last: the others wait for it
        cmd = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(Path(__file__).resolve()), *train_args, "--probe_out", str(out)]
        with open(logs[n], "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    tails = lambda: "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}" for log in logs)  # noqa: E731
    try:
        rcs = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"simulated-node runners still running after {timeout:.0f} s:\n{tails()}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if any(rcs):
        raise AssertionError(f"simulated-node runners exited {list(reversed(rcs))}:\n{tails()}")
    return [json.loads((out / f"report_rank{r}.json").read_text()) for r in range(nodes * ranks_per_node)]


def cross_node(record: dict, reports: list[dict]) -> bool:
    """Whether a recorded collective's group spans ranks on more than one node."""
    return len({reports[r]["node"] for r in record["ranks"]}) > 1


def traffic(report: dict, reports: list[dict]) -> dict[str, dict[str, int]]:
    """Per recorded pass (label) of one rank: payload bytes and calls crossing nodes, and
    payload bytes inside a node."""
    out: dict[str, dict[str, int]] = {}
    for rec in report["collectives"]:
        t = out.setdefault(rec["label"], {"cross_node_bytes": 0, "cross_node_calls": 0, "in_node_bytes": 0})
        if cross_node(rec, reports):
            t["cross_node_bytes"] += rec["bytes"] * rec["calls"]
            t["cross_node_calls"] += rec["calls"]
        else:
            t["in_node_bytes"] += rec["bytes"] * rec["calls"]
    return out


if __name__ == "__main__":
    probe_main(sys.argv[1:])
