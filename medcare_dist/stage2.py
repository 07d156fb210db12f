"""Between the stages and stage 2 itself: the stage-2 base, the two adapters, the
orthogonality objective.

    stage-1 checkpoint --prepare_stage2--> stage-2 base dir:
        model*.safetensors (+ index), config, tokenizer    base with the attention LoRA merged in
        knowledge_adapter.safetensors                       the Knowledge Aggregator, "{target}.lora_A|B"
        manifest.json                                       kind, inputs, rank and scale of the adapter
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter_set import AdapterSet
from .adapters import LoRA, lora_scale
from .checkpoint import ADAPTERS_FILE, CheckpointError, base_fingerprint, read_manifest, versions
from .config import ConfigError, TrainConfig
from .losses import orthogonal_penalty
from .hf_io import ShardedWriter, copy_side_files, iter_tensors, parse_size, resolve_model_dir, weight_files
from .model import linear_targets
from .trainer import Objective

STAGE2_KIND = "medcare_dist/stage2-base"
KNOWLEDGE_FILE = "knowledge_adapter.safetensors"


def stage1_config(checkpoint: Path) -> TrainConfig:
    return TrainConfig(**json.loads((Path(checkpoint) / "config.json").read_text()))


def prepare_stage2(stage1_checkpoint: str | Path, out_dir: str | Path, max_shard_size: str = "5GB", log=print) -> Path:
    """Merge the attention LoRA into the base, keep the Knowledge Aggregator, drop the
    Noise Aggregator. Streams tensor by tensor: memory is about one output shard."""
    ckpt, out = Path(stage1_checkpoint), Path(out_dir)
    manifest = read_manifest(ckpt)
    if manifest.get("stage") != 1:
        raise CheckpointError(f"{ckpt}: a stage-{manifest.get('stage')} artefact, not a stage-1 checkpoint")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} exists and is not empty")
    cfg = stage1_config(ckpt)
    base_dir = resolve_model_dir(manifest["base_model"])
    if base_fingerprint(base_dir) != manifest["base_fingerprint"]:
        raise CheckpointError(f"base model {base_dir} differs from the one stage 1 trained on (fingerprint mismatch)")
    adapters = load_file(str(ckpt / ADAPTERS_FILE))
    scale = lora_scale(cfg.lora_alpha, cfg.lora_r, cfg.use_rslora)

    attn = {name[len("attn_lora."):-len(".lora_A")] for name in adapters if name.startswith("attn_lora.") and name.endswith(".lora_A")}
    ffn = sorted({name[len("molora."):-len(".ka_A")] for name in adapters if name.startswith("molora.") and name.endswith(".ka_A")})
    tensor_names = set(weight_files(base_dir))
    missing = [t for t in sorted(attn) + ffn if f"{t}.weight" not in tensor_names]
    if missing:
        raise CheckpointError(f"{ckpt}: adapter targets {missing[:3]} have no weight in base {base_dir}")

    writer = ShardedWriter(out, parse_size(max_shard_size))
    merged = 0
    for name, tensor in iter_tensors(base_dir):
        target = name[: -len(".weight")]
        if target in attn:
            a, b = adapters[f"attn_lora.{target}.lora_A"], adapters[f"attn_lora.{target}.lora_B"]
            tensor = tensor.to(torch.float32, copy=True).addmm_(b, a, alpha=scale).to(tensor.dtype)
            merged += 1
        writer.add(name, tensor)
    writer.close()
    copy_side_files(base_dir, out)
    knowledge = {}
    for target in ffn:
        knowledge[f"{target}.lora_A"] = adapters[f"molora.{target}.ka_A"].contiguous()
        knowledge[f"{target}.lora_B"] = adapters[f"molora.{target}.ka_B"].contiguous()
    save_file(knowledge, str(out / KNOWLEDGE_FILE))
    rank = int(next(iter(knowledge.values())).shape[0]) if knowledge else 0
    (out / "manifest.json").write_text(json.dumps({
        "kind": STAGE2_KIND,
        "stage1_checkpoint": str(ckpt.resolve()),
        "stage1_step": manifest.get("step"),
        "original_base_model": manifest["base_model"],
        "original_base_fingerprint": manifest["base_fingerprint"],
        "base_fingerprint": base_fingerprint(out),
        "merged_attention_targets": sorted(attn),
        "dropped": "Noise Aggregator (routed experts and routers)",
        "knowledge": {"targets": ffn, "rank": rank, "scale": scale},
        "versions": versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2) + "\n")
    log(f"stage-2 base written to {out}: {merged} attention projections merged, knowledge adapter on {len(ffn)} FFN projections (rank {rank})")
    return out


def check_stage2_base(model_dir: str | Path) -> dict:
    """Refuse anything that is not a complete prepared stage-2 base, before any heavy work."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"stage-2 base {path} does not exist; make it with `medcare-dist prepare-stage2 --stage1 CKPT --out {path}`")
    manifest_file = path / "manifest.json"
    if not manifest_file.exists():
        raise ConfigError(f"{path} is not a prepared stage-2 base (no manifest.json); make one with `medcare-dist prepare-stage2`")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("stage") == 1:
        raise ConfigError(f"{path} is a stage-1 checkpoint, not a stage-2 base: run `medcare-dist prepare-stage2 --stage1 {path} --out DIR` and pass DIR")
    if manifest.get("kind") != STAGE2_KIND:
        raise ConfigError(f"{path}: manifest kind {manifest.get('kind') or manifest.get('stage')!r}, expected a prepared stage-2 base")
    if not (path / KNOWLEDGE_FILE).exists():
        raise ConfigError(f"{path}: {KNOWLEDGE_FILE} is missing")
    if base_fingerprint(path) != manifest["base_fingerprint"]:
        raise ConfigError(f"{path}: the weights or config changed after prepare-stage2 (fingerprint mismatch)")
    files = weight_files(path)
    with safe_open(str(path / KNOWLEDGE_FILE), framework="pt") as know:
        for target in manifest["knowledge"]["targets"]:
            weight = f"{target}.weight"
            if weight not in files:
                raise ConfigError(f"{path}: knowledge adapter targets {target}, which the base does not have")
            with safe_open(str(files[weight]), framework="pt") as f:
                d_out, d_in = f.get_slice(weight).get_shape()
            a, b = know.get_slice(f"{target}.lora_A").get_shape(), know.get_slice(f"{target}.lora_B").get_shape()
            if a[1] != d_in or b[0] != d_out:
                raise ConfigError(f"{path}: knowledge adapter {target} is {b[0]}x{a[1]}, base weight is {d_out}x{d_in}")
    return manifest


def stage2_adapters(model: torch.nn.Module, cfg: TrainConfig) -> AdapterSet:
    """Knowledge adapter (from the stage-1 KA) + a new alignment adapter of the same rank and
    scale on each FFN projection; alignment also on attention with `align_attention`."""
    manifest = json.loads((Path(cfg.model) / "manifest.json").read_text())
    rank, scale = manifest["knowledge"]["rank"], manifest["knowledge"]["scale"]
    knowledge = load_file(str(Path(cfg.model) / KNOWLEDGE_FILE))
    adapters = AdapterSet()
    ffn = linear_targets(model, cfg.ffn_targets)
    for path, linear in ffn:
        know = LoRA(linear.in_features, linear.out_features, rank, scale, cfg.lora_dropout)
        with torch.no_grad():
            know.lora_A.copy_(knowledge[f"{path}.lora_A"])
            know.lora_B.copy_(knowledge[f"{path}.lora_B"])
        know.requires_grad_(not cfg.freeze_knowledge)
        adapters.add("knowledge", path, know)
    align_targets = ffn + (linear_targets(model, cfg.attn_targets) if cfg.align_attention else [])
    for path, linear in align_targets:
        adapters.add("alignment", path, LoRA(linear.in_features, linear.out_features, rank, scale, cfg.lora_dropout))
    return adapters


class OrthogonalObjective(Objective):
    def __init__(self, adapters: AdapterSet, ortho_lambda: float):
        self.adapters, self.ortho_lambda = adapters, ortho_lambda
        self._last = float("nan")

    def step_losses(self) -> dict[str, torch.Tensor]:
        if self.ortho_lambda == 0:  # logged for comparison, but no backward to pay for
            with torch.no_grad():
                self._last = float(orthogonal_penalty(self.adapters))
            return {}
        penalty = orthogonal_penalty(self.adapters)
        self._last = float(penalty.detach())
        return {"ortho": self.ortho_lambda * penalty}

    def metrics(self) -> dict:
        return {"ortho_penalty": self._last}  # unweighted, so runs with different lambda compare
