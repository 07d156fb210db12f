"""Peak memory of one stage-1 training step at Qwen's real vocabulary: full logits vs chunked.

    python bench/loss_memory.py [--vocab 151936] [--batch 2] [--seq 2048] [--chunk 1024]

A Qwen2 with the real 151,936-entry vocabulary but a tiny body (hidden 64, 2 layers, random
init, fp32), the stage-1 adapters at the reference settings (attention LoRA r=16, MoLoRA
E=8, k=2, shared rank 32), 2 x 2048 tokens all labelled (the worst case for the loss).
One step = forward, loss (`losses.model_lm_loss_sum` with lm_loss "full" or "chunked"),
backward, AdamW step, exactly as the trainer does it, without DeepSpeed (one process).

Each variant runs in a fresh subprocess of this same command; the figure is that process's
peak resident set (ru_maxrss), and the baseline is its RSS just before the step (model,
adapters, inputs). The losses of the two variants are printed too: they must agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def one_step(impl: str, vocab: int, batch: int, seq: int, chunk: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medcare_dist.config import TrainConfig
    from medcare_dist.training.lm_loss import model_lm_loss_sum
    from medcare_dist.method.stage1 import stage1_adapters
    from medcare_dist.tools.tiny import TINY_CONFIG

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **{**TINY_CONFIG, "max_position_embeddings": seq}))
    model.requires_grad_(False)
    model.config.use_cache = False
    adapters = stage1_adapters(model, TrainConfig(model="x", data=["x"]))
    adapters.attach(model)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))
    before = rss_mb()
    loss = model_lm_loss_sum(model, {"input_ids": ids}, ids, impl=impl, chunk_tokens=chunk) / ids[:, 1:].numel()
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"impl": impl, "loss": float(loss.detach()), "rss_before_mb": round(before), "peak_rss_mb": round(peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child, args.vocab, args.batch, args.seq, args.chunk)))
        return
    results = []
    for impl in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--child", impl, "--vocab", str(args.vocab), "--batch", str(args.batch),
               "--seq", str(args.seq), "--chunk", str(args.chunk)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"vocab {args.vocab}, {args.batch} x {args.seq} tokens, chunk {args.chunk} tokens")
    print(f"{'lm_loss':8} {'loss':>10} {'RSS before step':>16} {'peak RSS':>10}")
    for r in results:
        print(f"{r['impl']:8} {r['loss']:10.5f} {r['rss_before_mb']:13} MB {r['peak_rss_mb']:7} MB")
    full, chunked = results
    print(f"peak: chunked / full = {chunked['peak_rss_mb'] / full['peak_rss_mb']:.2f}; "
          f"loss difference {abs(full['loss'] - chunked['loss']):.2e}")


if __name__ == "__main__":
    main()
