"""Stage 2 of MedCare, clinical alignment: what exists only in stage 2.

- `check_stage2_base`: the stage-2 input checks (a complete prepared stage-2 base, made by
  `medcare-dist prepare-stage2`, convert.py);
- `stage2_adapters`: the knowledge adapter (from the stage-1 Knowledge Aggregator) and a new
  alignment adapter on each FFN projection;
- `OrthogonalObjective`: loss = LM + lambda_1 * sum |A_know @ A_align^T|.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.adapters.lora import LoRA
from medcare_dist.artefacts.manifest import KNOWLEDGE_FILE, adapter_tensor_name, describe, read_manifest, verify_artefact
from medcare_dist.config import TrainConfig
from medcare_dist.errors import CheckpointError
from medcare_dist.artefacts.hf_io import weight_files
from medcare_dist.training.lm_loss import orthogonal_penalty
from medcare_dist.training.base_model import linear_targets
from medcare_dist.training.trainer import Objective


def check_stage2_base(model_dir: str | Path) -> dict:
    """Refuse anything that is not a complete prepared stage-2 base, before any heavy work."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"stage-2 base {path} does not exist; make it with `medcare-dist prepare-stage2 --stage1 CKPT --out {path}`")
    kind = describe(path)
    if kind == "hf":
        raise CheckpointError(f"{path} is not a prepared stage-2 base (no manifest.json); make one with `medcare-dist prepare-stage2`")
    if kind == "stage1-checkpoint":
        raise CheckpointError(f"{path} is a stage-1 checkpoint, not a stage-2 base: run `medcare-dist prepare-stage2 --stage1 {path} --out DIR` and pass DIR")
    manifest = read_manifest(path)
    if kind != "stage2-base":
        raise CheckpointError(f"{path}: manifest kind {manifest.get('kind') or manifest.get('stage')!r}, expected a prepared stage-2 base")
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
            a = know.get_slice(adapter_tensor_name(None, target, "lora_A")).get_shape()
            b = know.get_slice(adapter_tensor_name(None, target, "lora_B")).get_shape()
            if a[1] != d_in or b[0] != d_out:
                raise CheckpointError(f"{path}: knowledge adapter {target} is {b[0]}x{a[1]}, base weight is {d_out}x{d_in}")
    return manifest


def stage2_adapters(model: torch.nn.Module, cfg: TrainConfig) -> AdapterSet:
    """Knowledge adapter (from the stage-1 KA) + a new alignment adapter of the same rank and
    scale on each FFN projection; alignment also on attention with `align_attention`."""
    manifest = read_manifest(cfg.model)
    rank, scale = manifest["knowledge"]["rank"], manifest["knowledge"]["scale"]
    knowledge = load_file(str(Path(cfg.model) / KNOWLEDGE_FILE))
    adapters = AdapterSet()
    ffn = linear_targets(model, cfg.ffn_targets)
    for path, linear in ffn:
        know = LoRA(linear.in_features, linear.out_features, rank, scale, cfg.lora_dropout)
        with torch.no_grad():
            know.lora_A.copy_(knowledge[adapter_tensor_name(None, path, "lora_A")])
            know.lora_B.copy_(knowledge[adapter_tensor_name(None, path, "lora_B")])
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
