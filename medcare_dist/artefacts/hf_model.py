"""A Hugging Face causal LM loaded as a frozen base: partitioned as it loads when a DeepSpeed
ZeRO-3 config is given (training), whole otherwise (eval, export checks, tests)."""

from __future__ import annotations

import copy

import torch


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


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


def model_skeleton(path: str, trust_remote_code: bool = False):
    """The model's module tree on the meta device, from its config alone: no weights, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _attention_implementation(dtype: torch.dtype) -> str | None:
    """flash_attention_2 (varlen kernels for packed micro-batches) on CUDA in bf16/fp16 when the
    flash-attn package is installed; otherwise None, transformers' default (sdpa)."""
    import importlib.util

    usable = torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if usable and importlib.util.find_spec("flash_attn") else None


