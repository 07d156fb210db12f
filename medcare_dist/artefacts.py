"""Load any artefact of the pipeline as a ready-to-run model, in one process, without
DeepSpeed: for evaluation, export and tests.

    plain HF model dir                 the model
    prepared stage-2 base              the merged base + the knowledge adapter (= stage 1 minus the Noise Aggregator)
    stage-1 checkpoint                 its base + attention LoRA + mixture of LoRA experts
    stage-2 checkpoint                 its stage-2 base + knowledge + alignment adapters
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapter_set import AdapterSet
from .checkpoint import ADAPTERS_FILE, MANIFEST_FILE
from .config import TrainConfig
from .hf_io import resolve_model_dir
from .model import load_frozen_base


def describe(path: str | Path) -> str:
    """"hf", "stage2-base", "stage1-checkpoint" or "stage2-checkpoint"."""
    from .stage2 import STAGE2_KIND

    root = Path(path)
    manifest_file = root / MANIFEST_FILE
    if not manifest_file.exists():
        return "hf"
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("kind") == STAGE2_KIND:
        return "stage2-base"
    if manifest.get("stage") in (1, 2) and (root / ADAPTERS_FILE).exists():
        return f"stage{manifest['stage']}-checkpoint"
    raise ValueError(f"{root}: unrecognised manifest (neither a checkpoint nor a stage-2 base)")


def checkpoint_config(checkpoint: str | Path) -> TrainConfig:
    return TrainConfig(**json.loads((Path(checkpoint) / "config.json").read_text()))


def load_adapters(model: torch.nn.Module, path: str | Path) -> AdapterSet | None:
    """The adapters an artefact adds to `model` (its base), weights loaded; None for plain HF."""
    from .model import stage1_adapters
    from .stage2 import stage2_adapters

    kind = describe(path)
    if kind == "hf":
        return None
    if kind == "stage2-base":
        adapters = stage2_adapters(model, TrainConfig(stage=2, model=str(path), data=["-"]))
        adapters.drop_group("alignment")
        return adapters
    cfg = checkpoint_config(path)
    adapters = (stage1_adapters if cfg.stage == 1 else stage2_adapters)(model, cfg)
    adapters.load_flat_state_dict(load_file(str(Path(path) / ADAPTERS_FILE)))
    return adapters


def base_dir_of(path: str | Path) -> Path:
    """The HF model dir an artefact runs on."""
    kind = describe(path)
    if kind in ("hf", "stage2-base"):
        return Path(path)
    return resolve_model_dir(checkpoint_config(path).model)


def load_trained_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model in eval mode with the artefact's adapters attached, tokenizer, adapters or None)."""
    from transformers import AutoTokenizer

    base = base_dir_of(path)
    model = load_frozen_base(str(base), None, dtype, trust_remote_code)
    adapters = load_adapters(model, path)
    if adapters is not None:
        adapters.to(dtype).attach(model)
        adapters.eval()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    return model, tokenizer, adapters
