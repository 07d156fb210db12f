"""Stage 1 of MedCare, knowledge aggregation: everything that exists only in stage 1.

- `MoLoRA`, the mixture of LoRA experts on each FFN projection: the shared Knowledge
  Aggregator, the routed Noise Aggregator and its router (`Routing`, `load_balancing_loss`);
- `stage1_adapters`: attention LoRA + MoLoRA on a base model;
- `RouterObjective`: the optional load-balancing loss and the router metrics;
- router health: `CollapseDetector` and its warning.

Router collapse: an expert that gets under `reporting.COLLAPSE_MIN_SHARE` (1%) of the tokens of its
projection for `COLLAPSE_WINDOW` (3) consecutive log intervals is collapsed. The metrics
record then carries `"router_collapse": {projection: [expert, ...]}` and rank 0 prints a
warning when a collapse starts. An expert's share of the tokens is top_k times its
`router_load` (the fraction of the routed (token, expert) assignments, which sums to 1 over
the experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.adapters.lora import LoRA, init_lora_a, lora_scale
from medcare_dist.config import TrainConfig
from medcare_dist.training.base_model import linear_targets
from medcare_dist.training.metrics import COLLAPSE_MIN_SHARE, COLLAPSE_WINDOW, warn
from medcare_dist.training.trainer import Objective


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
        if routed_compute not in ("sparse", "dense"):
            raise ValueError(f"routed_compute must be 'sparse' or 'dense', got {routed_compute!r}")
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
        if self.routed_compute == "dense":
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


def stage1_adapters(model: nn.Module, cfg: TrainConfig) -> AdapterSet:
    """Attention LoRA on cfg.attn_targets; mixture of LoRA experts on cfg.ffn_targets."""
    scale = lora_scale(cfg.lora_alpha, cfg.lora_r, cfg.use_rslora)
    adapters = AdapterSet()
    for path, linear in linear_targets(model, cfg.attn_targets):
        adapters.add("attn_lora", path, LoRA(linear.in_features, linear.out_features, cfg.lora_r, scale, cfg.lora_dropout))
    for path, linear in linear_targets(model, cfg.ffn_targets):
        adapters.add(
            "molora",
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
        from medcare_dist.dist import process_group as dist_utils

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


class CollapseDetector:
    """Tracks, per projection and expert, how many consecutive log intervals the expert got
    under `min_share` of the tokens.

    `update({projection: [share of tokens per expert]})` returns the collapsed experts
    {projection: [expert, ...]} (streak >= window); `newly_collapsed` holds those that
    reached the window at this update (what to warn about once). An interval in which a
    projection routed no token at all is no evidence either way and is skipped for it.
    """

    def __init__(self, min_share: float = COLLAPSE_MIN_SHARE, window: int = COLLAPSE_WINDOW):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.min_share, self.window = min_share, window
        self.streak: dict[str, list[int]] = {}
        self.newly_collapsed: dict[str, list[int]] = {}

    def update(self, shares: dict[str, list[float]]) -> dict[str, list[int]]:
        collapsed: dict[str, list[int]] = {}
        self.newly_collapsed = {}
        for target, values in shares.items():
            streak = self.streak.setdefault(target, [0] * len(values))
            if not any(v > 0 for v in values) or any(math.isnan(v) for v in values):
                pass  # nothing routed in this interval: keep the streaks as they are
            else:
                for e, v in enumerate(values):
                    streak[e] = streak[e] + 1 if v < self.min_share else 0
                    if streak[e] == self.window:
                        self.newly_collapsed.setdefault(target, []).append(e)
            experts = [e for e, n in enumerate(streak) if n >= self.window]
            if experts:
                collapsed[target] = experts
        return collapsed


def collapse_warning(newly: dict[str, list[int]], loads: dict[str, list[float]], min_share: float = COLLAPSE_MIN_SHARE,
                     window: int = COLLAPSE_WINDOW, max_listed: int = 6) -> str:
    """One warning line about the projections whose experts just collapsed."""
    items = list(newly.items())
    listed = "; ".join(
        f"{target}: expert(s) {', '.join(map(str, experts))} (load {', '.join(f'{loads[target][e]:.4f}' for e in experts)})"
        for target, experts in items[:max_listed]
    )
    more = f"; and {len(items) - max_listed} more projection(s)" if len(items) > max_listed else ""
    return (
        f"[medcare_dist] warning: router collapse: {listed}{more}: under {min_share:.0%} of the tokens for "
        f"{window} consecutive log intervals. Consider router_aux_loss_coef > 0 (load-balancing loss) "
        "or a lower lr."
    )
