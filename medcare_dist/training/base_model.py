"""Model assembly: the frozen base under ZeRO-3, and finding the Linears adapters go on
(the adapters of each stage: stage1.py, stage2.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.config import ConfigError, TrainConfig


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_ds_config(path: str | Path, cfg: TrainConfig, world_size: int, dtype: torch.dtype) -> dict:
    """Read a DeepSpeed JSON config and fill every "auto" from the training config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config not found: {p}")
    ds = json.loads(p.read_text())
    accum = cfg.grad_accum_steps(world_size)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = dtype == wanted
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ConfigError(f"{p}: zero_optimization.stage must be 3 (the frozen base is partitioned), got {zero.get('stage')}")
    return ds


class _DeepSpeedContext:
    """Keeps transformers' HfDeepSpeedConfig alive while the model is loaded, so that
    `from_pretrained` builds each weight already partitioned: no rank ever holds the
    whole model, on the CPU or on the GPU. transformers' zero.Init reads the whole config, so
    a `zero_hpz_partition_size` (node_local.py) also gives each weight its node-local shard."""

    def __init__(self, ds_config: dict):
        from transformers.integrations import HfDeepSpeedConfig

        self.handle = HfDeepSpeedConfig(copy.deepcopy(ds_config))


def load_frozen_base(name_or_path: str, ds_config: dict | None, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load a causal LM (partitioned under ZeRO-3 when `ds_config` is given), all params frozen."""
    from transformers import AutoModelForCausalLM

    keepalive = _DeepSpeedContext(ds_config) if ds_config is not None else None
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=_attention_implementation(dtype))
    model._medcare_ds_context = keepalive
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def _attention_implementation(dtype: torch.dtype) -> str | None:
    """flash_attention_2 (varlen kernels for packed micro-batches) on CUDA in bf16/fp16 when the
    flash-attn package is installed; otherwise None, transformers' default (sdpa)."""
    import importlib.util

    usable = torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if usable and importlib.util.find_spec("flash_attn") else None


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing: correct with a frozen embedding (no input needs grad)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def linear_targets(model: nn.Module, leaf_names: list[str]) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear whose last path component is in `leaf_names`, in model order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaf_names]
    if leaf_names and not found:
        raise ConfigError(f"no Linear layer named any of {leaf_names} in {type(model).__name__}")
    return found


def trainable_parameters(adapters: AdapterSet) -> list[nn.Parameter]:
    return [p for p in adapters.parameters() if p.requires_grad]


def base_checksum(model: nn.Module) -> float:
    """Sum of every frozen base weight, in float64, over all ranks.

    Under ZeRO-3 each rank sums only its own partition (`ds_tensor`; partition padding is
    zero), so this costs no gather. Recorded at the start and at each save: equal values
    show that training left the base untouched.
    """
    from medcare_dist.dist import process_group as dist_utils

    local = sum(float(getattr(p, "ds_tensor", p).detach().double().sum()) for p in model.parameters())
    return dist_utils.all_reduce_sum([local])[0]
