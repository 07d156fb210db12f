"""Stage-1 objective: the optional router load-balancing loss and router health metrics."""

from __future__ import annotations

import math

import torch

from .adapter_set import AdapterSet
from .adapters import MoLoRA, load_balancing_loss
from .reporting import CollapseDetector, collapse_warning, warn
from .trainer import Objective


class RouterObjective(Objective):
    """Reads each MoLoRA layer's routing right after a forward (before backward, so the
    recompute of gradient checkpointing is never counted twice)."""

    def __init__(self, adapters: AdapterSet, aux_loss_coef: float = 0.0):
        self.layers = [(target, a) for _, target, a in adapters.items() if isinstance(a, MoLoRA)]
        self.aux_loss_coef = aux_loss_coef
        self._counts = {target: torch.zeros(a.num_experts, dtype=torch.float64) for target, a in self.layers}
        self._collapse = CollapseDetector()  # router health over log intervals (see reporting)

    def batch_losses(self, token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        aux = []
        for target, layer in self.layers:
            routing = layer.last_routing
            layer.last_routing = None  # do not keep the graph alive past this step
            chosen = routing.top_idx[token_mask.to(routing.top_idx.device)]
            self._counts[target] += torch.bincount(chosen.reshape(-1), minlength=layer.num_experts).double().cpu()
            if self.aux_loss_coef > 0:
                aux.append(load_balancing_loss(routing, layer.num_experts, token_mask))
        return {"router_aux": self.aux_loss_coef * torch.stack(aux).mean()} if aux else {}

    def metrics(self) -> dict:
        """Per layer: the fraction of routed assignments each expert got since the last call,
        and the entropy of that load (log E when balanced, 0 when collapsed). Experts under
        1% of their layer's tokens (top_k x load) for `reporting.COLLAPSE_WINDOW` consecutive
        calls are listed under "router_collapse"; rank 0 warns when a collapse starts."""
        from . import distributed as dist_utils

        targets = list(self._counts)
        if not targets:
            return {}
        flat = dist_utils.all_reduce_sum(torch.cat([self._counts[t] for t in targets]).tolist())
        top_k = {target: layer.top_k for target, layer in self.layers}
        load, entropy = {}, {}
        offset = 0
        for target in targets:
            n = self._counts[target].numel()
            counts = torch.tensor(flat[offset:offset + n])
            offset += n
            frac = counts / counts.sum().clamp(min=1)
            load[target] = [round(float(f), 4) for f in frac]
            nz = frac[frac > 0]
            entropy[target] = round(float(-(nz * nz.log()).sum()), 4)
            self._counts[target].zero_()
        out = {"router_load": load, "router_entropy": entropy,
               "router_entropy_max": round(math.log(self.layers[0][1].num_experts), 4), "router_top_k": self.layers[0][1].top_k}
        collapsed = self._collapse.update({t: [f * top_k[t] for f in load[t]] for t in targets})
        if collapsed:
            out["router_collapse"] = collapsed
        if self._collapse.newly_collapsed and _is_rank_zero():
            warn(collapse_warning(self._collapse.newly_collapsed, load))
        return out


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
