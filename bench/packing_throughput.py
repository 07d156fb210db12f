"""Training tokens/s with packed vs padded micro-batches, same model, same records, same run.

    python bench/packing_throughput.py [--steps 6] [--max-length 1024] [--threads 2]

Two data sets: the project's sample stage-1 data (data/sample/stage1.jsonl, chat-templated
with the tiny tokenizer), and a synthetic chat-like mix (log-normal lengths, median 180
tokens, cut at --max-length; a third of each record is prompt, the rest trained). For each,
both modes run the trainer's own micro-batch path (`batching.split_global_batch`, `collate` or
`collate_packed`, `losses.model_lm_loss_sum`, backward) over the same global batches from
`batching.plan_global_batches` (global batch 16, micro-batch 2: the config defaults; packed rows
of up to max_length tokens, the trainer's default). tokens/s counts real
(non-pad) tokens only. One process, no DeepSpeed; the model is the tiny Qwen2's shape widened
to --hidden (random init, fp32) with the stage-1 adapters attached.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from medcare_dist.config import TrainConfig  # noqa: E402
from medcare_dist.data.batching import collate, collate_packed, plan_global_batches, split_global_batch  # noqa: E402
from medcare_dist.training.lm_loss import model_lm_loss_sum  # noqa: E402
from medcare_dist.method.stage1 import stage1_adapters  # noqa: E402
from medcare_dist.tools.tiny import TINY_CONFIG, build_tokenizer  # noqa: E402

GLOBAL_BATCH, MICRO_BATCH = 16, 2


def sample_records(tokenizer, max_length: int) -> list[dict]:
    from medcare_dist.data.dataset import build_dataset

    dataset, _ = build_dataset(REPO / "data" / "sample" / "stage1.jsonl", tokenizer, max_length)
    return [dataset[i] for i in range(len(dataset))]


def chat_like_records(vocab: int, max_length: int, n: int = 320, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        length = max(8, min(max_length, int(rng.lognormvariate(5.2, 0.8))))  # median e^5.2 = 181
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = length // 3
        records.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return records


def run(model, records: list[dict], pack_tokens: int, steps: int) -> tuple[float, int, int, int]:
    """(seconds, real tokens, tokens computed (padding included), micro-batches) for `steps` global batches."""
    lengths = [len(r["input_ids"]) for r in records]
    batches = plan_global_batches(lengths, GLOBAL_BATCH, seed=0, epoch=0)[:steps]
    tokens = computed = micro = 0
    start = time.perf_counter()
    for global_batch in batches:
        n_labels = sum(sum(t != -100 for t in records[i]["labels"][1:]) for i in global_batch)
        for piece in split_global_batch(global_batch, lengths, MICRO_BATCH, pack_tokens):
            rows = [[records[i] for i in row] for row in piece]
            if pack_tokens:
                batch = collate_packed(rows, pad_token_id=0)
                batch.pop("real_tokens")
            else:
                batch = collate([record for row in rows for record in row], pad_token_id=0)
            labels = batch.pop("labels")
            computed += labels.numel()
            (model_lm_loss_sum(model, batch, labels) / n_labels).backward()
            tokens += sum(len(record["input_ids"]) for row in rows for record in row)
            micro += 1
    return time.perf_counter() - start, tokens, computed, micro


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="global batches per mode and data set")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pack-tokens", type=int, default=0, help="tokens per packed row (0: max_length, the default)")
    parser.add_argument("--threads", type=int, default=1, help="1: OpenMP barriers stall when other jobs share the cores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    shape = {**TINY_CONFIG, "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
             "num_hidden_layers": args.layers, "max_position_embeddings": args.max_length}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **shape))
    model.requires_grad_(False)
    model.config.use_cache = False
    stage1_adapters(model, TrainConfig(model="x", data=["x"], lora_dropout=0.0)).attach(model)
    datasets = {"sample stage1.jsonl": sample_records(tokenizer, args.max_length),
                "synthetic chat-like": chat_like_records(len(tokenizer), args.max_length)}
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {len(tokenizer)}; global batch {GLOBAL_BATCH}, "
          f"micro-batch {MICRO_BATCH}, max_length {args.max_length}, {args.steps} steps, {args.threads} threads")
    print(f"{'data':22} {'mode':7} {'mean len':>8} {'micro-batches':>13} {'padding':>7} {'tokens/s':>9} {'speed-up':>8}")
    run(model, datasets["sample stage1.jsonl"], 0, 1)  # warm-up
    for name, records in datasets.items():
        mean = sum(len(r["input_ids"]) for r in records) / len(records)
        padded = None
        for mode, budget in (("padded", 0), ("packed", args.pack_tokens or args.max_length)):
            seconds, tokens, computed, micro = run(model, records, budget, args.steps)
            rate = tokens / seconds
            padded = padded or rate
            print(f"{name:22} {mode:7} {mean:8.0f} {micro:13} {1 - tokens / computed:7.1%} {rate:9.0f} {rate / padded:7.2f}x")


if __name__ == "__main__":
    main()
