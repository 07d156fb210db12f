"""What `eval` runs: any pipeline artefact (`loading.load_trained_model`), or a PEFT adapter
(`export --adapter-only` of a stage-2 checkpoint, or any PEFT LoRA) on its plain base."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def check_model_args(model_path: str | None, adapter: str | None) -> tuple[str, str]:
    """(the model dir or hub name to load, its kind) from --model / --adapter; raises before
    any loading when a path is missing or the pair cannot work."""
    from medcare_dist.artefacts.export import MOLORA_FILE
    from medcare_dist.artefacts.manifest import HF_MODEL, STAGE2_BASE, artefact_kind
    from medcare_dist.errors import CheckpointError, ConfigError, InputNotFoundError

    if adapter is not None:
        config_file = Path(adapter) / "adapter_config.json"
        if not config_file.is_file():
            raise InputNotFoundError(f"--adapter {adapter}: no adapter_config.json (not a PEFT adapter directory)")
        if (Path(adapter) / MOLORA_FILE).exists():
            raise CheckpointError(f"--adapter {adapter} is a stage-1 export: PEFT cannot load its mixture of LoRA experts "
                             "(molora.safetensors); evaluate the stage-1 checkpoint itself with --model")
        model_path = model_path or json.loads(config_file.read_text()).get("base_model_name_or_path")
        if not model_path:
            raise CheckpointError(f"--adapter {adapter} names no base model: pass --model")
    if model_path is None:
        raise ConfigError("--model is required (or --adapter, whose config names its base)")
    if not Path(model_path).is_dir() and (Path(model_path).exists() or str(model_path).startswith((".", "/"))):
        raise InputNotFoundError(f"model directory not found: {model_path}")
    kind = artefact_kind(model_path)  # "hf" for a hub name
    if adapter is not None and kind not in (HF_MODEL, STAGE2_BASE):
        raise ConfigError(f"--adapter goes on a plain Hugging Face base; --model {model_path} is a {kind}")
    return str(model_path), kind


def load_eval_model(model_path: str, kind: str, adapter: str | None, dtype: torch.dtype, device,
                    trust_remote_code: bool = False):
    """(model in eval mode on `device`, tokenizer, artefact name for the report).

    With an adapter the base is loaded as a plain model (a stage-2 base's own knowledge
    adapter is not attached: the exported adapter already holds it) and the PEFT adapter is
    merged into its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcare_dist.artefacts.loading import load_trained_model

    if adapter is None:
        model, tokenizer, adapters = load_trained_model(model_path, dtype, trust_remote_code)
        if adapters is not None:
            adapters.to(device)
        return model.to(device), tokenizer, kind
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return model.to(device), tokenizer, "peft-adapter"
