"""The real launcher at 7B on one GPU: plain LoRA, stage 1 and stage 2, measured in one run.

Run through bench/gpu_scale.sh (which sets the GPU's peak FLOP/s); see its header.

Steps, all in one process tree, under --out:
  1. `medcare-dist tiny-model` for a tokenizer; a random-weight bf16 Qwen2 base of Qwen2.5-7B's
     shapes (28 layers, hidden 3584, FFN 18944, 28 heads, 4 KV heads, vocab 152064) written
     layer by layer as safetensors without building a model (bench/export_rss.write_base);
     --dry-run: the same writer at tiny shapes;
  2. a synthetic conversation file whose records are each longer than --seq-len (truncated to it);
  3. through `deepspeed --num_gpus 1`, ZeRO-3, bf16 (--dry-run: DS_ACCELERATOR=cpu, fp32):
       lora    bench/lora_baseline.py: plain LoRA on attention + FFN, the language-model loss
       stage1  launch/stage1.py
       stage2  `medcare-dist prepare-stage2` of stage 1's last checkpoint, then launch/stage2.py
     packed (--packing on) where flash-attn is importable on CUDA, else padded (--packing off);
  4. from each run's metrics.jsonl: tokens/s, the mean of the records after the first (warm-up);
     peak GPU memory (CUDA only: the device's memory.used polled by nvidia-smi every 200 ms,
     CUDA context included; null on CPU), beside `medcare-dist plan --json`'s peak for the
     stage (plan has no plain-LoRA layout: null for lora); MFU; ratios stage1/lora, stage2/lora.
  Prints a table and writes --out/gpu_scale.json.

FLOPs per trained token (model FLOPs: recomputation under activation checkpointing not counted):
  frozen base  4 N        (2N forward + 2N backward for the activation gradients; N = the
                           base's matmul weights: every decoder projection and the LM head)
  adapters     6 N_active (forward and both backward products; the routed experts of stage 1
                           count top_k / num_experts of their weights; stage 2's frozen
                           knowledge adapter is counted as trained, over-counting 2 per weight)
  attention    12 L H S   (L layers, hidden H, sequence S: scores and values, forward + backward)
MFU = tokens/s x FLOPs per token / --peak-flops.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from export_rss import Shape, layer_shapes, write_base  # noqa: E402

QWEN25_7B = Shape(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, max_positions=32768)
SIZES = {  # what each mode runs
    "gpu": dict(layers=28, seq_len=4096, steps=6, micro_batch=1, dtype="bf16", grad_ckpt="true", shard="5GB",
                lora_r=16, num_experts=8),
    "dry": dict(layers=2, seq_len=128, steps=3, micro_batch=1, dtype="fp32", grad_ckpt="false", shard="1MB",
                lora_r=4, num_experts=4),
}
RUNS = ("lora", "stage1", "stage2")
STAGE2_FIXED = ("lora_r", "num_experts")  # stage 2 takes its rank from the prepared base and has no routed experts
WORDS = ("patient fever cough pain blood pressure heart rate diabetes insulin dose kidney liver lung chest "
         "infection antibiotic symptom diagnosis treatment clinic nurse doctor history allergy test result").split()


def sh(cmd: list, log: Path, env: dict) -> None:
    """Run `cmd`, its output into `log`; a non-zero exit stops the benchmark with the log's tail."""
    with open(log, "w") as out:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"gpu_scale: {' '.join(map(str, cmd))} exited {proc.returncode} (log {log}):\n{log.read_text()[-4000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(path: Path, records: int, seq_len: int, seed: int) -> None:
    """Conversations of ~1.5 x seq_len words each (truncated to seq_len tokens by the loader)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(records):
            reply = " ".join(rng.choice(WORDS) for _ in range(seq_len * 3 // 2))
            f.write(json.dumps({"conversations": [{"from": "human", "value": "what should the patient do?"},
                                                  {"from": "gpt", "value": reply}]}) + "\n")


class GpuMemoryPoll:
    """Peak of the GPU's memory.used (bytes) while a run lasts, polled by nvidia-smi; None where there is none."""

    def __init__(self, enabled: bool):
        self.proc = None
        if enabled and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--id=0", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate()
        mib = [int(line) for line in out.split() if line.strip().isdigit()]
        return max(mib) * 2**20 if mib else None


def tokens_per_s(metrics: Path) -> tuple[float, int]:
    """Mean tokens/s of the records after the first (warm-up), and how many records that is."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        sys.exit(f"gpu_scale: {metrics} holds no records")
    kept = records[1:] or records
    return sum(r["tokens_per_s"] for r in kept) / len(kept), len(kept)


def base_matmul_params(model_dir: Path) -> tuple[int, int, int]:
    """(N: weights of every decoder projection and the LM head, layers, hidden) from config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    shape = Shape(hidden=c["hidden_size"], intermediate=c["intermediate_size"], heads=c["num_attention_heads"],
                  kv_heads=c["num_key_value_heads"], vocab=c["vocab_size"])
    per_layer = sum(math.prod(s) for s in layer_shapes(0, shape).values() if len(s) == 2)
    return per_layer * c["num_hidden_layers"] + shape.vocab * shape.hidden, c["num_hidden_layers"], shape.hidden


def active_adapter_params(checkpoint: Path, top_k: int, num_experts: int) -> int:
    """Adapter weights a token goes through: the routed experts (na_A, na_B) count top_k / num_experts."""
    from safetensors import safe_open

    total = 0.0
    with safe_open(str(checkpoint / "adapters.safetensors"), framework="pt") as f:
        for name in f.keys():
            n = math.prod(f.get_slice(name).get_shape())
            total += n * top_k / num_experts if name.endswith(("na_A", "na_B")) else n
    return int(total)


def plan_peak(model: Path, stage: int, common: dict, gpu_gib: float, env: dict) -> int | None:
    cmd = [sys.executable, "-m", "medcare_dist", "plan", "--json", "--model", str(model), "--stage", str(stage),
           "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory", str(gpu_gib)]
    for key, value in common.items():
        cmd += [f"--{key}", str(value)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"gpu_scale: {' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["gpu_bytes"]["peak"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a new or empty directory for the artefacts, logs and gpu_scale.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32, 3 steps: checks the script, measures nothing")
    p.add_argument("--peak-flops", type=float, required=True, help="the GPU's dense bf16 peak FLOP/s (MFU's denominator)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 6; dry run 3)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096; dry run 128)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic bases (default: deleted at the end)")
    args = p.parse_args()

    dry = args.dry_run
    size = dict(SIZES["dry" if dry else "gpu"])
    for key in ("steps", "seq_len", "micro_batch"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        sys.exit("gpu_scale: no CUDA GPU here; --dry-run runs the script on the CPU")
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"gpu_scale: {out} is not empty; pass a new --out")
    work, logs = out / "work", out / "logs"
    work.mkdir(parents=True)
    logs.mkdir()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    packing = "on" if cuda and importlib.util.find_spec("flash_attn") else "off"
    hardware = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 141.0
    t0 = time.time()

    # 1. tokenizer, synthetic base
    sh([sys.executable, "-m", "medcare_dist", "tiny-model", "--out", work / "tokenizer"], logs / "tiny-model.log", env)
    if dry:
        tiny = json.loads((work / "tokenizer" / "config.json").read_text())
        shape = Shape(hidden=tiny["hidden_size"], intermediate=tiny["intermediate_size"], heads=tiny["num_attention_heads"],
                      kv_heads=tiny["num_key_value_heads"], vocab=tiny["vocab_size"], max_positions=4 * size["seq_len"])
    else:
        shape = QWEN25_7B
    base = work / "base"
    write_base(base, shape, size["layers"], size["shard"], work / "tokenizer", torch.Generator().manual_seed(0))
    print(f"base written in {time.time() - t0:.0f} s: {size['layers']} layers, {shape}", flush=True)

    # 2. data
    data = work / "data.jsonl"
    write_data(data, size["steps"] * size["micro_batch"] + 4, size["seq_len"], seed=0)

    # 3. the three runs
    common = {"max_length": size["seq_len"], "micro_batch_size": size["micro_batch"], "grad_checkpointing": size["grad_ckpt"],
              "dtype": size["dtype"], "packing": packing, "lora_r": size["lora_r"], "num_experts": size["num_experts"]}
    options = {**common, "global_batch_size": size["micro_batch"], "max_steps": size["steps"], "log_every": 1,
               "warmup_ratio": 0, "data": data, "data_cache": work / "data-cache", "num_proc": 1}
    from medcare_dist.config import TrainConfig

    top_k = TrainConfig.top_k
    results = {}
    for name in RUNS:
        model = base
        if name == "stage2":
            model = work / "stage2-base"
            sh([sys.executable, "-m", "medcare_dist", "prepare-stage2", "--stage1",
                out / "runs" / "stage1" / f"checkpoint-{size['steps']}", "--out", model, "--max-shard-size", size["shard"]],
               logs / "prepare-stage2.log", env)
        script = HERE / "lora_baseline.py" if name == "lora" else REPO / "launch" / f"{name}.py"
        run_dir = out / "runs" / name
        cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), script,
               "--model", model, "--output_dir", run_dir]
        for key, value in options.items():
            if not (name == "stage2" and key in STAGE2_FIXED):
                cmd += [f"--{key}", value]
        print(f"{name}: running ({logs / (name + '.log')})", flush=True)
        started = time.time()
        poll = GpuMemoryPoll(cuda)
        try:
            sh(cmd, logs / f"{name}.log", env)
        finally:
            peak = poll.stop()
        tps, records = tokens_per_s(run_dir / "metrics.jsonl")
        n_base, layers, hidden = base_matmul_params(model)
        n_adapter = active_adapter_params(run_dir / f"checkpoint-{size['steps']}", top_k, size["num_experts"])
        flops_per_token = 4 * n_base + 6 * n_adapter + 12 * layers * hidden * size["seq_len"]
        results[name] = {
            "tokens_per_s": tps, "records_averaged": records, "seconds": time.time() - started,
            "peak_gpu_bytes": peak,
            "plan_peak_bytes": None if name == "lora" else plan_peak(
                model, 1 if name == "stage1" else 2, {k: v for k, v in common.items() if name == "stage1" or k not in STAGE2_FIXED},
                gpu_gib, env),
            "flops_per_token": flops_per_token, "base_matmul_params": n_base, "active_adapter_params": n_adapter,
            "mfu": tps * flops_per_token / args.peak_flops,
        }

    # 4. report
    ratios = {f"{s}/lora": results[s]["tokens_per_s"] / results["lora"]["tokens_per_s"] for s in ("stage1", "stage2")}
    report = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "hardware": hardware, "dry_run": dry,
              "shapes": "tiny (dry run)" if dry else "Qwen2.5-7B", "layers": size["layers"], "seq_len": size["seq_len"],
              "micro_batch": size["micro_batch"], "steps": size["steps"], "dtype": size["dtype"], "packing": packing,
              "grad_checkpointing": size["grad_ckpt"], "lora_r": size["lora_r"], "num_experts": size["num_experts"],
              "peak_flops": args.peak_flops, "runs": results, "ratios": ratios, "wall_s": time.time() - t0}
    (out / "gpu_scale.json").write_text(json.dumps(report, indent=1) + "\n")
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    print(f"\n{hardware}, {report['shapes']}, seq {size['seq_len']} x {size['micro_batch']}, {size['dtype']}, "
          f"packing {packing}, {size['steps']} steps (first logged step skipped)")
    print(f"{'run':8} {'tokens/s':>10} {'x lora':>7} {'MFU':>6} {'peak GiB':>9} {'plan GiB':>9}")
    for name, r in results.items():
        ratio = ratios.get(f"{name}/lora", 1.0)
        print(f"{name:8} {r['tokens_per_s']:10.1f} {ratio:7.2f} {r['mfu']:6.1%} {gib(r['peak_gpu_bytes']):>9} "
              f"{gib(r['plan_peak_bytes']):>9}")
    print(f"wrote {out / 'gpu_scale.json'} in {time.time() - t0:.0f} s")
    if not args.keep:
        for path in (base, work / "stage2-base"):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
