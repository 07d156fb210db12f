"""Training configuration: one flat dataclass, read from YAML, overridable by `--key value`.

Flat on purpose: every option is addressable on the command line by its name, and the
resolved config saved in each checkpoint reads as one list.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medcare_dist.errors import ConfigError
from medcare_dist.resources import DEFAULT_DS_CONFIG, read_ds_config


@dataclass
class TrainConfig:
    # what to train
    stage: int = 1
    model: str = ""  # stage 1: HF model dir or hub name; stage 2: the prepared stage-2 dir
    data: list[str] = field(default_factory=list)  # files, or one `medcare-dist preprocess` dir
    output_dir: str = "runs/out"
    max_length: int = 1024
    on_bad_record: str = "error"  # error | skip
    control_tokens: str = "error"  # error | as_text: message text spelling a control token (<|im_end|>, ...)
    trust_remote_code: bool = False

    # adapters (defaults: the MedCare reference)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    use_rslora: bool = False
    attn_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    ffn_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    num_experts: int = 8
    top_k: int = 2
    num_shared: int = 2
    router_aux_loss_coef: float = 0.0  # load-balancing loss; off as in the reference
    routed_compute: str = "dense"  # dense | sparse: how MoLoRA computes the routed experts (same result)

    # stage 2
    ortho_lambda: float = 1.0
    freeze_knowledge: bool = False
    align_attention: bool = False

    # optimisation
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 2  # sequences per forward on one rank
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    seed: int = 42
    packing: str = "auto"  # auto (on under flash-attention varlen, where exact) | on (exact or refused) | off
    pack_tokens: int = 0  # tokens per packed row (a micro-batch has micro_batch_size rows); 0: max_length
    lm_loss: str = "chunked"  # chunked (no full logits) | full | liger (CUDA, liger-kernel)
    loss_chunk_tokens: int = 1024  # tokens per LM-head chunk of the chunked loss
    grad_bucket_mb: float = 25.0  # adapter gradients are all-reduced in buckets of this size while backward runs

    # runtime
    ds_config: str = DEFAULT_DS_CONFIG  # a JSON file, or a packaged config by name (zero3, zero3_offload, zero3_node_local)
    dtype: str = "auto"  # auto (bf16 where supported, else fp32) | bf16 | fp16 | fp32
    adapter_dtype: str = "auto"  # adapter matmul precision, weights stay fp32: auto (bf16 with a bf16 base) | bf16 | fp32
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep_last: int = 0  # 0: keep all checkpoints
    resume: str = ""  # "" | auto | path to a checkpoint
    resume_override: list[str] = field(default_factory=list)  # training-defining options allowed to differ on resume
    overwrite: bool = False  # a fresh run may delete an earlier run's checkpoints in output_dir
    report_to: list[str] = field(default_factory=list)  # e.g. [tensorboard]
    timeout_minutes: float = 30.0

    def validate(self) -> "TrainConfig":
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        if not self.model:
            raise ConfigError("model is not set (--model DIR)")
        if not self.data:
            raise ConfigError("data is not set (--data FILE [FILE ...])")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}")
        if self.control_tokens not in ("error", "as_text"):
            raise ConfigError(f"control_tokens must be 'error' or 'as_text', got {self.control_tokens!r}")
        if self.routed_compute not in ("sparse", "dense"):
            raise ConfigError(f"routed_compute must be 'sparse' or 'dense', got {self.routed_compute!r}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        for name, allowed in (("packing", ("auto", "on", "off")), ("lm_loss", ("chunked", "full", "liger")),
                              ("adapter_dtype", ("auto", "bf16", "fp32"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.pack_tokens and self.pack_tokens < self.max_length:
            raise ConfigError(f"pack_tokens ({self.pack_tokens}) must be 0 or at least max_length ({self.max_length})")
        for name in ("lora_r", "num_experts", "top_k", "num_shared", "global_batch_size", "micro_batch_size", "max_length",
                     "loss_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name, ok, wanted in _RANGES:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value) or not ok(value):
                raise ConfigError(f"{name} must be {wanted}, got {value}")
        read_ds_config(self.ds_config)  # exists and parses: found now, not after the data load and the rendezvous
        if self.overwrite and self.resume:
            raise ConfigError(f"--overwrite deletes the checkpoints that --resume {self.resume} would continue from: pass one of them")
        self.resume_override = [n for item in self.resume_override for n in item.split(",") if n]  # `lr,max_steps` or `lr max_steps`
        unknown = [name for name in self.resume_override if name not in _FIELDS]
        if unknown:
            raise ConfigError(f"resume_override: unknown option(s) {unknown}; known: {', '.join(sorted(_FIELDS))}")
        return self

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size x world size ({self.micro_batch_size} x {world_size} = {per_step})"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Options a resume may change freely: where things are, how often to log and save, runtime
# knobs that leave the numbers unchanged. Every other option defines the training run, and a
# resume refuses a different value unless it is named in `resume_override`. `model` and `data`
# are compared by content (base fingerprint, data fingerprint), not by path, so moved files resume.
RUNTIME_OPTIONS = frozenset({
    "model", "data", "output_dir", "trust_remote_code", "routed_compute", "lm_loss", "loss_chunk_tokens", "grad_checkpointing",
    "ds_config",
    "log_every", "save_every", "keep_last", "resume", "resume_override", "overwrite", "report_to", "timeout_minutes",
})


def resume_differences(saved: dict, current: TrainConfig) -> dict[str, tuple]:
    """Training-defining options whose value in a checkpoint's config differs from `current`'s:
    {option: (saved, current)}. An option the checkpoint predates counts as its default."""
    now = current.to_dict()
    defaults = TrainConfig().to_dict()
    return {
        name: (saved.get(name, defaults[name]), now[name])
        for name in _FIELDS
        if name not in RUNTIME_OPTIONS and saved.get(name, defaults[name]) != now[name]
    }


# (option, check, what it must be): range checks beyond the type, all applied at load.
_RANGES = [
    ("max_length", lambda v: v >= 2, ">= 2"),
    ("lora_alpha", lambda v: v > 0, "> 0"),
    ("grad_bucket_mb", lambda v: v > 0, "> 0"),
    ("lr", lambda v: v > 0, "finite and > 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("epochs", lambda v: v > 0, "> 0"),
    ("max_steps", lambda v: v == -1 or v >= 1, "-1 (use epochs) or >= 1"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("ortho_lambda", lambda v: v >= 0, "finite and >= 0"),
    ("router_aux_loss_coef", lambda v: v >= 0, ">= 0"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("save_every", lambda v: v >= 0, ">= 0 (0: save at the end only)"),
    ("keep_last", lambda v: v >= 0, ">= 0 (0: keep all)"),
    ("timeout_minutes", lambda v: v > 0, "> 0"),
]

# Options that shape the stage-1 adapters; in stage 2 the prepared base decides them.
STAGE1_ONLY = ("lora_r", "lora_alpha", "use_rslora", "num_experts", "top_k", "num_shared",
               "router_aux_loss_coef", "routed_compute")


def _unknown(key: str, where: str) -> ConfigError:
    near = difflib.get_close_matches(key, _FIELDS, n=1)
    hint = f"; did you mean {near[0]}?" if near else f"; known: {', '.join(sorted(_FIELDS))}"
    return ConfigError(f"{where}unknown option {key!r}{hint}")


def _coerce(name: str, value):
    """Convert a YAML or command-line value to the type of field `name`."""
    if value is None:
        raise ConfigError(f"{name}: empty value; give a value or remove the line")
    kind = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(kind) is list:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [str(v) for v in items]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None


def parse_overrides(args: list[str]) -> dict:
    """`--key value [value ...]` pairs (also `--key=value`; `--flag` alone means true)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value")
        key, _, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in _FIELDS:
            raise _unknown(key, "command line: ")
        if key in out:
            raise ConfigError(f"--{key} is given twice; give it once")
        values = [inline] if inline else []
        while not inline and i + 1 < len(args) and not args[i + 1].startswith("--"):
            values.append(args[i + 1])
            i += 1
        if not values:
            values = ["true"]
        is_list = typing.get_origin(typing.get_type_hints(TrainConfig)[key]) is list
        out[key] = values if is_list else values[-1] if len(values) == 1 else values
        if not is_list and len(values) > 1:
            raise ConfigError(f"--{key} takes one value, got {values}")
        i += 1
    return out


def load_config(path: str | None, overrides: dict | None = None, **defaults) -> TrainConfig:
    """Defaults < YAML file < command-line overrides."""
    merged: dict = dict(defaults)
    loaded: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of option: value")
        for key in loaded:
            if key not in _FIELDS:
                raise _unknown(key, f"{p}: ")
        merged.update(loaded)
    merged.update(overrides or {})
    given = set(loaded) | set(overrides or {})
    stage = defaults.get("stage")
    if stage is not None and "stage" in given and _coerce("stage", merged["stage"]) != stage:
        raise ConfigError(f"the config says stage {merged['stage']}, but this is the stage-{stage} launcher")
    if merged.get("stage") == 2 and given & set(STAGE1_ONLY):
        decided = ", ".join(sorted(given & set(STAGE1_ONLY)))
        raise ConfigError(f"stage 2: {decided} cannot be set: the prepared stage-2 base decides the adapter "
                          "rank and scale (its manifest records them) and stage 2 has no routed experts; remove them")
    return TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()}).validate()


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
