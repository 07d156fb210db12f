"""Load any artefact of the pipeline as a ready-to-run model, in one process, without
DeepSpeed: for evaluation, export checks and tests (the kinds: manifest.artefact_kind).

    plain HF model dir                 the model
    prepared stage-2 base              the merged base + the knowledge adapter (= stage 1 minus the Noise Aggregator)
    stage-1 checkpoint                 its base + attention LoRA + mixture of LoRA experts
    stage-2 checkpoint                 its stage-2 base + knowledge + alignment adapters
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.artefacts.hf_model import load_frozen_base
from medcare_dist.artefacts.hub import resolve_model
from medcare_dist.artefacts.manifest import (
    ADAPTERS_FILE, HF_MODEL, STAGE1_CHECKPOINT, STAGE2_BASE, artefact_kind, base_model_dir, checkpoint_config, read_manifest,
    verify_artefact,
)
from medcare_dist.artefacts.stage2_base import adapters_on_stage2_base, read_knowledge
from medcare_dist.method.stage1 import stage1_adapters
from medcare_dist.method.stage2 import knowledge_adapters


def load_adapters(model: torch.nn.Module, path: str | Path) -> AdapterSet | None:
    """The adapters an artefact adds to `model` (its base), weights loaded; None for plain HF."""
    kind = artefact_kind(path)
    if kind == HF_MODEL:
        return None
    if kind == STAGE2_BASE:
        return knowledge_adapters(model, read_knowledge(path))
    cfg = checkpoint_config(path)
    adapters = (stage1_adapters if kind == STAGE1_CHECKPOINT else adapters_on_stage2_base)(model, cfg)
    adapters.load_flat_state_dict(load_file(str(Path(path) / ADAPTERS_FILE)))
    return adapters


def base_dir_of(path: str | Path) -> Path:
    """The HF model dir an artefact runs on."""
    kind = artefact_kind(path)
    if kind == HF_MODEL:  # a local dir or a hub name
        return Path(resolve_model(str(path)).path)
    if kind == STAGE2_BASE:
        return Path(path)
    return base_model_dir(read_manifest(path))


def load_trained_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model in eval mode with the artefact's adapters attached, tokenizer, adapters or None)."""
    from transformers import AutoTokenizer

    if artefact_kind(path) != HF_MODEL:
        verify_artefact(path)  # digests, and a base unchanged since the artefact was made
    base = base_dir_of(path)
    model = load_frozen_base(str(base), None, dtype, trust_remote_code)
    adapters = load_adapters(model, path)
    if adapters is not None:
        adapters.to(dtype).attach(model)
        adapters.eval()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    return model, tokenizer, adapters
