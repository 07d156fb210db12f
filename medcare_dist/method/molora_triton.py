"""Triton kernels for MoLoRA's routed experts in rank space (`routed_compute: fused`).

y[t] = sum_j g[t, j] * B_e (A_e x[t]),  e = top_idx[t, j]

over the top-k experts of each token, without the dense path's [tokens, E*r] products and
without the sparse path's per-expert Python loop and host sync. Three kernels, each used
twice (forward and backward), inputs in the adapters' matmul dtype (bf16 on GPU), every
accumulation in fp32:

- `_grouped_down` (SGMV: the token-expert assignments sorted by expert, one expert's rows
  per program, `tl.dot` against that expert's r rows): h = x A_e^T (forward) and
  dh = dy B_e (backward), [assignments, r] in fp32.
- `_gathered_up` (per token, gathering each token's k experts): y = sum_j B_e (g h) (forward)
  and dx = sum_j A_e^T (g dh) (backward). Each token's k terms are added in slot order by
  one program: no atomics, the same result on every run.
- `_grouped_outer` (per expert, over its sorted assignments): dA_e = (g dh)^T x and
  dB_e = dy^T (g h); an idle expert gets a zero block.

The gate gradient is dg[t, j] = <dh[t, j], h[t, j]> (in torch, on [assignments, r]).
`W(e, d, i)` addresses expert e's weight at input/output position d and rank i through
strides, so A [E*r, d_in] and B [d_out, E*r] share the kernels.

Exactness against `dense` is tested on CPU under Triton's interpreter (TRITON_INTERPRET=1,
tests/method/test_molora_triton.py). Not measured on a GPU (no device lent when written):
see docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 16  # assignments or tokens per program
BLOCK_D = 32  # input / output features per step


@triton.jit
def _grouped_down(src, w, order, offs, out, k, D, r, s_src, s_wr, s_wd,
                  R: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """out[a, i] = sum_d src[a // k, d] * W(e, d, i) for the assignments a of expert e."""
    e, blk = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(offs + e), tl.load(offs + e + 1)
    rows = start + blk * BT + tl.arange(0, BT)
    if start + blk * BT < end:
        live = rows < end
        a = tl.load(order + rows, mask=live, other=0)
        tok = a // k
        ri = tl.arange(0, R)
        acc = tl.zeros((BT, R), dtype=tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            xs = tl.load(src + tok[:, None] * s_src + d[None, :], mask=live[:, None] & (d[None, :] < D), other=0.0)
            ws = tl.load(w + (e * r + ri[None, :]) * s_wr + d[:, None] * s_wd, mask=(d[:, None] < D) & (ri[None, :] < r), other=0.0)
            acc = tl.dot(xs, ws, acc)
        tl.store(out + a[:, None] * r + ri[None, :], acc, mask=live[:, None] & (ri[None, :] < r))


@triton.jit
def _gathered_up(v, w, idx, out, T, k, D, r, s_wr, s_wd,
                 R: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """out[t, d] = sum_j sum_i W(idx[t, j], d, i) * v[t*k + j, i]."""
    tb, db = tl.program_id(0), tl.program_id(1)
    t = tb * BT + tl.arange(0, BT)
    d = db * BD + tl.arange(0, BD)
    ri = tl.arange(0, R)
    live_t, live_d, live_r = t < T, d < D, ri < r
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in range(0, k):
        e = tl.load(idx + t * k + j, mask=live_t, other=0)
        vs = tl.load(v + (t * k + j)[:, None] * r + ri[None, :], mask=live_t[:, None] & live_r[None, :], other=0.0)
        ws = tl.load(w + (e[:, None, None] * r + ri[None, None, :]) * s_wr + d[None, :, None] * s_wd,
                     mask=live_t[:, None, None] & live_d[None, :, None] & live_r[None, None, :], other=0.0)
        acc += tl.sum(ws.to(tl.float32) * vs[:, None, :], axis=2)
    tl.store(out + t[:, None] * D + d[None, :], acc.to(out.dtype.element_ty), mask=live_t[:, None] & live_d[None, :])


@triton.jit
def _grouped_outer(src, v, order, offs, out, k, D, r, s_src, s_or, s_od,
                   R: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """W(e, d, i) = sum_{a of expert e} src[a // k, d] * v[a, i], written through out's strides."""
    e, db = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(offs + e), tl.load(offs + e + 1)
    d = db * BD + tl.arange(0, BD)
    ri = tl.arange(0, R)
    acc = tl.zeros((BD, R), dtype=tl.float32)
    for s in range(start, end, BT):
        rows = s + tl.arange(0, BT)
        live = rows < end
        a = tl.load(order + rows, mask=live, other=0)
        xs = tl.load(src + (a // k)[None, :] * s_src + d[:, None], mask=live[None, :] & (d[:, None] < D), other=0.0)
        vs = tl.load(v + a[:, None] * r + ri[None, :], mask=live[:, None] & (ri[None, :] < r), other=0.0)
        acc = tl.dot(xs.to(tl.float32), vs, acc, input_precision="ieee")
    tl.store(out + (e * r + ri[None, :]) * s_or + d[:, None] * s_od, acc.to(out.dtype.element_ty),
             mask=(d[:, None] < D) & (ri[None, :] < r))


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _down(src, w, s_wr, s_wd, order, offs, k, num_experts, r):
    out = torch.empty(order.numel(), r, dtype=torch.float32, device=src.device)
    grid = (num_experts, triton.cdiv(order.numel(), BLOCK_T))
    _grouped_down[grid](src, w, order, offs, out, k, src.shape[1], r, src.stride(0), s_wr, s_wd,
                        R=_rank_block(r), BT=BLOCK_T, BD=BLOCK_D)
    return out


def _up(v, w, s_wr, s_wd, idx, tokens, D, k, r, dtype):
    out = torch.empty(tokens, D, dtype=dtype, device=v.device)
    grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(D, BLOCK_D))
    _gathered_up[grid](v, w, idx, out, tokens, k, D, r, s_wr, s_wd, R=_rank_block(r), BT=BLOCK_T, BD=BLOCK_D)
    return out


def _outer(src, v, out, s_or, s_od, order, offs, k, num_experts, r):
    grid = (num_experts, triton.cdiv(src.shape[1], BLOCK_D))
    _grouped_outer[grid](src, v, order, offs, out, k, src.shape[1], r, src.stride(0), s_or, s_od,
                         R=_rank_block(r), BT=BLOCK_T, BD=BLOCK_D)
    return out


def _grouping(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignments sorted by expert, stable; offsets [E + 1] of each expert's run), int32, no host sync."""
    order = torch.argsort(idx, stable=True).to(torch.int32)
    offs = torch.zeros(num_experts + 1, dtype=torch.int32, device=idx.device)
    offs[1:] = torch.bincount(idx, minlength=num_experts).cumsum(0)
    return order, offs


class FusedRoutedExperts(torch.autograd.Function):
    """y = sum_j gates[t, j] * B_e A_e x[t] over the top-k experts e = top_idx[t, j].

    x [T, d_in]; a [E*r, d_in] (expert e owns rows e*r..); b [d_out, E*r]; gates [T, k]
    (fp32: the renormalised top-k weights, scale included); top_idx [T, k]. Returns y
    [T, d_out] in x's dtype. Keeps for backward x, the weights, the gates, the fp32 rank-space
    h [T*k, r] and the int32 grouping; gradients for x, a, b and gates."""

    @staticmethod
    def forward(ctx, x, a, b, gates, top_idx, num_experts: int):
        x, k, r = x.contiguous(), top_idx.shape[1], a.shape[0] // num_experts
        idx = top_idx.reshape(-1).to(torch.int32).contiguous()
        order, offs = _grouping(idx, num_experts)
        h = _down(x, a, a.stride(0), a.stride(1), order, offs, k, num_experts, r)  # [T*k, r] fp32
        gh = (h * gates.reshape(-1, 1).float()).contiguous()
        y = _up(gh, b, b.stride(1), b.stride(0), idx, x.shape[0], b.shape[0], k, r, x.dtype)
        ctx.save_for_backward(x, a, b, gates, idx, order, offs, h)
        ctx.num_experts, ctx.k = num_experts, k
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, b, gates, idx, order, offs, h = ctx.saved_tensors
        E, k, r = ctx.num_experts, ctx.k, a.shape[0] // ctx.num_experts
        dy = dy.contiguous()
        dgh = _down(dy, b, b.stride(1), b.stride(0), order, offs, k, E, r)  # d(g h) [T*k, r] fp32
        g = gates.reshape(-1, 1).float()
        dgates = (dgh * h).sum(dim=1).reshape(gates.shape).to(gates.dtype)
        dh = (dgh * g).contiguous()
        dx = _up(dh, a, a.stride(0), a.stride(1), idx, x.shape[0], x.shape[1], k, r, x.dtype)
        da = _outer(x, dh, torch.empty_like(a), a.stride(0), a.stride(1), order, offs, k, E, r)
        db = torch.empty_like(b)
        _outer(dy, (h * g).contiguous(), db, db.stride(1), db.stride(0), order, offs, k, E, r)
        return dx, da, db, dgates, None, None
