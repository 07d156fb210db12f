"""`medcare-dist plan`: GPU memory per rank for a MedCare run, before renting the cluster.
(The command line, which takes the training options by their training names: cli.py.)

Everything is arithmetic on the model's shapes (a built-in Qwen1.5 size or any Qwen2-style
config.json), so it runs offline and in a second. What it counts, per GPU:

model states
  base shard      the frozen base in the training dtype, partitioned by ZeRO-3:
                  params x bytes / world (DeepSpeed's own estimator calls this the "params"
                  term). No gradient and no optimizer state exist for it.
  base node shard with ds_configs/zero3_node_local.json (chosen on several nodes when it
                  fits): hpZ's secondary copy over the ranks of a node, params x bytes / GPUs
                  per node; it keeps the base's all-gathers inside each node.
  persistent      params below `stage3_param_persistence_threshold` (norms, biases) are not
                  partitioned: every rank holds them whole.
  adapters        unsharded on every rank, fp32 (README, "How the adapters live under
                  ZeRO-3"); counted exactly from the model's shapes and the stage's layout:
                    stage 1: LoRA rank r on q, k, v, o; on gate, up, down a shared LoRA of
                             rank r*num_shared, E routed experts of rank r and a router
                             (d_in*E weights + E biases)
                    stage 2: a knowledge and an alignment LoRA, both rank r*num_shared, on
                             gate, up, down (alignment also on q, k, v, o with
                             --align_attention)
                  A LoRA of rank r on a [d_out, d_in] Linear has r*(d_in + d_out) params.
  adapter grads   fp32, trainable adapter params only (4 bytes each)
  AdamW states    fp32 exp_avg and exp_avg_sq (8 bytes per trainable param); a torch
                  optimizer, not DeepSpeed's, so DeepSpeed's optimizer offload cannot move
                  them: ds_configs/zero3_offload.json offloads the base params only.

working memory
  ZeRO-3 gathered params: the module being computed (the largest is counted: the embedding
                  or LM head, vocab x hidden), the prefetch bucket (stage3_prefetch_bucket_size,
                  capped by stage3_max_live_parameters), and the params kept gathered because
                  they are used again within stage3_max_reuse_distance: at the turn from forward
                  to backward the last layers are reused after twice their own size, so up to
                  max_reuse_distance / 2 params stay gathered (all of them for a small model).
  activations     per token (micro-batch rows x the trainer's row budget: max_length, or
                  --pack_tokens when packing) and per decoder layer, what autograd keeps for
                  backward with a frozen base, SDPA attention (flash / memory-efficient: no
                  [seq, seq] scores), HF's Qwen2 code and our adapter hooks, whose matmuls run in
                  --adapter_dtype (auto: bf16 with a bf16 base; tools/memory_model.py):
                    RMSNorm x2:           fp32 input, 4h each
                    attention:            q, k, v, output in the base dtype, fp32 log-sum-exp
                    SwiGLU:               gate, up and silu(gate) in the base dtype
                    per adapted Linear:   its input in the adapter dtype: a cast copy per Linear
                                          when that differs from the base dtype, else the base
                                          Linear's own input (shared by q/k/v and by gate/up;
                                          o_proj's is the attention output, kept already);
                                          with dropout each adapter's dropped copy and mask
                                          (1 byte on GPU) instead, and a MoLoRA's router keeps
                                          the undropped input; a frozen knowledge adapter keeps
                                          only the mask
                    rank-space:           A x per LoRA; per MoLoRA its rank-space tensors,
                                          fp32 gates and int64 indices (which depend on
                                          --routed_compute), and per layer the adapter weights
                                          as cast to the matmul dtype (none for fp32 LoRA
                                          weights) and the dense MoLoRA's concatenated A's and B's
                  With --grad_checkpointing (non-reentrant, per decoder layer): each layer keeps only its
                  input (base bytes x h per token), and one layer's full set is live again
                  while it is recomputed in backward.
  loss working set what --lm_loss holds at its peak (training/lm_loss.loss_working_bytes, the
                  function that sits beside the loss the trainer runs): chunked, the hidden rows'
                  gradient and one [--loss_chunk_tokens, vocab] fp32 block plus its cast; full,
                  the logits, their fp32 copy, the kept log-softmax and its gradient.
                  tests/tools/test_planner.py checks both against the bytes autograd actually
                  saves on a small Qwen2 with the real adapters attached, for every adapter
                  dtype, dropout, routed_compute and loss.
  reserve         --reserve GiB for the CUDA context, NCCL buffers and allocator fragmentation.

peak = model states + max(activations + loss + gathered params, the adapter gradients' all-reduce
copies). The gradient buckets (dist/grad_buckets.py) each keep their flat copy until the step's
`finish()`, so at the end of the last backward they hold one more copy of every adapter gradient
whatever --grad_bucket_mb: the same bytes as one flat buffer, counted as such. What does not fit
with ds_configs/zero3.json is tried again with the base shard offloaded to CPU
(ds_configs/zero3_offload.json); the pinned CPU memory that takes per
node is shown.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medcare_dist.errors import ConfigError
from medcare_dist.resources import resolve_ds_config
from medcare_dist.tools.memory_model import (
    ADAPTER_BYTES,
    DTYPE_BYTES,
    AdapterLayout,
    StepOptions,
    activation_bytes,
    base_counts,
    load_shape,
)

GiB = 2**30
ZERO3 = "zero3"
ZERO3_OFFLOAD = "zero3_offload"
ZERO3_NODE_LOCAL = "zero3_node_local"  # several nodes: the base's gathers stay inside each node

# --- the plan --------------------------------------------------------------------------

def _zero3_settings(ds_config: str | Path) -> dict[str, float]:
    z = json.loads(resolve_ds_config(str(ds_config)).read_text()).get("zero_optimization", {})
    return {
        "prefetch_bucket": float(z.get("stage3_prefetch_bucket_size", 5e7)),
        "max_live": float(z.get("stage3_max_live_parameters", 1e9)),
        "max_reuse_distance": float(z.get("stage3_max_reuse_distance", 1e9)),
        "persistence_threshold": float(z.get("stage3_param_persistence_threshold", 1e5)),
        "offload_param": z.get("offload_param", {}).get("device", "none") not in ("none", None),
        "hpz": z.get("zero_hpz_partition_size", 1),
    }


@dataclass
class Plan:
    model: str
    stage: int
    world: int
    nodes: int
    gpu_memory_gib: float
    ds_config: str
    offload_param: bool
    tokens_per_micro_batch: int
    grad_ckpt: bool
    params: dict[str, int]
    adapter_params: dict[str, int]
    gpu_bytes: dict[str, int]  # per GPU, the breakdown
    cpu_bytes_per_node: int  # pinned base params when offloaded
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.gpu_bytes["peak"]

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_memory_gib * GiB

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}

    def render(self) -> str:
        g = self.gpu_bytes
        gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        lines = [
            f"{self.model}, stage {self.stage}: {self.nodes} node(s) x {self.world // self.nodes} GPU(s) = {self.world} ranks, "
            f"{self.tokens_per_micro_batch} tokens per micro-batch, grad checkpointing {'on' if self.grad_ckpt else 'off'}",
            f"base params {self.params['total']:,} (largest module {self.params['largest_module']:,}); "
            f"adapter params {self.adapter_params['total']:,} ({self.adapter_params['trainable']:,} trainable)",
            f"with {self.ds_config}" + (" (base params offloaded to CPU)" if self.offload_param else ""),
            f"  {f'base shard (ZeRO-3, 1/{self.world})':<33}{gib(g['base_shard'])}",
            f"  base node shard (hpZ)            {gib(g['base_node_shard'])}",
            f"  persistent small params          {gib(g['persistent'])}",
            f"  adapters (fp32, every rank)      {gib(g['adapters'])}",
            f"  adapter gradients (fp32)         {gib(g['adapter_grads'])}",
            f"  AdamW states (fp32, 2 per param) {gib(g['optimizer'])}",
            f"  activations: layers              {gib(g['activations_layers'])}",
            f"  loss working set                 {gib(g['activations_loss'])}",
            f"  ZeRO-3 gathered params           {gib(g['gathered'])}",
            f"  reserve (context, NCCL, frag.)   {gib(g['reserve'])}",
            f"  peak per GPU                     {gib(g['peak'])}  of {self.gpu_memory_gib:g} GiB: "
            + ("fits" if self.fits else "DOES NOT FIT"),
        ]
        if self.offload_param:
            lines.append(f"  pinned CPU memory per node for the offloaded base: {self.cpu_bytes_per_node / GiB:.2f} GiB")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan(
    model: str,
    stage: int = 1,
    nodes: int = 1,
    gpus_per_node: int = 8,
    gpu_memory_gib: float = 80.0,
    micro_batch: int = 2,
    seq_len: int = 1024,
    grad_ckpt: bool = False,
    dtype: str = "bf16",
    layout: AdapterLayout | None = None,
    reserve_gib: float = 2.0,
    ds_config: str | None = None,
    step: StepOptions | None = None,
) -> Plan:
    """The memory plan of one configuration. With `ds_config=None` the ZeRO-3 config is
    chosen: on several nodes ds_configs/zero3_node_local.json when it fits, else
    ds_configs/zero3.json when it fits, else the CPU-offload one. `step`: the loss, adapter
    dtype and packing options (StepOptions: the trainer's defaults when None)."""
    if ds_config is None:
        args = (model, stage, nodes, gpus_per_node, gpu_memory_gib, micro_batch, seq_len, grad_ckpt, dtype, layout, reserve_gib)
        local = plan(*args, ZERO3_NODE_LOCAL, step) if nodes > 1 else None
        if local is not None and local.fits:
            local.notes.insert(0, "node-local sharding: the base's all-gathers stay inside each node, only the adapter gradients cross nodes")
            return local
        first = plan(*args, ZERO3, step)
        if local is not None:
            first.notes.insert(0, f"does not fit with {ZERO3_NODE_LOCAL} ({local.peak_bytes / GiB:.2f} GiB): the base is gathered across nodes")
        if first.fits:
            return first
        second = plan(*args, ZERO3_OFFLOAD, step)
        if second.fits:
            second.notes.insert(0, f"does not fit with {ZERO3} ({first.peak_bytes / GiB:.2f} GiB): offload the base params to CPU")
            return second
        first.notes.insert(0, f"does not fit, not even with the base params offloaded ({ZERO3_OFFLOAD}: {second.peak_bytes / GiB:.2f} GiB)")
        if not grad_ckpt:
            first.notes.append("try --grad_checkpointing")
        first.notes.append("or a smaller --micro_batch_size / --max_length, or more GPUs")
        return first

    shape = load_shape(model)
    layout = layout or AdapterLayout(stage=stage)
    layout.stage = stage
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if min(nodes, gpus_per_node, micro_batch, seq_len) < 1:
        raise ConfigError("nodes, gpus-per-node, micro-batch and seq-len must be >= 1")
    p = DTYPE_BYTES[dtype]
    world = nodes * gpus_per_node
    z = _zero3_settings(ds_config)
    counts = base_counts(shape, z["persistence_threshold"])
    adapters = layout.counts(shape)
    step = step or StepOptions()
    tokens = step.tokens(micro_batch, seq_len)
    act_layers = activation_bytes(shape, layout, p, tokens, grad_ckpt, step.adapter_bytes(p))
    act_loss = step.loss_bytes(shape, tokens, p)

    shard = counts["total"] * p // world
    hpz = (gpus_per_node if nodes > 1 else 1) if z["hpz"] == "auto" else int(z["hpz"])
    reused = min(counts["total"], z["max_reuse_distance"] / 2)
    prefetch = min(z["prefetch_bucket"], max(0.0, z["max_live"] - reused))
    gathered = int((counts["largest_module"] + prefetch + reused) * p)
    gpu = {
        "base_shard": 0 if z["offload_param"] else shard,
        "base_node_shard": counts["total"] * p // hpz if hpz > 1 else 0,  # hpZ's secondary shard, over the node's ranks
        "persistent": counts["persistent"] * p - counts["persistent"] * p // world,  # whole, less the shard already counted
        "adapters": ADAPTER_BYTES * adapters["total"],
        "adapter_grads": ADAPTER_BYTES * adapters["trainable"],
        "optimizer": 2 * ADAPTER_BYTES * adapters["trainable"],
        "activations_layers": act_layers,
        "activations_loss": act_loss,
        "gathered": gathered,
        "reserve": int(reserve_gib * GiB),
    }
    states = sum(gpu[k] for k in ("base_shard", "base_node_shard", "persistent", "adapters", "adapter_grads", "optimizer", "reserve"))
    flat_allreduce = ADAPTER_BYTES * adapters["trainable"] if world > 1 else 0
    gpu["peak"] = states + max(act_layers + act_loss + gathered, flat_allreduce)
    notes = [
        "the adapters' AdamW is a torch optimizer outside DeepSpeed: DeepSpeed's optimizer offload would move "
        "nothing, so zero3_offload.json offloads the base params only and the adapter states stay on the GPU",
    ]
    return Plan(
        model=shape.name, stage=stage, world=world, nodes=nodes, gpu_memory_gib=gpu_memory_gib, ds_config=str(ds_config),
        offload_param=bool(z["offload_param"]), tokens_per_micro_batch=tokens, grad_ckpt=grad_ckpt,
        params=counts, adapter_params=adapters, gpu_bytes=gpu,
        cpu_bytes_per_node=shard * gpus_per_node if z["offload_param"] else 0, notes=notes,
    )
