"""The seam between the training loop and a stage of the method.

The loop (training/trainer.py) knows only this interface; each stage (stage1.py, stage2.py)
says what it adds to the LM loss and what it reports. Nothing here knows about ranks: where
a metric needs a sum over ranks, the loop passes the function that computes it.
"""

from __future__ import annotations

from typing import Callable

import torch


class Objective:
    """Stage-specific loss terms and metrics. The default adds nothing."""

    def batch_losses(self, token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms that depend on the micro-batch just forwarded (weighted by its share of tokens)."""
        return {}

    def step_losses(self) -> dict[str, torch.Tensor]:
        """Terms that depend only on adapter weights: computed once per optimizer step."""
        return {}

    def metrics(self, sum_over_ranks: Callable[[list[float]], list[float]]) -> dict:
        """Extra values for the log record; called on every rank at log time (collectively:
        `sum_over_ranks` is an all-reduce)."""
        return {}

    def notices(self) -> list[str]:
        """One-line warnings raised since the last call; rank 0 prints them."""
        return []
