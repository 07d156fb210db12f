"""Peak memory of `medcare-dist export` (merged) on a stage-2 checkpoint of a >1 GB model.

`export_merged` streams the stage-2 base tensor by tensor and merges the knowledge and
alignment LoRA deltas on the way, so its peak RSS should be about one output shard plus one
tensor (plus the adapters), never the whole model. This benchmark checks that claim:

  1. builds a synthetic Qwen2-shaped stage-2 base of at least `--size-gb` WITHOUT
     instantiating a model: random bf16 tensors are generated layer by layer and written
     straight into `--input-shard-size` safetensors shards (medcare_dist.artefacts.hf_io.ShardedWriter),
     next to a Qwen2 config.json, the tokenizer of `medcare-dist tiny-model`, a knowledge
     adapter and a manifest (what `prepare-stage2` writes);
  2. writes a stage-2 checkpoint with random knowledge + alignment LoRAs (rank `--rank`) on
     every FFN projection (what stage 2 saves);
  3. runs, each in a fresh child process, and measures its peak RSS:
       floor    python importing what the export imports (torch, transformers, deepspeed,
                medcare_dist): the interpreter floor;
       naive    AutoModelForCausalLM.from_pretrained(base, dtype=bfloat16): the whole model
                in memory (skip with --no-naive);
       export   `python -m medcare_dist export --checkpoint CKPT --out DIR --max-shard-size S`
                for every S in --shard-sizes; each output is spot-checked (tensor count, one
                merged projection against base + scale * (B_k A_k + B_a A_a)) and deleted.

Peak RSS is VmHWM, the kernel's high-water mark of the child's RSS, polled every ~5 ms until
it exits. RSS counts both anonymous memory (heap: tensors copied out of the file, the pending
output shard) and file-backed pages mapped into the process (safetensors reads through mmap,
and every page of an input shard touched through the map stays in RSS until the file is
closed). Those file pages are page cache, reclaimable and shared: they do not need free
memory. So the /proc/PID/status fields RssAnon and RssFile are sampled at the same time and
their peaks reported separately (sampled: a spike shorter than the interval can be missed).

Synthetic shapes: the decoder layer of Qwen1.5-1.8B (hidden 2048, FFN 5504, 16 heads, q/k/v
bias) with a 32000-token vocabulary (so the embedding, 131 MB, fits in a 200 MB shard as
the embedding of a large model does in a 5 GB one), untied lm_head, as many layers as needed
for --size-gb, all bf16 (as Qwen2 checkpoints are published). Sizes are decimal (MB = 1e6 B),
as in --max-shard-size.

    python bench/export_rss.py                                # 1.2 GB model, shards 200MB and 1GB
    python bench/export_rss.py --size-gb 3 --shard-sizes 500MB 2GB --no-naive
    python bench/export_rss.py --workdir /scratch/rss --keep  # keep the synthetic artefacts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from medcare_dist.adapters.lora import lora_scale  # noqa: E402
from medcare_dist.artefacts.manifest import (KNOWLEDGE_FILE, STAGE2_BASE, base_fingerprint, new_manifest, record_files,  # noqa: E402
                                             versions, write_manifest)
from medcare_dist.artefacts.checkpoint import TrainState, save_checkpoint  # noqa: E402
from medcare_dist.config import TrainConfig  # noqa: E402
from medcare_dist.artefacts.hf_io import SIDE_FILES, ShardedWriter, parse_size, weight_files  # noqa: E402
from medcare_dist.artefacts.stage2_base import check_stage2_base  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5504, 16, 16, 32000
FFN = ("gate_proj", "up_proj", "down_proj")
DTYPE, DTYPE_NAME, BYTES = torch.bfloat16, "bfloat16", 2
MB = 10**6


@dataclass(frozen=True)
class Shape:
    """The shapes of a synthetic Qwen2 base (default: this benchmark's; bench/gpu_scale.py writes others)."""

    hidden: int = HIDDEN
    intermediate: int = INTERMEDIATE
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    vocab: int = VOCAB
    max_positions: int = 4096


# --- the synthetic stage-2 base -------------------------------------------------------------


def layer_shapes(i: int, shape: Shape = Shape()) -> dict[str, tuple[int, ...]]:
    """Every tensor of Qwen2 decoder layer i, in Qwen2ForCausalLM's names."""
    h, f = shape.hidden, shape.intermediate
    kv = h // shape.heads * shape.kv_heads
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
        p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
    }


def nbytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values()) * BYTES


def num_layers_for(size_bytes: int) -> int:
    """Fewest layers that make the model at least `size_bytes` (embedding + lm_head + norm included)."""
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * BYTES
    return max(1, math.ceil((size_bytes - fixed) / nbytes(layer_shapes(0))))


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=DTYPE)
    return torch.empty(shape, dtype=DTYPE).normal_(std=0.02, generator=gen)


def write_config(out: Path, num_layers: int, tokenizer_dir: Path, shape: Shape = Shape()) -> None:
    from transformers import Qwen2Config

    tiny = json.loads((tokenizer_dir / "config.json").read_text())
    Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=num_layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype=DTYPE_NAME,
        bos_token_id=None, eos_token_id=tiny.get("eos_token_id"), pad_token_id=tiny.get("pad_token_id"),
    ).save_pretrained(out)


def write_base(out: Path, shape: Shape, num_layers: int, shard_size: str, tokenizer_dir: Path,
               gen: torch.Generator) -> None:
    """A random-weight bf16 Qwen2 base of `shape` in `out`, written layer by layer into
    `shard_size` safetensors shards (no model is built; at most one shard in memory), with its
    config.json and the tokenizer files of `tokenizer_dir`."""
    writer = ShardedWriter(out, parse_size(shard_size))
    writer.add("model.embed_tokens.weight", random_tensor("embed", (shape.vocab, shape.hidden), gen))
    for i in range(num_layers):
        for name, dims in layer_shapes(i, shape).items():
            writer.add(name, random_tensor(name, dims, gen))
    writer.add("model.norm.weight", random_tensor("model.norm.weight", (shape.hidden,), gen))
    writer.add("lm_head.weight", random_tensor("lm_head", (shape.vocab, shape.hidden), gen))
    writer.close()
    write_config(out, num_layers, tokenizer_dir, shape)
    for name in SIDE_FILES:
        if name not in ("config.json", "generation_config.json") and (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out / name)


def build_stage2_base(out: Path, size_bytes: int, input_shard: str, rank: int, tokenizer_dir: Path, seed: int) -> dict:
    """Write the base layer by layer (never more than one input shard in memory), then the
    knowledge adapter and the stage-2 manifest. Returns {"num_layers", "scale", "knowledge"}."""
    gen = torch.Generator().manual_seed(seed)
    num_layers = num_layers_for(size_bytes)
    write_base(out, Shape(), num_layers, input_shard, tokenizer_dir, gen)

    targets = [f"model.layers.{i}.mlp.{proj}" for i in range(num_layers) for proj in FFN]
    knowledge = random_loras(targets, rank, gen)
    from safetensors.torch import save_file

    save_file(knowledge, str(out / KNOWLEDGE_FILE))
    scale = lora_scale(TrainConfig.lora_alpha, rank, False)
    write_manifest(out, new_manifest(STAGE2_BASE, {
        "stage1_checkpoint": "synthetic (bench/export_rss.py)",
        "original_base_model": "synthetic",
        "files": record_files(out, cache=True),
        "base_fingerprint": base_fingerprint(out),
        "merged_attention_targets": [],
        "knowledge": {"targets": targets, "rank": rank, "scale": scale},
        "versions": versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }))
    check_stage2_base(out)  # the same checks stage 2 runs on a prepared base
    return {"num_layers": num_layers, "scale": scale, "knowledge": knowledge}


def ffn_shape(target: str) -> tuple[int, int]:
    """(d_out, d_in) of an FFN projection."""
    return (HIDDEN, INTERMEDIATE) if target.endswith("down_proj") else (INTERMEDIATE, HIDDEN)


def random_loras(targets: list[str], rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """{"{target}.lora_A": [rank, d_in], "{target}.lora_B": [d_out, rank]}, fp32, non-zero."""
    out = {}
    for target in targets:
        d_out, d_in = ffn_shape(target)
        out[f"{target}.lora_A"] = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
        out[f"{target}.lora_B"] = torch.randn(d_out, rank, generator=gen) * 0.01
    return out


def write_stage2_checkpoint(base: Path, out: Path, knowledge: dict, rank: int, seed: int) -> Path:
    """A stage-2 checkpoint (as stage 2 saves it) with random alignment LoRAs, no model built."""
    gen = torch.Generator().manual_seed(seed + 1)
    targets = sorted({name.rsplit(".", 1)[0] for name in knowledge})
    alignment = random_loras(targets, rank, gen)
    adapters = {f"knowledge.{k}": v for k, v in knowledge.items()} | {f"alignment.{k}": v for k, v in alignment.items()}
    layout: dict[str, dict] = {}
    for name, t in adapters.items():
        layout.setdefault(name.split(".", 1)[0], {})[name] = list(t.shape)
    cfg = TrainConfig(stage=2, model=str(base), data=["unused"], lora_r=rank)
    manifest = {"stage": 2, "base_model": str(base), "base_fingerprint": base_fingerprint(base),
                "adapter_layout": layout, "versions": versions()}
    return save_checkpoint(out, TrainState(step=1), adapters, {}, cfg.to_dict(), manifest)


# --- measuring a child process ------------------------------------------------------------------


def _status_kb(pid: int) -> dict[str, int]:
    """VmHWM, RssAnon, RssFile of a live process, in kB ({} once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def measure(cmd: list[str], log: Path, interval: float = 0.005) -> dict:
    """Run `cmd` in a child; its peak RSS, peak RssAnon and peak RssFile in bytes, and its wall time.

    Peak RSS is VmHWM, the kernel's high-water mark of the child's RSS since its exec: monotonic,
    so polling it until the child exits misses only the last few ms of the interpreter's
    shutdown. (wait4's ru_maxrss is not used: Linux carries the pre-exec high-water mark of the
    forked child into it, i.e. the RSS of this benchmark process, which holds torch too.)
    RssAnon and RssFile have no high-water mark of their own: their peaks are sampled."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            for key, kb in _status_kb(proc.pid).items():
                peak[key] = max(peak[key], kb)
            time.sleep(interval)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    return {"peak": peak["VmHWM"] * 1024, "anon": peak["RssAnon"] * 1024, "file": peak["RssFile"] * 1024,
            "seconds": time.perf_counter() - start}


FLOOR = (
    "import torch, transformers, deepspeed, medcare_dist.cli, medcare_dist.artefacts.export\n"
    "from medcare_dist.artefacts.manifest import versions; versions()\n"
)
NAIVE = (
    "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
    "n = 0\n"
    "for p in model.parameters():  # touch every weight, as any use of the model does (transformers may\n"
    "    p.sum(); n += p.numel()    # leave bf16 weights as untouched views of the memory-mapped file)\n"
    "print(n, 'parameters loaded')\n"
)


# --- checking an export ------------------------------------------------------------------------


def check_export(out: Path, base: Path, ckpt: Path, scale: float) -> None:
    """Same tensor names as the base; one merged FFN projection and one untouched tensor exact."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    got, want = weight_files(out), weight_files(base)
    assert set(got) == set(want), f"exported tensor names differ from the base: {sorted(set(got) ^ set(want))[:5]}"
    adapters = load_file(str(ckpt / "adapters.safetensors"))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        target = name[: -len(".weight")]
        with safe_open(str(want[name]), framework="pt") as f:
            expected = f.get_tensor(name).float()
        if f"knowledge.{target}.lora_A" in adapters:
            for group in ("knowledge", "alignment"):
                expected += scale * (adapters[f"{group}.{target}.lora_B"] @ adapters[f"{group}.{target}.lora_A"])
        with safe_open(str(got[name]), framework="pt") as f:
            exported = f.get_tensor(name)
        assert exported.dtype == DTYPE and torch.equal(exported, expected.to(DTYPE)), f"{name}: exported weight is wrong"


# --- the benchmark ------------------------------------------------------------------------------


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.2, help="model size at least this many GB (bf16)")
    parser.add_argument("--shard-sizes", nargs="+", default=["200MB", "1GB"], help="export --max-shard-size values to try")
    parser.add_argument("--input-shard-size", default="500MB", help="shard size of the synthetic stage-2 base")
    parser.add_argument("--rank", type=int, default=32, help="rank of the knowledge and alignment LoRAs")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="export --dtype")
    parser.add_argument("--no-naive", action="store_true", help="skip the from_pretrained baseline")
    parser.add_argument("--workdir", default=None, help="where to write the artefacts (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (default: delete what this run wrote)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="medcare-export-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    made = [work / n for n in ("tiny", "stage2-base", "run", "logs")] + [work / f"export-{s}" for s in args.shard_sizes]
    if any(p.exists() for p in made):
        sys.exit(f"{work} already holds the output of an earlier run; pass another --workdir")
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"\nartefacts kept in {work}")
        elif args.workdir:
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    logs = work / "logs"
    logs.mkdir()
    py = sys.executable

    t0 = time.perf_counter()
    subprocess.run([py, "-m", "medcare_dist", "tiny-model", "--out", str(work / "tiny")], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    base = work / "stage2-base"
    built = build_stage2_base(base, int(args.size_gb * 1e9), args.input_shard_size, args.rank, work / "tiny", args.seed)
    ckpt = write_stage2_checkpoint(base, work / "run", built["knowledge"], args.rank, args.seed)
    del built["knowledge"]
    model_bytes = dir_bytes(base, "model*.safetensors")
    layer_bytes = nbytes(layer_shapes(0))
    largest = max(VOCAB * HIDDEN, INTERMEDIATE * HIDDEN) * BYTES
    adapter_bytes = (ckpt / "adapters.safetensors").stat().st_size
    print(f"built in {time.perf_counter() - t0:.0f} s under {work}:")
    print(f"  stage-2 base   {model_bytes / MB:8.0f} MB bf16, {built['num_layers']} layers x {layer_bytes / MB:.1f} MB "
          f"(hidden {HIDDEN}, FFN {INTERMEDIATE}, vocab {VOCAB}), {len(list(base.glob('model*.safetensors')))} input "
          f"shards of <= {args.input_shard_size}, {len(weight_files(base))} tensors, largest {largest / MB:.0f} MB")
    print(f"  checkpoint     {adapter_bytes / MB:8.1f} MB of fp32 adapters (knowledge + alignment, rank {args.rank}, "
          f"{3 * built['num_layers']} FFN projections each), scale {built['scale']}")

    rows = []
    floor = measure([py, "-c", FLOOR], logs / "floor.log")
    rows.append(("floor (imports only)", None, floor))
    if not args.no_naive:
        rows.append(("naive from_pretrained", None, measure([py, "-c", NAIVE, str(base)], logs / "naive.log")))
    for size in args.shard_sizes:
        out = work / f"export-{size}"
        cmd = [py, "-m", "medcare_dist", "export", "--checkpoint", str(ckpt), "--out", str(out),
               "--dtype", args.dtype, "--max-shard-size", size]
        result = measure(cmd, logs / f"export-{size}.log")
        shards = sorted(out.glob("model*.safetensors"))
        result["shards"], result["largest_shard"] = len(shards), max(f.stat().st_size for f in shards)
        if args.dtype == "bf16":
            check_export(out, base, ckpt, built["scale"])
        shutil.rmtree(out)
        rows.append((f"export --max-shard-size {size}", size, result))

    print("\nchild peaks (MB = 1e6 B): RSS = VmHWM; anon, file = sampled peaks of RssAnon, RssFile;"
          " +floor = above the floor child's")
    print(f"{'child':30} {'time s':>6} {'RSS':>6} {'+floor':>6} {'/model':>6} {'/shard':>6} "
          f"{'anon':>6} {'+floor':>6} {'file':>6} {'+floor':>6}  output")
    for label, size, r in rows:
        line = f"{label:30} {r['seconds']:6.1f} {r['peak'] / MB:6.0f} "
        if r is floor:
            line += f"{'':6} {'':6} {'':6} {r['anon'] / MB:6.0f} {'':6} {r['file'] / MB:6.0f}"
        else:
            over = r["peak"] - floor["peak"]
            per_shard = f"{over / parse_size(size):6.2f}" if size else ""
            line += (f"{over / MB:6.0f} {over / model_bytes:6.2f} {per_shard:>6} "
                     f"{r['anon'] / MB:6.0f} {(r['anon'] - floor['anon']) / MB:6.0f} "
                     f"{r['file'] / MB:6.0f} {(r['file'] - floor['file']) / MB:6.0f}")
        if size:
            line += f"  {r['shards']} shards, largest {r['largest_shard'] / MB:.0f} MB"
        print(line)
    print(f"\nmodel {model_bytes / MB:.0f} MB; one decoder layer {layer_bytes / MB:.1f} MB; largest tensor "
          f"{largest / MB:.0f} MB; one FFN projection {INTERMEDIATE * HIDDEN * BYTES / MB:.1f} MB "
          f"({INTERMEDIATE * HIDDEN * 4 / MB:.1f} MB in fp32); adapters {adapter_bytes / MB:.1f} MB")
    print("/model = (RSS - floor RSS) / model size; /shard = (RSS - floor RSS) / --max-shard-size")
    print("the claim to check, above the floor: one output shard + one decoder layer + the adapters = " + ", ".join(
        f"{(parse_size(size) + layer_bytes + adapter_bytes) / MB:.0f} MB at {size}" for size in args.shard_sizes))

if __name__ == "__main__":
    main()
