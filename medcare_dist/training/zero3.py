"""The frozen base under ZeRO-3: the DeepSpeed config filled from the training config,
activation checkpointing, and the checksum that shows training left the base untouched.
(Loading the base partitioned: artefacts/hf_model.py.)"""

from __future__ import annotations

import torch
import torch.nn as nn

from medcare_dist.config import ConfigError, TrainConfig
from medcare_dist.resources import read_ds_config, resolve_ds_config


def check_ds_config(cfg: TrainConfig) -> dict:
    """cfg.ds_config read and checked against the training config, before any data or process
    group: ZeRO stage 3 (the frozen base is partitioned), and every batch or clipping value it
    sets itself instead of "auto" equal to the training option that decides it."""
    path = resolve_ds_config(cfg.ds_config)
    ds = read_ds_config(cfg.ds_config)
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"{path}: zero_optimization.stage must be 3 (the frozen base is partitioned), got {stage}")
    for key, option in (("train_micro_batch_size_per_gpu", "micro_batch_size"), ("train_batch_size", "global_batch_size"),
                        ("gradient_clipping", "max_grad_norm")):
        if ds.get(key, "auto") not in ("auto", getattr(cfg, option)):
            raise ConfigError(f"{path}: {key} is {ds[key]}, but --{option} is {getattr(cfg, option)}: set it to \"auto\" "
                              f"(filled from --{option}) or make them equal")
    return ds


def build_ds_config(cfg: TrainConfig, world_size: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config of cfg.ds_config (a path or a packaged name), checked, with every
    "auto" filled from the training config."""
    ds = check_ds_config(cfg)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
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
