"""The prepared stage-2 base: its writer (`prepare_stage2`), its checks and its reader.

    model*.safetensors (+ index), config, tokenizer    the base with the attention LoRA merged in
    knowledge_adapter.safetensors                       the Knowledge Aggregator, "{target}.lora_A|B"
    manifest.json                                       format medcare_dist/stage2-base: inputs, file
                                                        digests, rank and scale of the knowledge adapter

What goes where between the stages is the method's (`method.stage1.split_for_stage2`); this
module writes and reads the result. Streamed tensor by tensor on CPU (hf_io.merge_into_base).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medcare_dist.adapters.lora import LoRA, lora_scale
from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.artefacts.hf_io import merge_into_base, weight_files
from medcare_dist.artefacts.manifest import (
    ADAPTERS_FILE, HF_MODEL, KNOWLEDGE_FILE, STAGE1_CHECKPOINT, STAGE2_BASE, artefact_kind, base_fingerprint, base_model_dir,
    checkpoint_config, new_manifest, read_manifest, record_files, verify_artefact, versions, write_manifest,
)
from medcare_dist.config import TrainConfig
from medcare_dist.errors import CheckpointError
from medcare_dist.files import require_empty_dir
from medcare_dist.method.stage1 import split_for_stage2
from medcare_dist.method.stage2 import Knowledge, stage2_adapters


def knowledge_tensor_name(target: str, param: str) -> str:
    return f"{target}.{param}"


def prepare_stage2(stage1_checkpoint: str | Path, out_dir: str | Path, max_shard_size: str = "5GB", log=print) -> Path:
    """Merge the attention LoRA into the base, keep the Knowledge Aggregator, drop the
    Noise Aggregator."""
    ckpt, out = Path(stage1_checkpoint), Path(out_dir)
    kind = artefact_kind(ckpt) if ckpt.is_dir() else None
    if kind != STAGE1_CHECKPOINT:
        what = "does not exist (a typo, or pruned by the run's keep_last?)" if kind is None else f"a {kind}"
        raise CheckpointError(f"{ckpt}: {what}, not a stage-1 checkpoint")
    manifest = read_manifest(ckpt)
    require_empty_dir(out)
    verify_artefact(ckpt)  # its files' digests, and a base whose weights have not changed since stage 1
    cfg = checkpoint_config(ckpt)
    base_dir = base_model_dir(manifest)
    scale = lora_scale(cfg.lora_alpha, cfg.lora_r, cfg.use_rslora)
    attn, ka = split_for_stage2(load_file(str(ckpt / ADAPTERS_FILE)))
    ffn = sorted(ka)
    tensor_names = set(weight_files(base_dir))
    missing = [t for t in sorted(attn) + ffn if f"{t}.weight" not in tensor_names]
    if missing:
        raise CheckpointError(f"{ckpt}: adapter targets {missing[:3]} have no weight in base {base_dir}")

    merged, _ = merge_into_base(base_dir, out, {t: [pair] for t, pair in attn.items()}, scale, max_shard_size)
    knowledge = {}
    for target in ffn:
        for param, tensor in zip(LoRA.PAIR, ka[target]):
            knowledge[knowledge_tensor_name(target, param)] = tensor.contiguous()
    save_file(knowledge, str(out / KNOWLEDGE_FILE))
    rank = int(ka[ffn[0]][0].shape[0]) if ffn else 0
    write_manifest(out, new_manifest(STAGE2_BASE, {
        "stage1_checkpoint": str(ckpt.resolve()),
        "stage1_step": manifest.get("step"),
        "original_base_model": manifest["base_model"],
        "original_base_source": manifest.get("base_source"),
        "original_base_fingerprint": manifest["base_fingerprint"],
        "files": record_files(out, cache=True),  # the weights hashed once here; later checks read the cache
        "base_fingerprint": base_fingerprint(out),
        "merged_attention_targets": sorted(attn),
        "dropped": "Noise Aggregator (routed experts and routers)",
        "knowledge": {"targets": ffn, "rank": rank, "scale": scale},
        "versions": versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }))
    log(f"stage-2 base written to {out}: {merged} attention projections merged, knowledge adapter on {len(ffn)} FFN projections (rank {rank})")
    return out


def check_stage2_base(model_dir: str | Path) -> dict:
    """Refuse anything that is not a complete prepared stage-2 base, before any heavy work."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"stage-2 base {path} does not exist; make it with `medcare-dist prepare-stage2 --stage1 CKPT --out {path}`")
    kind = artefact_kind(path)
    if kind == HF_MODEL:
        raise CheckpointError(f"{path} is not a prepared stage-2 base (no manifest.json); make one with `medcare-dist prepare-stage2`")
    if kind == STAGE1_CHECKPOINT:
        raise CheckpointError(f"{path} is a stage-1 checkpoint, not a stage-2 base: run `medcare-dist prepare-stage2 --stage1 {path} --out DIR` and pass DIR")
    manifest = read_manifest(path)
    if kind != STAGE2_BASE:
        raise CheckpointError(f"{path}: a {kind}, expected a prepared stage-2 base")
    if not (path / KNOWLEDGE_FILE).exists():
        raise CheckpointError(f"{path}: {KNOWLEDGE_FILE} is missing")
    verify_artefact(path)  # the digests its manifest records, and the weights' fingerprint
    files = weight_files(path)
    with safe_open(str(path / KNOWLEDGE_FILE), framework="pt") as know:
        for target in manifest["knowledge"]["targets"]:
            weight = f"{target}.weight"
            if weight not in files:
                raise CheckpointError(f"{path}: knowledge adapter targets {target}, which the base does not have")
            with safe_open(str(files[weight]), framework="pt") as f:
                d_out, d_in = f.get_slice(weight).get_shape()
            a = know.get_slice(knowledge_tensor_name(target, LoRA.PAIR[0])).get_shape()
            b = know.get_slice(knowledge_tensor_name(target, LoRA.PAIR[1])).get_shape()
            if a[1] != d_in or b[0] != d_out:
                raise CheckpointError(f"{path}: knowledge adapter {target} is {b[0]}x{a[1]}, base weight is {d_out}x{d_in}")
    return manifest


def read_knowledge(model_dir: str | Path) -> Knowledge:
    """The knowledge adapter of a prepared stage-2 base, as stage 2 starts from it."""
    manifest = read_manifest(model_dir)
    tensors = load_file(str(Path(model_dir) / KNOWLEDGE_FILE))
    pairs = {target: tuple(tensors[knowledge_tensor_name(target, p)] for p in LoRA.PAIR) for target in manifest["knowledge"]["targets"]}
    return Knowledge(pairs=pairs, rank=manifest["knowledge"]["rank"], scale=manifest["knowledge"]["scale"])


def adapters_on_stage2_base(model: torch.nn.Module, cfg: TrainConfig) -> AdapterSet:
    """The stage-2 adapters on the prepared base `cfg.model` (the knowledge adapter read from it)."""
    return stage2_adapters(model, cfg, read_knowledge(cfg.model))
