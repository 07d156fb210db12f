"""The two loss terms of MedCare, as plain functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapter_set import AdapterSet


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross entropy over the labelled positions."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def orthogonal_penalty(adapters: AdapterSet) -> torch.Tensor:
    """sum over projections with both adapters of sum(|A_know @ A_align^T|).

    A local expression on this rank's full copies of the adapters: no collective in the
    forward or the backward, and an exact gradient (the adapters are never ZeRO-partitioned).
    """
    knowledge = {target: a for _, target, a in adapters.items("knowledge")}
    terms = [(knowledge[t].lora_A @ a.lora_A.T).abs().sum() for _, t, a in adapters.items("alignment") if t in knowledge]
    return torch.stack(terms).sum()
