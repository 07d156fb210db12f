"""LoRA, the adapter layer both stages use (stage 1's mixture of LoRA experts: stage1.py).

Each adapter computes only the *delta* of one frozen Linear: `y = W x + adapter(x)`.
They are plain torch modules with no knowledge of DeepSpeed; `AdapterSet.attach`
(adapter_set.py) hooks them onto the base model.

Weights follow PEFT's layout: `lora_A` is [r, d_in], `lora_B` is [d_out, r], so a LoRA
delta is `scale * B @ A` and merging into the base is `W += scale * B @ A`.

Precision: the weights are fp32 masters; every matmul runs in the dtype of its input `x`
(each weight is cast to it on the way in, and its gradient flows back into the fp32 master).
Which dtype that is is decided by whoever calls the adapter (`AdapterSet.attach`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def init_lora_a(weight: torch.Tensor) -> None:
    # Same as PEFT / nn.Linear default init; B starts at zero so the delta starts at zero.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def merge_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """weight += scale * B @ A, in place, in weight's dtype (callers merge in fp32)."""
    return weight.addmm_(b.to(weight.dtype), a.to(weight.dtype), alpha=scale)


class LoRA(nn.Module):
    """One low-rank delta: scale * B(A(dropout(x)))."""

    PAIR = ("lora_A", "lora_B")  # its parameter names: (A, B)

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_lora_a(self.lora_A)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The [d_out, d_in] matrix this adapter adds to the base weight."""
        return merge_delta(torch.zeros_like(self.lora_B @ self.lora_A), self.lora_A, self.lora_B, self.scale)

    def load_pair(self, a: torch.Tensor, b: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)

    @classmethod
    def pairs(cls, tensors: dict[str, torch.Tensor], group: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{target: (A, B)} of one group of LoRAs in flat adapter tensors (AdapterSet.flat_state_dict)."""
        from medcare_dist.adapters.adapter_set import lora_pairs

        return lora_pairs(tensors, group, *cls.PAIR)
