"""Adapter layers: LoRA and the MedCare mixture of LoRA experts.

Each adapter computes only the *delta* of one frozen Linear: `y = W x + adapter(x)`.
They are plain torch modules with no knowledge of DeepSpeed; `medcare_dist.attach`
hooks them onto the base model.

Weights follow PEFT's layout: `lora_A` is [r, d_in], `lora_B` is [d_out, r], so a LoRA
delta is `scale * B @ A` and merging into the base is `W += scale * B @ A`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _init_lora_a(weight: torch.Tensor) -> None:
    # Same as PEFT / nn.Linear default init; B starts at zero so the delta starts at zero.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LoRA(nn.Module):
    """One low-rank delta: scale * B(A(dropout(x)))."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _init_lora_a(self.lora_A)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The [d_out, d_in] matrix this adapter adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale


@dataclass
class Routing:
    """What the router decided for a batch of tokens (for logging and the aux loss)."""

    probs: torch.Tensor  # [tokens, E] softmax over all experts
    top_idx: torch.Tensor  # [tokens, k]


class MoLoRA(nn.Module):
    """Mixture of LoRA experts on one FFN projection (MedCare stage 1).

    output = scale * (B_ka A_ka x + sum_{e in topk(x)} w_e B_e A_e x)

    The shared Knowledge Aggregator (KA) is always on with weight 1; the Noise Aggregator
    (NA) holds `num_experts` routed experts, a linear router with bias, softmax, top-k and
    top-k weights renormalised to sum to 1.

    Computed in rank space: one GEMM projects x into the concatenated A's of all experts
    ([tokens, r_ka + E*r]); each routed expert's r columns are multiplied by its gate
    weight (zero when not selected); one GEMM maps back through the concatenated B's. No
    [tokens, E, d_out] tensor is ever built, and the extra cost is two thin GEMMs.
    Routing is a pure function of the input (no noise, no sampling), so gradient
    checkpointing's recompute selects the same experts.
    """

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
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.rank, self.shared_rank = rank, shared_rank
        self.num_experts, self.top_k, self.scale = num_experts, top_k, scale
        # Knowledge Aggregator: the shared experts fused into one LoRA of rank shared_rank.
        self.ka_A = nn.Parameter(torch.empty(shared_rank, d_in))
        self.ka_B = nn.Parameter(torch.zeros(d_out, shared_rank))
        # Noise Aggregator: expert e owns rows [e*r, (e+1)*r) of na_A and columns of na_B.
        self.na_A = nn.Parameter(torch.empty(num_experts * rank, d_in))
        self.na_B = nn.Parameter(torch.zeros(d_out, num_experts * rank))
        self.router = nn.Linear(d_in, num_experts, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _init_lora_a(self.ka_A)
        for e in range(num_experts):
            _init_lora_a(self.na_A.data[e * rank:(e + 1) * rank])
        self.last_routing: Routing | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Gate weights [tokens, E]: renormalised top-k softmax, zero elsewhere."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_w, top_idx = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_w)
        return gates, Routing(probs=probs, top_idx=top_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, self.last_routing = self.route(x)
        h = F.linear(self.dropout(x), torch.cat([self.ka_A, self.na_A]))
        ka_h, na_h = h.split([self.shared_rank, self.num_experts * self.rank], dim=-1)
        na_h = na_h * gates.to(h.dtype).repeat_interleave(self.rank, dim=-1)
        out = F.linear(torch.cat([ka_h, na_h], dim=-1), torch.cat([self.ka_B, self.na_B], dim=-1))
        return (out * self.scale).reshape(*shape[:-1], -1)

    def knowledge_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the Knowledge Aggregator, the part of this layer stage 2 keeps."""
        return self.ka_A, self.ka_B


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
