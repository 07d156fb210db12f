"""Stage 2 of MedCare, clinical alignment: its adapters and its objective.

- `stage2_adapters`: on each FFN projection the knowledge adapter (initialised from the stage-1
  Knowledge Aggregator, `Knowledge`) and a new alignment adapter of the same rank and scale;
- `orthogonal_penalty` and `OrthogonalObjective`: loss = LM + lambda_1 * sum |A_know @ A_align^T|.

The penalty is a local autograd expression on this rank's full copy of the adapters (they are
never ZeRO-partitioned, adapters/adapter_set.py): no collective, exact gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medcare_dist.adapters.adapter_set import AdapterSet, linear_targets
from medcare_dist.adapters.lora import LoRA
from medcare_dist.config import TrainConfig
from medcare_dist.method.objective import Objective
KNOWLEDGE, ALIGNMENT = "knowledge", "alignment"  # adapter groups of a stage-2 model


@dataclass
class Knowledge:
    """The knowledge adapter stage 2 starts from: {target: (A [rank, d_in], B [d_out, rank])}."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    scale: float


def knowledge_adapters(model: torch.nn.Module, knowledge: Knowledge, dropout: float = 0.0, trainable: bool = True) -> AdapterSet:
    """The knowledge adapter alone, on the projections it was trained on (model order)."""
    adapters = AdapterSet()
    for path, linear in ((n, m) for n, m in model.named_modules() if n in knowledge.pairs):
        know = LoRA(linear.in_features, linear.out_features, knowledge.rank, knowledge.scale, dropout)
        know.load_pair(*knowledge.pairs[path])
        know.requires_grad_(trainable)
        adapters.add(KNOWLEDGE, path, know)
    return adapters


def stage2_adapters(model: torch.nn.Module, cfg: TrainConfig, knowledge: Knowledge) -> AdapterSet:
    """Knowledge adapter + a new alignment adapter of the same rank and scale on each FFN
    projection; alignment also on attention with `align_attention`."""
    adapters = knowledge_adapters(model, knowledge, cfg.lora_dropout, trainable=not cfg.freeze_knowledge)
    align_targets = linear_targets(model, cfg.ffn_targets) + (linear_targets(model, cfg.attn_targets) if cfg.align_attention else [])
    for path, linear in align_targets:
        adapters.add(ALIGNMENT, path, LoRA(linear.in_features, linear.out_features, knowledge.rank, knowledge.scale, cfg.lora_dropout))
    return adapters


def orthogonal_penalty(adapters: AdapterSet) -> torch.Tensor:
    """sum over projections with both adapters of sum(|A_know @ A_align^T|)."""
    knowledge = {target: a for _, target, a in adapters.items(KNOWLEDGE)}
    terms = [(knowledge[t].lora_A @ a.lora_A.T).abs().sum() for _, t, a in adapters.items(ALIGNMENT) if t in knowledge]
    return torch.stack(terms).sum()


def merge_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """What a stage-2 checkpoint merges into its base at export, from its flat adapter tensors:
    {target: [(A, B) of the knowledge adapter, (A, B) of the alignment adapter]} (one scale)."""
    deltas: dict[str, list] = {}
    for group in (KNOWLEDGE, ALIGNMENT):
        for target, pair in LoRA.pairs(tensors, group).items():
            deltas.setdefault(target, []).append(pair)
    return deltas


class OrthogonalObjective(Objective):
    def __init__(self, adapters: AdapterSet, ortho_lambda: float):
        self.adapters, self.ortho_lambda = adapters, ortho_lambda
        self._last = float("nan")

    def step_losses(self) -> dict[str, torch.Tensor]:
        if self.ortho_lambda == 0:  # logged for comparison, but no backward to pay for
            with torch.no_grad():
                self._last = float(orthogonal_penalty(self.adapters))
            return {}
        penalty = orthogonal_penalty(self.adapters)
        self._last = float(penalty.detach())
        return {"ortho": self.ortho_lambda * penalty}

    def metrics(self, sum_over_ranks=None) -> dict:
        return {"ortho_penalty": self._last}  # unweighted, so runs with different lambda compare
