"""Exports of trained checkpoints, on CPU, streamed tensor by tensor (memory: about one output
shard; hf_io.py): nothing here imports the training stack.

- `export_merged`: a stage-2 checkpoint -> a plain HF model dir: base + knowledge adapter +
  alignment adapter merged into the weights (W += scale * (B_k A_k + B_a A_a)).
- `export_adapter`: a stage-2 checkpoint -> one PEFT LoRA adapter on the stage-2 base. Two
  LoRAs with the same scale on the same layer are one LoRA of the summed rank:
  [B_k B_a] @ [A_k; A_a] = B_k A_k + B_a A_a. On a stage-1 checkpoint: the attention LoRA as
  a PEFT adapter on the original base, and the mixture-of-LoRA weights in `molora.safetensors`.

The layouts written are described in docs/export.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medcare_dist.adapters.lora import LoRA, lora_scale
from medcare_dist.artefacts.hf_io import merge_into_base
from medcare_dist.artefacts.manifest import (
    ADAPTERS_FILE, STAGE1_CHECKPOINT, STAGE2_CHECKPOINT, artefact_kind, base_model_dir, checkpoint_config, read_manifest,
    verify_artefact, versions,
)
from medcare_dist.artefacts.stage2_base import read_knowledge
from medcare_dist.errors import CheckpointError, InputNotFoundError
from medcare_dist.files import require_empty_dir
from medcare_dist.method import stage2
from medcare_dist.method.stage1 import ATTENTION, MOLORA

MOLORA_FILE = "molora.safetensors"  # a stage-1 adapter export's mixture-of-LoRA weights
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def stage2_deltas(checkpoint: Path) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], float]:
    """{target: [(A, B), ...]} of every stage-2 LoRA, and their common scale."""
    scale = read_knowledge(base_model_dir(read_manifest(checkpoint))).scale
    return stage2.merge_pairs(load_file(str(checkpoint / ADAPTERS_FILE))), scale


def _require(checkpoint: Path, kinds: tuple[str, ...], what: str) -> str:
    if not checkpoint.is_dir():
        raise InputNotFoundError(f"{checkpoint} does not exist (a typo, or pruned by the run's keep_last?); {what} needs "
                                 f"a {' or '.join(kinds)}")
    kind = artefact_kind(checkpoint)
    if kind not in kinds:
        raise CheckpointError(f"{checkpoint} is a {kind}; {what} needs a {' or '.join(kinds)}")
    return kind


def _model_card(out: Path, checkpoint: Path, manifest: dict, how: str) -> None:
    """README.md, tagged with the base's (and so the export's) architecture, its config's model_type."""
    model_type = json.loads((base_model_dir(manifest) / "config.json").read_text()).get("model_type", "unknown")
    out.joinpath("README.md").write_text(
        f"---\nlibrary_name: transformers\ntags: [medical, medcare, {model_type}]\n---\n\n"
        f"# {out.name}\n\n"
        "A medical chat model trained with the two-stage MedCare method by medcare_dist "
        "(knowledge aggregation with a mixture of LoRA experts, then clinical alignment with an "
        "orthogonality penalty between the alignment and knowledge adapters).\n\n"
        f"{how}\n\n"
        f"- source checkpoint: `{checkpoint}` (stage {manifest.get('stage')}, step {manifest.get('step')})\n"
        f"- stage-2 base: `{manifest.get('base_model')}`\n"
        f"- exported: {time.strftime('%Y-%m-%d')} with medcare_dist {versions()['medcare_dist']}\n\n"
        "Sample data and the tiny default model are for smoke tests only; this card says nothing "
        "about clinical quality. Do not use a model for medical decisions without evaluation.\n"
    )


def export_merged(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bf16", max_shard_size: str = "5GB", log=print) -> Path:
    """Stage-2 checkpoint -> plain HF model dir, never holding the whole model in memory."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    kind = artefact_kind(checkpoint)
    if kind == STAGE1_CHECKPOINT:
        raise CheckpointError(f"{checkpoint} is a stage-1 checkpoint: its routed experts cannot be merged into dense weights. "
                              "Run prepare-stage2 (a plain HF model of the merged base) or export --adapter-only")
    _require(checkpoint, (STAGE2_CHECKPOINT,), "a merged export")
    require_empty_dir(out)
    manifest = verify_artefact(checkpoint)  # digests, and its stage-2 base unchanged since training
    base = base_model_dir(manifest)
    deltas, scale = stage2_deltas(checkpoint)
    merged, shards = merge_into_base(base, out, deltas, scale, max_shard_size, DTYPES[dtype])
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _model_card(out, checkpoint, manifest, f"Weights: the stage-2 base with the knowledge and alignment adapters merged ({merged} projections), {dtype}.")
    log(f"exported {merged} merged projections into {len(shards)} shard(s) at {out}")
    return out


def _peft_config(targets: list[str], ranks: dict[str, int], scale: float, base: str):
    """A PEFT LoraConfig that reproduces `scale` for every target (rank per module if they differ)."""
    from peft import LoraConfig

    leaf_ranks: dict[str, int] = {}
    for target in targets:
        leaf_ranks.setdefault(target.rsplit(".", 1)[-1], ranks[target])
    r = max(leaf_ranks.values())
    return LoraConfig(
        r=r,
        lora_alpha=scale * r,
        target_modules=sorted(leaf_ranks),
        rank_pattern={k: v for k, v in leaf_ranks.items() if v != r},
        alpha_pattern={k: scale * v for k, v in leaf_ranks.items() if v != r},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


def _write_peft(out: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, base: str) -> None:
    tensors = {}
    for target, (a, b) in pairs.items():
        tensors[f"base_model.model.{target}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{target}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    _peft_config(list(pairs), {t: a.shape[0] for t, (a, _) in pairs.items()}, scale, base).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))


def export_adapter(checkpoint: str | Path, out_dir: str | Path, log=print) -> Path:
    """PEFT adapter(s) of a checkpoint (see the module docstring)."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    kind = _require(checkpoint, (STAGE1_CHECKPOINT, STAGE2_CHECKPOINT), "--adapter-only")
    require_empty_dir(out)
    manifest = verify_artefact(checkpoint)
    cfg = checkpoint_config(checkpoint)
    if kind == STAGE2_CHECKPOINT:
        deltas, scale = stage2_deltas(checkpoint)
        fused = {t: (torch.cat([a for a, _ in p]), torch.cat([b for _, b in p], dim=1)) for t, p in deltas.items()}
        _write_peft(out, fused, scale, cfg.model)
        _model_card(out, checkpoint, manifest, "A PEFT LoRA adapter (knowledge and alignment adapters fused) for the stage-2 base named below.")
        log(f"wrote a PEFT adapter on {len(fused)} projections to {out} (base: {cfg.model})")
        return out
    adapters = load_file(str(checkpoint / ADAPTERS_FILE))
    scale = lora_scale(cfg.lora_alpha, cfg.lora_r, cfg.use_rslora)
    _write_peft(out, LoRA.pairs(adapters, ATTENTION), scale, cfg.model)
    molora = {k[len(MOLORA) + 1:]: v for k, v in adapters.items() if k.startswith(f"{MOLORA}.")}
    save_file(molora, str(out / MOLORA_FILE), metadata={
        "format": "medcare_dist.molora/1", "num_experts": str(cfg.num_experts), "top_k": str(cfg.top_k),
        "rank": str(cfg.lora_r), "shared_rank": str(cfg.lora_r * cfg.num_shared), "scale": str(scale),
    })
    _model_card(out, checkpoint, manifest, "Stage-1 adapters: the attention LoRA as a PEFT adapter on the original base; "
                "the mixture of LoRA experts in molora.safetensors (docs/export.md).")
    log(f"wrote the stage-1 attention LoRA (PEFT) and molora.safetensors to {out}")
    return out
