"""Packed vs padded tokens/s through the real launcher: stage 1, 2 CPU ranks, ZeRO-3.

    python bench/packing_launcher.py --model DIR [--data data/sample/stage1.jsonl] [--steps 24]

Runs `deepspeed --num_gpus 2 launch/stage1.py` twice on the same data and settings, with
`--packing off` and `--packing on`, and reports the trainer's own tokens/s (metrics.jsonl,
real tokens only), averaged over the log windows after the first (start-up excluded). Under
ZeRO-3 every micro-batch gathers the whole base in forward and backward, so the number of
micro-batches per step matters as much as the padding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tokens_per_s(model: str, data: str, packing: str, steps: int, port: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/stage1.py", "--model", model,
               "--data", data, "--output_dir", out, "--max_steps", str(steps), "--log_every", "4",
               "--packing", packing, *extra]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records[1:]]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=str(REPO / "data" / "sample" / "stage1.jsonl"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--port", type=int, default=29791)
    args, extra = parser.parse_known_args()
    extra = extra or ["--global_batch_size", "16", "--micro_batch_size", "2", "--max_length", "1024"]
    padded = tokens_per_s(args.model, args.data, "off", args.steps, args.port, extra)
    packed = tokens_per_s(args.model, args.data, "on", args.steps, args.port + 1, extra)
    print(f"stage 1, 2 ranks ZeRO-3, {' '.join(extra)}, {args.steps} steps, data {args.data}")
    print(f"padded {padded:.0f} tokens/s, packed {packed:.0f} tokens/s: {packed / padded:.2f}x")


if __name__ == "__main__":
    main()
