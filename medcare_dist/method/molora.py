"""The mixture of LoRA experts on one FFN projection (MedCare stage 1).

`MoLoRA`: the shared Knowledge Aggregator (always on) plus the routed Noise Aggregator (a linear
router with bias, softmax, top-k, renormalised weights); `load_balancing_loss`, the optional
Switch-style balance term. Stage 2 keeps only the Knowledge Aggregator (`MoLoRA.knowledge_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from medcare_dist.adapters.adapter_set import lora_pairs
from medcare_dist.config import choices
from medcare_dist.errors import ConfigError
from medcare_dist.adapters.lora import init_lora_a


def resolve_routed_compute(name: str, device: torch.device) -> str:
    """`routed_compute` -> the path taken on `device`: auto is fused on CUDA when Triton is
    importable, dense otherwise (fused is unmeasured on GPUs: docs/benchmarks.md)."""
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "fused" and not has_triton:
        raise ConfigError("routed_compute 'fused' needs Triton (pip install triton, or the triton extra); use dense or auto")
    if name == "fused" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"routed_compute 'fused' runs on CUDA (or under TRITON_INTERPRET=1), not {device.type}; use dense or auto")
    if name != "auto":
        return name
    return "fused" if device.type == "cuda" and has_triton else "dense"


@dataclass
class Routing:
    """What the router decided for a batch of tokens (for logging and the aux loss)."""

    probs: torch.Tensor  # [tokens, E] softmax over all experts
    top_idx: torch.Tensor  # [tokens, k]


class _ExpertsDown(torch.autograd.Function):
    """h = x[rows_e] @ A_e^T for each routed expert e on its own rows, groups in expert order.

    x [T, d_in]; weight [E*r, d_in] (expert e owns rows e*r..(e+1)*r); rows [T*k]: the token
    of each assignment, grouped by expert; counts: the group sizes. Returns [T*k, r].
    Plain autograd would keep the gathered x[rows] (k times the input) for the weight
    gradient; this keeps x only (which the shared expert keeps anyway) and gathers again in
    backward, one expert at a time.
    """

    @staticmethod
    def forward(ctx, x, weight, rows, counts):
        ctx.save_for_backward(x, weight, rows)
        ctx.counts = counts
        experts = weight.split(weight.shape[0] // len(counts))
        return torch.cat([x.index_select(0, idx) @ a.T for idx, a in zip(rows.split(counts), experts)])

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, rows = ctx.saved_tensors
        experts = weight.split(weight.shape[0] // len(ctx.counts))
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_a = []
        for idx, a, g in zip(rows.split(ctx.counts), experts, grad_h.split(ctx.counts)):
            if grad_x is not None:
                grad_x.index_add_(0, idx, g @ a)  # a token appears at most once per expert
            grad_a.append(g.T @ x.index_select(0, idx))  # idle expert: [r, 0] @ [0, d_in] = zeros
        return grad_x, torch.cat(grad_a) if ctx.needs_input_grad[1] else None, None, None


class _ExpertsUp(torch.autograd.Function):
    """out = h_ka @ B_ka^T, then out[rows_e] += h_e @ B_e^T for each routed expert e.

    h_ka [T, r_ka]; b_ka [d_out, r_ka]; h [T*k, r] grouped by expert as `_ExpertsDown` makes
    it; weight [d_out, E*r]. The [T*k, d_out] per-assignment outputs never exist at once:
    each expert adds its rows into the output and its temporary is freed. The experts add in
    a fixed order and a token appears at most once per expert, so the result is the same on
    every run, on GPU too.
    """

    @staticmethod
    def forward(ctx, h_ka, b_ka, h, weight, rows, counts):
        ctx.save_for_backward(h_ka, b_ka, h, weight, rows)
        ctx.counts = counts
        out = h_ka @ b_ka.T
        experts = weight.split(weight.shape[1] // len(counts), dim=1)
        for idx, b, hg in zip(rows.split(counts), experts, h.split(counts)):
            out.index_add_(0, idx, hg @ b.T)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h_ka, b_ka, h, weight, rows = ctx.saved_tensors
        experts = weight.split(weight.shape[1] // len(ctx.counts), dim=1)
        grad_h, grad_b = [], []
        for idx, b, hg in zip(rows.split(ctx.counts), experts, h.split(ctx.counts)):
            g = grad_out.index_select(0, idx)
            grad_h.append(g @ b)
            grad_b.append(g.T @ hg)  # idle expert: [d_out, 0] @ [0, r] = zeros
        return grad_out @ b_ka, grad_out.T @ h_ka, torch.cat(grad_h), torch.cat(grad_b, dim=1), None, None


class MoLoRA(nn.Module):
    """Mixture of LoRA experts on one FFN projection (MedCare stage 1).

    output = scale * (B_ka A_ka x + sum_{e in topk(x)} w_e B_e A_e x)

    The shared Knowledge Aggregator (KA) is always on with weight 1; the Noise Aggregator
    (NA) holds `num_experts` routed experts, a linear router with bias, softmax, top-k and
    top-k weights renormalised to sum to 1. No [tokens, E, d_out] tensor is ever built.

    Two ways to compute the routed experts, same outputs and gradients (`routed_compute`):

    - "dense" (default): one GEMM projects x into the concatenated A's of all experts
      ([tokens, r_ka + E*r]), each expert's r columns are multiplied by its gate weight
      (zero when not selected), one GEMM maps back through the concatenated B's.
    - "sparse": the token-expert assignments are sorted by expert and each expert
      multiplies only its own tokens (k/E of the dense routed FLOPs, and fewer bytes kept
      for backward); each token's k results are added back, expert by expert, in a fixed
      order. An expert that gets no token runs on an empty group: its gradient is a zero
      block, never None. Reading the group sizes costs one device-to-host sync per call on
      GPU.

    Measured (docs/benchmarks.md): on a 2-core CPU the two take the same time at the Qwen1.5
    FFN shapes (the sparse path's rank-16 products are memory-bound, and its per-token adds
    cost what the saved FLOPs gain); on an H200 the sparse path is 1.4-2.5x slower than the
    dense one (many small kernels and the host sync). Dense is the default.

    The shared expert is always computed densely. Routing is a pure function of the input
    (no noise, no sampling; ties broken by `topk`, expert groups by a stable sort), so
    gradient checkpointing's recompute selects the same experts.
    """

    KNOWLEDGE_PAIR = ("ka_A", "ka_B")  # the Knowledge Aggregator's parameter names: (A, B)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int,
        shared_rank: int,
        num_experts: int,
        top_k: int,
        scale: float,
        dropout: float = 0.0,
        routed_compute: str = "dense",
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if routed_compute not in choices("routed_compute"):
            raise ValueError(f"routed_compute must be one of {', '.join(choices('routed_compute'))}, got {routed_compute!r}")
        self.rank, self.shared_rank = rank, shared_rank
        self.num_experts, self.top_k, self.scale = num_experts, top_k, scale
        self.routed_compute = routed_compute
        # Knowledge Aggregator: the shared experts fused into one LoRA of rank shared_rank.
        self.ka_A = nn.Parameter(torch.empty(shared_rank, d_in))
        self.ka_B = nn.Parameter(torch.zeros(d_out, shared_rank))
        # Noise Aggregator: expert e owns rows [e*r, (e+1)*r) of na_A and columns of na_B.
        self.na_A = nn.Parameter(torch.empty(num_experts * rank, d_in))
        self.na_B = nn.Parameter(torch.zeros(d_out, num_experts * rank))
        self.router = nn.Linear(d_in, num_experts, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_lora_a(self.ka_A)
        for e in range(num_experts):
            init_lora_a(self.na_A.data[e * rank:(e + 1) * rank])
        self.last_routing: Routing | None = None

    def _top_k(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Renormalised top-k weights [tokens, k] (fp32) and the routing decision."""
        probs = F.softmax(F.linear(x, self.router.weight.to(x.dtype), self.router.bias.to(x.dtype)).float(), dim=-1)
        top_w, top_idx = probs.topk(self.top_k, dim=-1)
        return top_w / top_w.sum(dim=-1, keepdim=True), Routing(probs=probs, top_idx=top_idx)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Gate weights [tokens, E]: renormalised top-k softmax, zero elsewhere."""
        top_w, routing = self._top_k(x)
        return torch.zeros_like(routing.probs).scatter(-1, routing.top_idx, top_w), routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        xd = self.dropout(x)
        mode = resolve_routed_compute(self.routed_compute, x.device)
        if mode == "fused":
            from medcare_dist.method.molora_triton import FusedRoutedExperts

            top_w, self.last_routing = self._top_k(x)
            shared = F.linear(F.linear(xd, self.ka_A.to(x.dtype)) * self.scale, self.ka_B.to(x.dtype))
            routed = FusedRoutedExperts.apply(xd, self.na_A.to(x.dtype), self.na_B.to(x.dtype), top_w * self.scale,
                                              self.last_routing.top_idx, self.num_experts)
            out = shared + routed
        elif mode == "dense":
            gates, self.last_routing = self.route(x)
            h = F.linear(xd, torch.cat([self.ka_A, self.na_A]).to(x.dtype)) * self.scale  # scaled in rank space: cheap
            ka_h, na_h = h.split([self.shared_rank, self.num_experts * self.rank], dim=-1)
            na_h = na_h * gates.to(h.dtype).repeat_interleave(self.rank, dim=-1)
            out = F.linear(torch.cat([ka_h, na_h], dim=-1), torch.cat([self.ka_B, self.na_B], dim=-1).to(x.dtype))
        else:
            top_w, self.last_routing = self._top_k(x)
            out = self._sparse(xd, top_w, self.last_routing.top_idx)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _sparse(self, x: torch.Tensor, top_w: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """scale * (B_ka A_ka x + sum_{e in topk} w_e B_e A_e x), each routed expert on its own tokens."""
        expert_of = top_idx.reshape(-1)  # assignment i: token i // k, slot i % k
        grouped = torch.argsort(expert_of, stable=True)  # assignments grouped by expert, fixed order
        counts = torch.bincount(expert_of, minlength=self.num_experts).tolist()
        rows = grouped // self.top_k
        dtype = x.dtype
        h = _ExpertsDown.apply(x, self.na_A.to(dtype), rows, counts)  # [T*k, r]
        h = h * (top_w.reshape(-1)[grouped] * self.scale).to(dtype).unsqueeze(-1)
        ka_h = F.linear(x, self.ka_A.to(dtype)) * self.scale
        return _ExpertsUp.apply(ka_h, self.ka_B.to(dtype), h, self.na_B.to(dtype), rows, counts)

    @classmethod
    def knowledge_pairs(cls, tensors: dict[str, torch.Tensor], group: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{target: (A, B)} of the Knowledge Aggregators in flat adapter tensors: the part of
        each layer that stage 2 keeps (a LoRA of rank shared_rank, same scale)."""
        return lora_pairs(tensors, group, *cls.KNOWLEDGE_PAIR)


def load_balancing_loss(routing: Routing, num_experts: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-Transformer style balance loss: E * sum_e (fraction routed to e) * (mean prob of e).

    Equals 1 for perfectly uniform routing and grows as the router collapses onto few experts.
    """
    probs, top_idx = routing.probs, routing.top_idx
    if token_mask is not None:
        probs, top_idx = probs[token_mask], top_idx[token_mask]
    if probs.shape[0] == 0:
        return probs.sum()
    assigned = F.one_hot(top_idx, num_experts).sum(dim=1).float()  # [tokens, E]
    fraction = assigned.mean(dim=0) / top_idx.shape[-1]
    return num_experts * (fraction * probs.mean(dim=0)).sum()
