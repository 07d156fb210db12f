"""Stage 1 of MedCare, knowledge aggregation: its adapters and its objective.

- `stage1_adapters`: attention LoRA + a mixture of LoRA experts (molora.py) on each FFN
  projection of a base model, on the projections `stage1_targets` finds: a fused projection
  (Phi-3's `qkv_proj`, `gate_up_proj`) or a missing one is refused unless `partial_targets`
  (`check_stage1_base`, run on a weightless copy of the model before any process group);
- `RouterObjective`: the optional load-balancing loss, the router load and entropy metrics,
  and router collapse (router_health.py): the metrics record then carries
  `"router_collapse": {projection: [expert, ...]}` and a one-line notice when a collapse starts.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from medcare_dist.adapters.adapter_set import AdapterSet, linear_targets
from medcare_dist.adapters.lora import LoRA, lora_scale
from medcare_dist.config import TrainConfig
from medcare_dist.errors import ConfigError
from medcare_dist.method.molora import MoLoRA, load_balancing_loss, resolve_routed_compute
from medcare_dist.method.objective import Objective
from medcare_dist.method.router_health import CollapseDetector, collapse_warning


ATTENTION = "attn_lora"  # adapter groups of a stage-1 model
MOLORA = "molora"
# Linears that compute several of the method's projections at once: its per-projection adapters
# (one attention LoRA each; the gate and up experts) have no meaning on them.
FUSED = {"qkv_proj": "q, k, v", "query_key_value": "q, k, v", "W_pack": "q, k, v", "wqkv": "q, k, v",
         "gate_up_proj": "gate, up", "w13": "gate, up"}


def stage1_targets(model: nn.Module, cfg: TrainConfig) -> dict[str, list[tuple[str, nn.Linear]]]:
    """{"attention": [(path, Linear)], "experts": [...]}: the Linears named by cfg.attn_targets
    and cfg.ffn_targets. A fused projection, or a named projection the model does not have, is
    refused in one line naming it, unless cfg.partial_targets (then they are left unadapted)."""
    where = _linear_leaves(model)
    name = type(model).__name__
    fused = [f"{path} (fused {FUSED[leaf]})" for leaf, path in where.items() if leaf in FUSED]
    if fused and not cfg.partial_targets:
        raise ConfigError(f"{name} fuses projections the method adapts one by one: {', '.join(fused)}; "
                          "set partial_targets: true to train the other projections only")
    missing = [leaf for leaf in (*cfg.attn_targets, *cfg.ffn_targets) if leaf not in where]
    if missing and not cfg.partial_targets:
        raise ConfigError(f"{name} has no {', '.join(missing)} (attn_targets, ffn_targets): name its projections "
                          "there, or set partial_targets: true to adapt only those it has")
    return {"attention": linear_targets(model, [t for t in cfg.attn_targets if t in where]),
            "experts": linear_targets(model, [t for t in cfg.ffn_targets if t in where])}


def check_stage1_base(model: nn.Module, cfg: TrainConfig) -> str:
    """What stage 1 adapts on `model` (one line for the log); raises as `stage1_targets`, or
    when the routed experts' compute path cannot run on this machine."""
    resolve_routed_compute(cfg.routed_compute, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    targets = stage1_targets(model, cfg)
    parts = []
    for kind, found in (("attention LoRA", targets["attention"]), ("LoRA experts", targets["experts"])):
        leaves = sorted({path.rsplit(".", 1)[-1] for path, _ in found})
        parts.append(f"{kind} on {', '.join(leaves) or 'nothing'} ({len(found)} Linears)")
    where = _linear_leaves(model)
    skipped = [leaf for leaf in (*cfg.attn_targets, *cfg.ffn_targets) if leaf not in where]
    skipped += [f"{leaf} (fused)" for leaf in where if leaf in FUSED]
    return f"stage 1 adapts: {'; '.join(parts)}" + (f"; not adapted: {', '.join(skipped)}" if skipped else "")


def _linear_leaves(model: nn.Module) -> dict[str, str]:
    """{last path component: the first path} of every nn.Linear in the model."""
    where: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            where.setdefault(path.rsplit(".", 1)[-1], path)
    return where


def stage1_adapters(model: nn.Module, cfg: TrainConfig) -> AdapterSet:
    """Attention LoRA on cfg.attn_targets; mixture of LoRA experts on cfg.ffn_targets (`stage1_targets`)."""
    scale = lora_scale(cfg.lora_alpha, cfg.lora_r, cfg.use_rslora)
    adapters = AdapterSet()
    targets = stage1_targets(model, cfg)
    for path, linear in targets["attention"]:
        adapters.add(ATTENTION, path, LoRA(linear.in_features, linear.out_features, cfg.lora_r, scale, cfg.lora_dropout))
    for path, linear in targets["experts"]:
        adapters.add(
            MOLORA,
            path,
            MoLoRA(
                linear.in_features,
                linear.out_features,
                rank=cfg.lora_r,
                shared_rank=cfg.lora_r * cfg.num_shared,
                num_experts=cfg.num_experts,
                top_k=cfg.top_k,
                scale=scale,
                dropout=cfg.lora_dropout,
                routed_compute=cfg.routed_compute,
            ),
        )
    return adapters


def split_for_stage2(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Between the stages, from a stage-1 checkpoint's flat adapter tensors: ({target: (A, B)}
    of the attention LoRA, to merge into the base; {target: (A, B)} of the Knowledge
    Aggregators, to keep). The Noise Aggregator (routed experts, routers) is not returned: dropped."""
    return LoRA.pairs(tensors, ATTENTION), MoLoRA.knowledge_pairs(tensors, MOLORA)


class RouterObjective(Objective):
    """Reads each MoLoRA layer's routing right after a forward (before backward, so the
    recompute of gradient checkpointing is never counted twice)."""

    def __init__(self, adapters: AdapterSet, aux_loss_coef: float = 0.0):
        self.layers = [(target, a) for _, target, a in adapters.items() if isinstance(a, MoLoRA)]
        self.aux_loss_coef = aux_loss_coef
        self._counts = {target: torch.zeros(a.num_experts, dtype=torch.float64) for target, a in self.layers}
        self._collapse = CollapseDetector()  # router health over log intervals
        self._notices: list[str] = []

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

    def metrics(self, sum_over_ranks: Callable[[list[float]], list[float]]) -> dict:
        """Per layer: the fraction of routed assignments each expert got since the last call,
        and the entropy of that load (log E when balanced, 0 when collapsed). Experts under
        1% of their layer's tokens (top_k x load) for `router_health.COLLAPSE_WINDOW`
        consecutive calls are listed under "router_collapse"; a collapse that starts is also
        a notice."""
        targets = list(self._counts)
        if not targets:
            return {}
        flat = sum_over_ranks(torch.cat([self._counts[t] for t in targets]).tolist())
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
        if self._collapse.newly_collapsed:
            self._notices.append(collapse_warning(self._collapse.newly_collapsed, load))
        return out

    def notices(self) -> list[str]:
        out, self._notices = self._notices, []
        return out
