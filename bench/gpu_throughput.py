"""Training throughput and MFU of the MedCare stages on one GPU, with random weights.

    python bench/gpu_throughput.py --model qwen1.5-7b --seq-len 2048 --micro-batch 4 --grad-ckpt

Builds a real-shaped Qwen2 model directly on the device (random bf16 weights, no download),
attaches the adapters of each variant and times full training steps (forward, backward,
AdamW on the adapters). Variants, measured in the same run:
  lora     plain LoRA (r=16) on all 7 projections: the usual LoRA fine-tune, the baseline
  stage1   attention LoRA + mixture of LoRA experts on the FFN (MedCare stage 1)
  stage2   knowledge + alignment LoRA (rank 32) on the FFN + the orthogonal loss (stage 2)

FLOPs per trained token (model FLOPs; recomputation from checkpointing is not counted, as
in the MFU definition of the PaLM paper):
  frozen base:     2N forward + 2N backward (activation gradients only; no weight gradients)
  adapters:        6 N_adapter (trained in full)
  attention:       12 L H S (scores and values, forward + both backward products)
We also print the figure with the 6N convention used for full fine-tuning (and by Qwen's
published LoRA numbers), to compare with those.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.adapters.lora import LoRA
from medcare_dist.training.zero3 import enable_activation_checkpointing
from medcare_dist.method.stage2 import orthogonal_penalty
from medcare_dist.training.lm_loss import causal_lm_loss_sum
from medcare_dist.method.molora import MoLoRA

SHAPES = {  # Qwen1.5 chat models
    "qwen1.5-1.8b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16),
    "qwen1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "qwen1.5-14b": dict(hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
ATTN, FFN = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]


def build_model(shape: str, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=False, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def linears(model, names):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names]


def make_adapters(model, variant: str, r: int = 16, experts: int = 8, top_k: int = 2, shared: int = 2) -> AdapterSet:
    adapters = AdapterSet()
    if variant == "lora":
        for path, m in linears(model, ATTN + FFN):
            adapters.add("lora", path, LoRA(m.in_features, m.out_features, r, 2.0, 0.05))
    elif variant == "stage1":
        for path, m in linears(model, ATTN):
            adapters.add("attn_lora", path, LoRA(m.in_features, m.out_features, r, 2.0, 0.05))
        for path, m in linears(model, FFN):
            adapters.add("molora", path, MoLoRA(m.in_features, m.out_features, r, r * shared, experts, top_k, 2.0, 0.05))
    else:
        for group in ("knowledge", "alignment"):
            for path, m in linears(model, FFN):
                adapters.add(group, path, LoRA(m.in_features, m.out_features, r * shared, 2.0, 0.05))
    return adapters


def flops_per_token(model, adapters, seq_len):
    cfg = model.config
    n_base = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)  # embedding is a lookup
    n_adapter = sum(p.numel() for p in adapters.parameters())
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    model_flops = 4 * n_base + 6 * n_adapter + attention
    return model_flops, 6 * (n_base + n_adapter) + attention, n_base, n_adapter


def bench_variant(model, variant, args, device):
    torch.manual_seed(0)
    adapters = make_adapters(model, variant).to(device)  # adapters stay fp32 (master weights)
    adapters.attach(model)
    adapters.train()
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.seq_len), device=device)
    times = []
    try:
        for step in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            # As in training: a bf16 base, fp32 adapters (the hook casts their input), no autocast.
            logits = model(input_ids=ids).logits
            loss = causal_lm_loss_sum(logits, ids) / ids.numel()
            if variant == "stage2":
                loss = loss + orthogonal_penalty(adapters)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            del logits, loss
    finally:
        adapters.detach()
    step_time = sorted(times)[len(times) // 2]
    tokens = args.micro_batch * args.seq_len
    model_flops, six_n, n_base, n_adapter = flops_per_token(model, adapters, args.seq_len)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {
        "variant": variant, "step_s": step_time, "tokens_per_s": tokens / step_time,
        "tflops": model_flops * tokens / step_time / 1e12, "tflops_6n": six_n * tokens / step_time / 1e12,
        "adapter_params": n_adapter, "base_params": n_base, "peak_mem_gib": peak,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="qwen1.5-7b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--variants", default="lora,stage1,stage2")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak (default: by GPU name)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))
    model = build_model(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.grad_ckpt:
        enable_activation_checkpointing(model)
    model.train()
    print(f"{args.model} on {name}: micro-batch {args.micro_batch} x {args.seq_len} tokens, grad ckpt {args.grad_ckpt}, peak {peak} TFLOPS")
    results = [bench_variant(model, v, args, device) for v in args.variants.split(",")]
    base = results[0]
    print(f"{'variant':8} {'step s':>8} {'tok/s':>9} {'TFLOPS':>8} {'MFU':>6} {'MFU(6N)':>8} {'adapters':>12} {'mem GiB':>8} {'vs ' + base['variant']:>8}")
    for r in results:
        r["mfu"], r["mfu_6n"] = r["tflops"] / peak, r["tflops_6n"] / peak
        print(f"{r['variant']:8} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {r['mfu']:6.1%} {r['mfu_6n']:8.1%} "
              f"{r['adapter_params']:12,} {r['peak_mem_gib']:8.1f} {r['tokens_per_s'] / base['tokens_per_s']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": name, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
