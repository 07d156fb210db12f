"""Forward+backward cost of one FFN projection with the MedCare stage-1 adapter.

Four variants of `y = W x + adapter(x)` on the same weights and the same input, in the
same run, at the real FFN shapes of Qwen1.5 (1.8B 2048->5504, 7B 4096->11008,
14B 5120->13696):

  base     the frozen projection alone (W x; x requires grad, W does not)
  stacked  base + the reference's formulation: every expert's full output stacked into
           [tokens, E, d_out], the top-k gathered and weighted (written below)
  dense    base + MoLoRA(routed_compute="dense"): all experts in rank space, unselected gated to 0
  sparse   base + MoLoRA(routed_compute="sparse"): each expert on its own tokens only

What is measured (per variant):

  time     wall time of one forward+backward (upstream gradient given), after `--warmup`
           steps: median (and min) of `--repeats`; the variants run round-robin, and
           "x base" is the median over rounds of (variant time / base time of the same
           round), so that drift of the machine's speed cancels out. torch.set_num_threads(--threads) for
           all. The CPU time other processes used meanwhile is measured (/proc/stat); above
           5% of the machine a WARNING says the times are not clean.
  saved    bytes of the tensors autograd keeps for backward (saved_tensors_hooks, each
           storage counted once, parameters excluded): the activation memory this layer
           adds to a training step. Exact, any device.
  peak     CPU: the high-water mark of the process RSS during one forward+backward above
           the RSS just before it, in a fresh subprocess per variant (VmHWM reset through
           /proc/self/clear_refs, libraries warmed up on a small shape first). It includes
           the output, the input gradient and the adapter gradients. GPU:
           torch.cuda.max_memory_allocated() during the step minus the allocation before it.

Every variant's output is checked against `dense` (max abs difference printed).

    python bench/molora.py                       # 1.8B, 7B, 14B shapes, 1024 tokens, fp32, CPU
    python bench/molora.py --shapes 1.8B --tokens 4096
    python bench/molora.py --device cuda --bf16  # base in bf16, adapter in fp32 as in training
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from medcare_dist.method.molora import MoLoRA  # noqa: E402

SHAPES = {"1.8B": (2048, 5504), "7B": (4096, 11008), "14B": (5120, 13696)}
VARIANTS = ["base", "stacked", "dense", "sparse"]


def stacked_reference(layer: MoLoRA, x: torch.Tensor) -> torch.Tensor:
    """The reference's way: every routed expert's full [tokens, d_out] output, stacked into
    [tokens, E, d_out], then the top-k gathered and weighted; shared expert added."""
    r = layer.rank
    probs = F.softmax(layer.router(x).float(), dim=-1)
    top_w, top_idx = probs.topk(layer.top_k, dim=-1)
    top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
    xd = layer.dropout(x)
    every = torch.stack(
        [F.linear(F.linear(xd, layer.na_A[e * r:(e + 1) * r]), layer.na_B[:, e * r:(e + 1) * r]) for e in range(layer.num_experts)],
        dim=1,
    )  # [tokens, E, d_out]
    chosen = every.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, every.shape[-1]))  # [tokens, k, d_out]
    routed = (chosen * top_w.unsqueeze(-1)).sum(1)
    shared = F.linear(F.linear(xd, layer.ka_A), layer.ka_B)
    return (shared + routed) * layer.scale


class Case:
    """One projection: frozen W, the adapter's weights, an input that requires grad and an
    upstream gradient, all fixed by the seed so that every variant sees the same numbers."""

    def __init__(self, d_in, d_out, args, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        base_dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device, base_dtype)
        self.x = torch.randn(args.tokens, d_in, generator=g).to(device, base_dtype).requires_grad_(True)
        self.grad_out = torch.randn(args.tokens, d_out, generator=g).to(device, base_dtype)
        torch.manual_seed(seed)
        # Adapters stay fp32 (as in training: medcare_dist/adapters/adapter_set.py casts x to them).
        self.layer = MoLoRA(d_in, d_out, args.rank, args.shared_rank, args.experts, args.top_k, scale=2.0, dropout=0.0).to(device)
        with torch.no_grad():  # B starts at zero in training; non-zero here so outputs compare
            self.layer.ka_B.copy_(torch.randn(self.layer.ka_B.shape, generator=g) * 0.01)
            self.layer.na_B.copy_(torch.randn(self.layer.na_B.shape, generator=g) * 0.01)

    def forward(self, variant: str) -> torch.Tensor:
        y = F.linear(self.x, self.weight)
        if variant == "base":
            return y
        xa = self.x.to(self.layer.ka_A.dtype)
        if variant == "stacked":
            delta = stacked_reference(self.layer, xa)
        else:
            self.layer.routed_compute = variant
            delta = self.layer(xa)
        return y + delta.to(y.dtype)

    def step(self, variant: str) -> torch.Tensor:
        self.x.grad = None
        for p in self.layer.parameters():
            p.grad = None
        y = self.forward(variant)
        y.backward(self.grad_out)
        return y

    def saved_bytes(self, variant: str) -> int:
        params = {p.untyped_storage().data_ptr() for p in self.layer.parameters()} | {self.weight.untyped_storage().data_ptr()}
        seen: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = self.forward(variant)
        y.backward(self.grad_out)
        return sum(seen.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _machine_busy_s() -> float:
    """CPU-seconds all processes on this machine have used (user, nice, system, irq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_busy_s() -> float:
    t = os.times()
    return t.user + t.system


def time_variants(case: Case, variants, args, device) -> dict[str, float]:
    for v in variants:
        for _ in range(args.warmup):
            case.step(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # round-robin: drift affects every variant alike
            sync(device)
            t0 = time.perf_counter()
            case.step(v)
            sync(device)
            times[v].append(time.perf_counter() - t0)
    # ratio per round (variant / base timed moments apart), then the median of those:
    # steadier than a ratio of medians when the machine's speed drifts
    return {
        v: (statistics.median(ts), min(ts), statistics.median(t / b for t, b in zip(ts, times["base"])))
        for v, ts in times.items()
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_cpu_child(args) -> None:
    """Run in a fresh subprocess: one forward+backward of one variant, print the RSS peak."""
    d_in, d_out = SHAPES[args.peak_child_shape]
    variant = args.peak_child
    small = argparse.Namespace(**{**vars(args), "tokens": 64})
    Case(256, 512, small, torch.device("cpu")).step(variant)  # load and warm the kernels' code paths
    case = Case(d_in, d_out, args, torch.device("cpu"))
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    case.step(variant)
    print(json.dumps({"peak_bytes": (_status_kib("VmHWM") - before) * 1024}))


def peak_memory(shape: str, variant: str, args, device) -> int:
    if device.type == "cuda":
        case = Case(*SHAPES[shape], args, device)
        case.step(variant)  # allocator warm
        case.x.grad = None
        for p in case.layer.parameters():
            p.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.step(variant)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    cmd = [sys.executable, __file__, "--peak-child", variant, "--peak-child-shape", shape, *args.passthrough]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shared-rank", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="base weights and input in bf16 (adapter stays fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--peak-child", help=argparse.SUPPRESS)
    p.add_argument("--peak-child-shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.passthrough = [
        "--tokens", str(args.tokens), "--experts", str(args.experts), "--top-k", str(args.top_k),
        "--rank", str(args.rank), "--shared-rank", str(args.shared_rank), "--threads", str(args.threads),
    ] + (["--bf16"] if args.bf16 else [])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_child:
        peak_cpu_child(args)
        return 0
    device = torch.device(args.device)
    variants = ["base"] + [v for v in args.variants if v != "base"]
    peak_method = "cuda max_memory_allocated" if device.type == "cuda" else "RSS high-water delta, fresh process per variant"
    print(
        f"MoLoRA forward+backward, one FFN projection: tokens={args.tokens} E={args.experts} k={args.top_k} "
        f"r={args.rank} shared_rank={args.shared_rank} base={'bf16' if args.bf16 else 'fp32'} adapter=fp32 "
        f"device={device} threads={args.threads} median of {args.repeats} (warmup {args.warmup}) torch {torch.__version__}"
    )
    print(f"saved = activation bytes kept for backward (parameters excluded); peak = {'not measured' if args.no_peak else peak_method}")
    header = f"{'shape':>5} {'d_in->d_out':>12} {'variant':>8} {'median s':>8} {'x base':>7} {'min s':>7} {'x base':>7} {'saved MB':>9} {'peak MB':>8} {'max|diff|':>10}"
    print(header)
    results = []
    for shape in args.shapes:
        d_in, d_out = SHAPES[shape]
        case = Case(d_in, d_out, args, device)
        with torch.no_grad():
            ref = case.forward("dense") if "dense" in variants else None
        machine0, own0, wall0 = _machine_busy_s(), _own_busy_s(), time.perf_counter()
        times = time_variants(case, variants, args, device)
        other = (_machine_busy_s() - machine0) - (_own_busy_s() - own0)
        other_share = max(0.0, other) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
        if other_share > 0.05:
            print(f"WARNING: other processes used {other_share:.0%} of the machine's CPU while {shape} was timed: times are not clean")
        for v in variants:
            with torch.no_grad():
                diff = float((case.forward(v) - ref).abs().max()) if ref is not None and v != "base" else float("nan")
            row = {
                "shape": shape, "d_in": d_in, "d_out": d_out, "variant": v, "time_s": times[v][0],
                "ratio_vs_base": times[v][2], "min_time_s": times[v][1],
                "min_ratio_vs_base": times[v][1] / times["base"][1], "saved_bytes": case.saved_bytes(v),
                "peak_bytes": None if args.no_peak else peak_memory(shape, v, args, device), "max_abs_diff_vs_dense": diff,
                "other_cpu_share_while_timed": round(other_share, 3),
            }
            results.append(row)
            peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
            print(
                f"{shape:>5} {f'{d_in}->{d_out}':>12} {v:>8} {row['time_s']:8.3f} {row['ratio_vs_base']:7.2f} "
                f"{row['min_time_s']:7.3f} {row['min_ratio_vs_base']:7.2f} "
                f"{row['saved_bytes'] / 2**20:9.1f} {peak:>8} {'' if v == 'base' else f'{diff:.1e}':>10}",
                flush=True,
            )
        del case
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "passthrough"}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
