"""What a Qwen2-style model and its MedCare adapters hold: parameter counts from shapes, and the
bytes one micro-batch keeps for backward (the per-layer activations and the loss's working set),
per training option. `planner.py` adds ZeRO-3's partitioning and the fit decision."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from medcare_dist.adapters.adapter_set import adapter_compute_dtype
from medcare_dist.data.batching import row_tokens
from medcare_dist.method.molora import resolve_routed_compute
from medcare_dist.errors import InputNotFoundError
from medcare_dist.training.lm_loss import loss_working_bytes


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

    @property
    def routed_path(self) -> str:
        """The path a CUDA GPU takes (the plan is for one): auto is fused where Triton is importable."""
        return resolve_routed_compute(self.routed_compute, torch.device("cuda"))

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

def _adapters_per_linear(shape: ModelShape, layout: AdapterLayout) -> list[tuple[int, bool, list[tuple[int, list[str]]]]]:
    """The adapted Linears of one decoder layer, grouped by the input tensor they share:
    [(d_in, kept by the base, [(d_out, [adapter kinds on that Linear])])]; kinds: "lora",
    "frozen", "mixture". o_proj's input is the attention output, which SDPA keeps anyway (its
    [batch, seq, heads, head_dim] layout makes the reshape a view)."""
    h, i = shape.hidden, shape.intermediate
    attn = [(h, False, ["q_proj", "k_proj", "v_proj"]), (shape.q_dim, True, ["o_proj"])]
    ffn = [(h, False, ["gate_proj", "up_proj"]), (i, False, ["down_proj"])]
    outs = {**{n: o for n, (_, o) in shape.attn_linears().items()}, **{n: o for n, (_, o) in shape.ffn_linears().items()}}
    if layout.stage == 1:
        kinds = {"attn": ["lora"], "ffn": ["mixture"]}
    else:
        kinds = {"attn": ["lora"] if layout.align_attention else [], "ffn": ["frozen" if layout.freeze_knowledge else "lora", "lora"]}
    groups = [(d, kept, [(outs[n], kinds["attn"]) for n in names]) for d, kept, names in attn]
    groups += [(d, kept, [(outs[n], kinds["ffn"]) for n in names]) for d, kept, names in ffn]
    return [group for group in groups if any(kinds for _, kinds in group[2])]


def activation_bytes_per_token_layer(shape: ModelShape, layout: AdapterLayout, dtype_bytes: int, adapter_bytes: int = 4,
                                     cpu_dropout: bool = False) -> int:
    """Bytes autograd keeps per token for one decoder layer (see planner.py's docstring).

    adapter_bytes: the adapters' matmul dtype (`adapter_dtype`, adapters.adapter_set.
    adapter_compute_dtype); when it equals the base dtype the hook's cast is a no-op and the
    adapters read the base Linear's own input (one tensor shared by the Linears that read it),
    else each adapted Linear makes its own copy. cpu_dropout: CPU's dropout keeps a noise
    tensor in the input dtype where the GPU keeps a 1-byte mask."""
    h, i, p, a = shape.hidden, shape.intermediate, dtype_bytes, adapter_bytes
    total = 2 * 4 * h  # two RMSNorms keep their fp32 input
    total += p * (shape.q_dim + 2 * shape.kv_dim + shape.q_dim) + 4 * shape.heads  # SDPA: q, k, v, out, lse
    total += 3 * p * i  # SwiGLU: gate, up, silu(gate)
    dropout = layout.lora_dropout > 0
    mask = (a if cpu_dropout else 1) if dropout else 0
    r, rs, E, k = layout.lora_r, layout.lora_r * layout.num_shared, layout.num_experts, layout.top_k
    shared_input = a == p  # the cast is a no-op: the adapters keep the base Linear's input itself
    for d_in, kept_by_base, linears in _adapters_per_linear(shape, layout):
        keeps_input = []
        for _, kinds in linears:
            # the undropped input is kept by a trainable LoRA without dropout and by every router
            keeps_input.append(any(kind == "mixture" or kind == "lora" and not dropout for kind in kinds))
            for kind in kinds:
                if kind == "frozen":
                    total += mask * d_in  # no weight gradient: only the dropout mask
                    continue
                total += (a + mask) * d_in if dropout else 0  # the dropped copy and its mask
                if kind == "lora":
                    total += a * (rs if layout.stage == 2 else r)  # A x, kept for B's gradient
                else:
                    total += _molora_rank_bytes(layout.routed_path, a, r, rs, E, k)
        total += a * d_in * ((any(keeps_input) and not kept_by_base) if shared_input else sum(keeps_input))
    return total


def _molora_rank_bytes(routed_compute: str, a: int, r: int, rs: int, E: int, k: int) -> int:
    """Per token, one MoLoRA's rank-space tensors (adapter dtype), fp32 router outputs and int64 ids."""
    if routed_compute == "fused":
        # shared A x; the fp32 rank-space h [k*r] and gates [k]; probs, top-k weights and their
        # sum; top-k ids (int64) and the kernels' two int32 indices
        return a * rs + 4 * (k * r + E + 2 * k + 1) + 8 * k + 4 * 2 * k
    if routed_compute == "sparse":
        # shared A x; the routed [k*r] before and after gating and the gates; probs, top-k
        # weights (two forms) and their sum; top-k ids and the two grouping indices
        return a * (rs + 2 * k * r + k) + 4 * (E + 2 * k + 1) + 8 * 3 * k
    # [r_ka + E*r] after A and again gated, the repeated gates [E*r]; probs; top-k weights
    # and their sum; top-k ids
    return a * (2 * (rs + E * r) + E * r) + 4 * (E + k + 1) + 8 * k


def activation_bytes_per_layer_fixed(shape: ModelShape, layout: AdapterLayout, adapter_bytes: int = 4) -> int:
    """Bytes per decoder layer and micro-batch whatever the token count: the adapter weights
    as cast to the matmul dtype and kept for the input gradient (none for fp32 LoRA weights,
    which are used as they are), and the dense MoLoRA's concatenated A's and B's."""
    a, cast = adapter_bytes, adapter_bytes != ADAPTER_BYTES
    r, rs, E = layout.lora_r, layout.lora_r * layout.num_shared, layout.num_experts
    total = 0
    for d_in, _, linears in _adapters_per_linear(shape, layout):
        for d_out, kinds in linears:
            for kind in kinds:
                if kind == "mixture":
                    width = rs + E * r
                    dense = layout.routed_path == "dense"
                    total += a * width * (d_in + d_out) if dense or cast else 0
                    total += a * E * d_in if cast else 0  # the router's weight
                elif cast:
                    total += a * lora_params(d_in, d_out, rs if layout.stage == 2 else r)
    return total


def activation_bytes(shape: ModelShape, layout: AdapterLayout, dtype_bytes: int, tokens: int, grad_ckpt: bool,
                     adapter_bytes: int = 4) -> int:
    """Bytes the decoder layers keep for backward in one micro-batch of `tokens` tokens."""
    per_layer = (activation_bytes_per_token_layer(shape, layout, dtype_bytes, adapter_bytes) * tokens
                 + activation_bytes_per_layer_fixed(shape, layout, adapter_bytes))
    return shape.layers * dtype_bytes * shape.hidden * tokens + per_layer if grad_ckpt else shape.layers * per_layer


@dataclass
class StepOptions:
    """The training options that decide what one micro-batch allocates, by their training names."""

    lm_loss: str = "chunked"
    loss_chunk_tokens: int = 1024
    adapter_dtype: str = "auto"
    packing: str = "auto"
    pack_tokens: int = 0

    def tokens(self, micro_batch: int, max_length: int) -> int:
        """Tokens per micro-batch: its rows, each at most the trainer's row budget long."""
        return micro_batch * row_tokens(max_length, self.pack_tokens if self.packing != "off" else 0)

    def adapter_bytes(self, base_bytes: int) -> int:
        base = {2: torch.bfloat16, 4: torch.float32}[base_bytes]
        return torch.empty((), dtype=adapter_compute_dtype(self.adapter_dtype, base)).element_size()

    def loss_bytes(self, shape: ModelShape, tokens: int, base_bytes: int) -> int:
        """The loss's working set at its peak (training/lm_loss.loss_working_bytes)."""
        loss = loss_working_bytes(self.lm_loss, tokens, shape.vocab, shape.hidden, base_bytes, self.loss_chunk_tokens)
        return loss["kept"] + loss["transient"]
