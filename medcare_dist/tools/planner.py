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
  activations     per token and per decoder layer, what autograd keeps for backward with a
                  frozen base, SDPA attention (flash / memory-efficient: no [seq, seq] scores),
                  HF's Qwen2 code and our adapter hooks (which cast the input to the adapters'
                  fp32, one copy per adapter):
                    RMSNorm x2:           fp32 input, 4h each
                    attention:            q, k, v, output in the base dtype, fp32 log-sum-exp
                    SwiGLU:               gate, up and silu(gate) in the base dtype
                    per adapted Linear:   its fp32 input copy (4 bytes x d_in), dropped when
                                          dropout > 0, plus the dropout mask (1 byte on GPU);
                                          a MoLoRA with dropout also keeps the undropped copy
                                          for its router; a frozen knowledge adapter keeps
                                          only the mask
                    rank-space:           fp32 A x per LoRA; per MoLoRA its rank-space tensors,
                                          gates and int64 indices (which depend on
                                          --routed_compute), and for the dense one a copy of
                                          its concatenated A's and B's per layer
                  plus, at the loss, (base bytes + 4 + 4 + 4) x vocab per token: the logits,
                  their fp32 copy, the kept log-softmax and its gradient.
                  With --grad_checkpointing (non-reentrant, per decoder layer): each layer keeps only its
                  input (base bytes x h per token), and one layer's full set is live again
                  while it is recomputed in backward.
                  tests/tools/test_planner.py checks the per-layer figure against the bytes that
                  autograd actually saves on a small Qwen2 with the real adapters attached.
  reserve         --reserve GiB for the CUDA context, NCCL buffers and allocator fragmentation.

peak = model states + max(activations + gathered params, the flat all-reduce buffer of the
adapter gradients). What does not fit with ds_configs/zero3.json is tried again with the base
shard offloaded to CPU (ds_configs/zero3_offload.json); the pinned CPU memory that takes per
node is shown.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medcare_dist.errors import ConfigError, InputNotFoundError
from medcare_dist.resources import resolve_ds_config

GiB = 2**30
ZERO3 = "zero3"
ZERO3_OFFLOAD = "zero3_offload"
ZERO3_NODE_LOCAL = "zero3_node_local"  # several nodes: the base's gathers stay inside each node
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ADAPTER_BYTES = 4  # adapters, their gradients and AdamW states are fp32


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = True  # Qwen2: q, k, v projections have a bias, o does not

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def attn_linears(self) -> dict[str, tuple[int, int]]:
        """name -> (d_in, d_out) of the attention projections of one layer."""
        h = self.hidden
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim), "o_proj": (self.q_dim, h)}

    def ffn_linears(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden, self.intermediate
        return {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# Qwen1.5 shapes as published in each model's config.json (Qwen2ForCausalLM).
BUILTIN = {
    "qwen1.5-1.8b": ModelShape("Qwen1.5-1.8B", 2048, 5504, 24, 16, 16, 151936),
    "qwen1.5-7b": ModelShape("Qwen1.5-7B", 4096, 11008, 32, 32, 32, 151936),
    "qwen1.5-14b": ModelShape("Qwen1.5-14B", 5120, 13696, 40, 40, 40, 152064),
}


def _builtin_key(name: str) -> str | None:
    key = name.strip().lower().removeprefix("qwen/").removesuffix("-chat")
    if key in BUILTIN:
        return key
    return f"qwen1.5-{key}" if f"qwen1.5-{key}" in BUILTIN else None


def load_shape(name_or_path: str) -> ModelShape:
    """A built-in name (`Qwen1.5-7B`, `Qwen/Qwen1.5-7B-Chat`, `7B`), a config.json, or a model
    directory holding one. A local path wins over a built-in name."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        heads = cfg["num_attention_heads"]
        return ModelShape(
            name=str(name_or_path),
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            vocab=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim") or 0,
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type", "qwen2").startswith("qwen2"))),
        )
    key = _builtin_key(name_or_path)
    if key is None:
        raise InputNotFoundError(f"{name_or_path!r} is neither a config.json / model dir nor a built-in model ({', '.join(s.name for s in BUILTIN.values())})")
    return BUILTIN[key]


# --- parameter counts ------------------------------------------------------------------

def base_params(shape: ModelShape) -> list[tuple[str, int]]:
    """(module, numel of each of its own params) for every module with params, in model order:
    what DeepSpeed gathers one module at a time."""
    h, V = shape.hidden, shape.vocab
    out = [("embed_tokens", [V * h])]
    for layer in range(shape.layers):
        for name, (d_in, d_out) in shape.attn_linears().items():
            bias = shape.qkv_bias and name != "o_proj"
            out.append((f"layers.{layer}.{name}", [d_in * d_out] + ([d_out] if bias else [])))
        for name, (d_in, d_out) in shape.ffn_linears().items():
            out.append((f"layers.{layer}.{name}", [d_in * d_out]))
        out += [(f"layers.{layer}.input_layernorm", [h]), (f"layers.{layer}.post_attention_layernorm", [h])]
    out.append(("norm", [h]))
    if not shape.tie_word_embeddings:
        out.append(("lm_head", [V * h]))
    return out


def base_counts(shape: ModelShape, persistence_threshold: float = 0) -> dict[str, int]:
    """total params, the largest module's params, and the params below the persistence threshold."""
    modules = base_params(shape)
    return {
        "total": sum(sum(ps) for _, ps in modules),
        "largest_module": max(sum(ps) for _, ps in modules),
        "persistent": sum(n for _, ps in modules for n in ps if n < persistence_threshold),
    }


def lora_params(d_in: int, d_out: int, rank: int) -> int:
    return rank * (d_in + d_out)


@dataclass
class AdapterLayout:
    stage: int = 1
    lora_r: int = 16
    num_experts: int = 8
    top_k: int = 2
    num_shared: int = 2
    lora_dropout: float = 0.05
    freeze_knowledge: bool = False  # stage 2
    align_attention: bool = False  # stage 2
    routed_compute: str = "dense"  # stage 1: MoLoRA's routed_compute (what autograd keeps differs)

    def counts(self, shape: ModelShape) -> dict[str, int]:
        """Adapter params of the whole model: trainable and frozen."""
        r, rs, E = self.lora_r, self.lora_r * self.num_shared, self.num_experts
        trainable = frozen = 0
        for _ in range(shape.layers):
            if self.stage == 1:
                trainable += sum(lora_params(i, o, r) for i, o in shape.attn_linears().values())
                for d_in, d_out in shape.ffn_linears().values():
                    trainable += lora_params(d_in, d_out, rs) + E * lora_params(d_in, d_out, r) + d_in * E + E
            else:
                for d_in, d_out in shape.ffn_linears().values():
                    know = lora_params(d_in, d_out, rs)
                    frozen += know if self.freeze_knowledge else 0
                    trainable += lora_params(d_in, d_out, rs) + (0 if self.freeze_knowledge else know)
                if self.align_attention:
                    trainable += sum(lora_params(i, o, rs) for i, o in shape.attn_linears().values())
        return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}


# --- activations -----------------------------------------------------------------------

def activation_bytes_per_token_layer(shape: ModelShape, layout: AdapterLayout, dtype_bytes: int, dropout_mask_bytes: int = 1) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring).

    `dropout_mask_bytes`: 1 on GPU (the fused dropout keeps a bool mask); CPU's dropout keeps
    a float noise tensor instead (4 bytes for the fp32 adapters)."""
    h, i, p = shape.hidden, shape.intermediate, dtype_bytes
    total = 2 * 4 * h  # two RMSNorms keep their fp32 input
    total += p * (shape.q_dim + 2 * shape.kv_dim + shape.q_dim) + 4 * shape.heads  # SDPA: q, k, v, out, lse
    total += 3 * p * i  # SwiGLU: gate, up, silu(gate)
    mask = dropout_mask_bytes if layout.lora_dropout > 0 else 0
    lora_in = 4 + mask  # the (dropped) fp32 input copy and the dropout mask
    molora_in = 4 + (4 + mask if mask else 0)  # + the router's undropped copy when they differ
    r, rs, E, k = layout.lora_r, layout.lora_r * layout.num_shared, layout.num_experts, layout.top_k
    lora_rank = lambda rank: 4 * rank  # noqa: E731  A x, kept for B's gradient
    if layout.routed_compute == "sparse":
        # shared A x; the routed [k*r] before and after gating; probs; top-k weights (three
        # forms) and their sum; top-k ids and the two grouping indices (int64)
        molora_rank = 4 * (rs + 2 * k * r + E + 3 * k + 1) + 8 * 3 * k
    else:
        # [r_ka + E*r] after A and again gated, the repeated gates [E*r]; probs; top-k
        # weights and their sum; top-k ids (int64)
        molora_rank = 4 * (2 * (rs + E * r) + E * r + E + k + 1) + 8 * k
    attn_in = [d_in for d_in, _ in shape.attn_linears().values()]
    ffn_in = [d_in for d_in, _ in shape.ffn_linears().values()]
    if layout.stage == 1:
        total += sum(lora_in * d + lora_rank(r) for d in attn_in)
        total += sum(molora_in * d + molora_rank for d in ffn_in)
    else:
        # a frozen knowledge adapter keeps only its dropout mask: no weight gradient to compute
        know = [mask * d if layout.freeze_knowledge else lora_in * d + lora_rank(rs) for d in ffn_in]
        total += sum(know) + sum(lora_in * d + lora_rank(rs) for d in ffn_in)
        if layout.align_attention:
            total += sum(lora_in * d + lora_rank(rs) for d in attn_in)
    return total


def activation_bytes_per_layer_fixed(shape: ModelShape, layout: AdapterLayout) -> int:
    """Bytes per decoder layer and micro-batch whatever the token count: the dense MoLoRA
    keeps its concatenated fp32 A's and B's ([r_ka + E*r] x (d_in + d_out)) for backward."""
    if layout.stage != 1 or layout.routed_compute != "dense":
        return 0
    width = layout.lora_r * layout.num_shared + layout.num_experts * layout.lora_r
    return sum(4 * width * (d_in + d_out) for d_in, d_out in shape.ffn_linears().values())


def activation_bytes(shape: ModelShape, layout: AdapterLayout, dtype_bytes: int, tokens: int, grad_ckpt: bool) -> dict[str, int]:
    per_layer = activation_bytes_per_token_layer(shape, layout, dtype_bytes) * tokens + activation_bytes_per_layer_fixed(shape, layout)
    layers = shape.layers * dtype_bytes * shape.hidden * tokens + per_layer if grad_ckpt else shape.layers * per_layer
    logits = (dtype_bytes + 4 + 4 + 4 if dtype_bytes != 4 else 12) * shape.vocab * tokens
    return {"layers": layers, "logits": logits, "total": layers + logits}


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
            f"  activations: logits at the loss  {gib(g['activations_logits'])}",
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
) -> Plan:
    """The memory plan of one configuration. With `ds_config=None` the ZeRO-3 config is
    chosen: on several nodes ds_configs/zero3_node_local.json when it fits, else
    ds_configs/zero3.json when it fits, else the CPU-offload one."""
    if ds_config is None:
        args = (model, stage, nodes, gpus_per_node, gpu_memory_gib, micro_batch, seq_len, grad_ckpt, dtype, layout, reserve_gib)
        local = plan(*args, ZERO3_NODE_LOCAL) if nodes > 1 else None
        if local is not None and local.fits:
            local.notes.insert(0, "node-local sharding: the base's all-gathers stay inside each node, only the adapter gradients cross nodes")
            return local
        first = plan(*args, ZERO3)
        if local is not None:
            first.notes.insert(0, f"does not fit with {ZERO3_NODE_LOCAL} ({local.peak_bytes / GiB:.2f} GiB): the base is gathered across nodes")
        if first.fits:
            return first
        second = plan(*args, ZERO3_OFFLOAD)
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
    tokens = micro_batch * seq_len
    act = activation_bytes(shape, layout, p, tokens, grad_ckpt)

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
        "activations_layers": act["layers"],
        "activations_logits": act["logits"],
        "gathered": gathered,
        "reserve": int(reserve_gib * GiB),
    }
    states = sum(gpu[k] for k in ("base_shard", "base_node_shard", "persistent", "adapters", "adapter_grads", "optimizer", "reserve"))
    flat_allreduce = ADAPTER_BYTES * adapters["trainable"] if world > 1 else 0
    gpu["peak"] = states + max(act["total"] + gathered, flat_allreduce)
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
