"""The frozen base under ZeRO-3: the DeepSpeed config filled from the training config,
activation checkpointing, and the checksum that shows training left the base untouched.
(Loading the base partitioned: artefacts/hf_model.py.)"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from medcare_dist.config import ConfigError, TrainConfig
from medcare_dist.resources import read_ds_config, resolve_ds_config


def build_ds_config(path: str | Path, cfg: TrainConfig, world_size: int, dtype: torch.dtype) -> dict:
    """Read a DeepSpeed JSON config (a path or a packaged name) and fill every "auto" from the
    training config."""
    p = resolve_ds_config(str(path))
    ds = read_ds_config(str(path))
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


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing: correct with a frozen embedding (no input needs grad)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def base_checksum(model: nn.Module) -> float:
    """Sum of every frozen base weight, in float64, over all ranks.

    Under ZeRO-3 each rank sums only its own partition (`ds_tensor`; partition padding is
    zero), so this costs no gather. Recorded at the start and at each save: equal values
    show that training left the base untouched.
    """
    from medcare_dist.dist import process_group as dist_utils

    local = sum(float(getattr(p, "ds_tensor", p).detach().double().sum()) for p in model.parameters())
    return dist_utils.all_reduce_sum([local])[0]
