"""Training configuration: one flat dataclass, read from YAML, overridable by `--key value`.

Flat on purpose: every option is addressable on the command line by its name, and the
resolved config saved in each checkpoint reads as one list.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medcare_dist.errors import ConfigError
from medcare_dist.resources import DEFAULT_DS_CONFIG, read_ds_config


def option(default, help: str, group: str, *, choices: tuple = (), runtime: bool = False, stage1_only: bool = False,
           plan: bool = False, check: tuple | None = None):
    """A TrainConfig field and what is known about it, in one place:

    help, group         what `--help` prints, and under which heading
    choices             the allowed values (checked at load; shown in help)
    runtime             result-neutral: where things are, how often to log and save, how a
                        result is computed (same numbers): a resume may change it freely
    stage1_only         shapes the stage-1 adapters; in stage 2 the prepared base decides it
    plan                `medcare-dist plan` reads it
    check               (predicate, "what it must be"): a range check beyond the type
    """
    meta = {"help": help, "group": group, "choices": choices, "runtime": runtime, "stage1_only": stage1_only,
            "plan": plan, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_POSITIVE = (lambda v: v >= 1, ">= 1")
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")  # what preempt_signals may name


@dataclass
class TrainConfig:
    # what to train
    stage: int = option(1, "1: knowledge aggregation, 2: clinical alignment (set by the launcher)", "run", choices=(1, 2), plan=True)
    model: str = option("", "stage 1: HF model dir or hub name; stage 2: the prepared stage-2 base dir", "run", runtime=True)
    data: list[str] = option([], "data files, dirs or globs of shards, save_to_disk dirs, hub datasets (`org/name[@REV][:CONFIG]`; "
                             "`a.jsonl#N`: N records of it), or one `medcare-dist preprocess` dir", "run", runtime=True)
    output_dir: str = option("runs/out", "where checkpoints and metrics.jsonl go", "run", runtime=True)
    max_length: int = option(1024, "tokens per record; longer records are cut", "data", plan=True, check=(lambda v: v >= 2, ">= 2"))
    on_bad_record: str = option("error", "a malformed record stops the run (error) or is skipped and counted (skip)", "data",
                                choices=("error", "skip"))
    control_tokens: str = option("error", "message text spelling a control token (<|im_end|>, ...): refused, or kept as text",
                                 "data", choices=("error", "as_text"))
    thinking: bool = option(False, "keep thinking: the template's think block before a last reply is trained with it "
                            "(eval: --thinking); off: Qwen3's empty think block is prompt, masked", "data")
    data_cache: str = option("", "tokenised-data cache dir (default: the Hugging Face datasets cache/medcare_dist)", "data",
                             runtime=True)
    data_cache_shared: bool = option(False, "the data cache dir is shared by all nodes: global rank 0 alone tokenises "
                                     "(default: local rank 0 of each node)", "data", runtime=True)
    num_proc: int = option(0, "processes that tokenise (0: the node's cores, at most 8)", "data", runtime=True,
                           check=(lambda v: v >= 0, ">= 0 (0: automatic)"))
    trust_remote_code: bool = option(False, "run the model repository's own code (only for models you trust)", "run", runtime=True)

    # adapters (defaults: the MedCare reference)
    lora_r: int = option(16, "LoRA rank of the attention LoRA and of each routed expert", "adapters", stage1_only=True, plan=True,
                         check=_POSITIVE)
    lora_alpha: float = option(32.0, "LoRA alpha: scale = alpha / r", "adapters", stage1_only=True, check=(lambda v: v > 0, "> 0"))
    lora_dropout: float = option(0.05, "dropout on the adapter input", "adapters", plan=True,
                                 check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    use_rslora: bool = option(False, "rsLoRA scaling: scale = alpha / sqrt(r)", "adapters", stage1_only=True)
    attn_targets: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"], "attention projections that get a LoRA", "adapters")
    ffn_targets: list[str] = option(["gate_proj", "up_proj", "down_proj"], "FFN projections that get the experts", "adapters")
    partial_targets: bool = option(False, "accept a model that has only some of attn_targets / ffn_targets", "adapters",
                                   stage1_only=True)
    num_experts: int = option(8, "routed experts per FFN projection (the Noise Aggregator)", "adapters", stage1_only=True,
                              plan=True, check=_POSITIVE)
    top_k: int = option(2, "routed experts per token", "adapters", stage1_only=True, plan=True, check=_POSITIVE)
    num_shared: int = option(2, "shared experts, fused into one LoRA of rank num_shared x lora_r (the Knowledge Aggregator)",
                             "adapters", stage1_only=True, plan=True, check=_POSITIVE)
    router_aux_loss_coef: float = option(0.0, "load-balancing loss weight (off in the reference)", "adapters", stage1_only=True,
                                         check=(lambda v: v >= 0, ">= 0"))
    routed_compute: str = option("dense", "how the routed experts are computed (same result): dense, sparse, fused "
                                 "(Triton; unmeasured on GPU), auto (fused on CUDA with Triton, else dense)", "adapters",
                                 choices=("dense", "sparse", "fused", "auto"), runtime=True, stage1_only=True, plan=True)

    # stage 2
    ortho_lambda: float = option(1.0, "weight of the orthogonality penalty |A_know A_align^T|", "stage 2",
                                 check=(lambda v: v >= 0, "finite and >= 0"))
    freeze_knowledge: bool = option(False, "keep the knowledge adapter frozen in stage 2", "stage 2", plan=True)
    align_attention: bool = option(False, "alignment adapters on attention too", "stage 2", plan=True)

    # optimisation
    epochs: float = option(1.0, "passes over the data", "optimisation", check=(lambda v: v > 0, "> 0"))
    max_steps: int = option(-1, "> 0: this many optimizer steps, overriding epochs", "optimisation",
                            check=(lambda v: v == -1 or v >= 1, "-1 (use epochs) or >= 1"))
    global_batch_size: int = option(16, "sequences per optimizer step, over all ranks", "optimisation", check=_POSITIVE)
    micro_batch_size: int = option(2, "sequences per forward on one rank", "optimisation", plan=True, check=_POSITIVE)
    lr: float = option(2e-4, "peak learning rate (cosine schedule)", "optimisation", check=(lambda v: v > 0, "finite and > 0"))
    weight_decay: float = option(0.0, "AdamW weight decay", "optimisation", check=(lambda v: v >= 0, ">= 0"))
    warmup_ratio: float = option(0.03, "share of the steps spent warming up", "optimisation",
                                 check=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    max_grad_norm: float = option(1.0, "gradient clipping (0: none)", "optimisation",
                                  check=(lambda v: v >= 0, ">= 0 (0: no clipping)"))
    grad_checkpointing: bool = option(False, "recompute activations in backward (less memory, same result)", "optimisation",
                                      runtime=True, plan=True)
    seed: int = option(42, "adapter init, data order and dropout", "optimisation")
    packing: str = option("auto", "pack records into rows (exact: same result): auto (under flash-attention varlen), on, off",
                          "optimisation", choices=("auto", "on", "off"), runtime=True, plan=True)
    pack_tokens: int = option(0, "tokens per packed row; 0: max_length", "optimisation", runtime=True, plan=True,
                              check=(lambda v: v >= 0, ">= 0"))
    lm_loss: str = option("chunked", "LM loss: chunked (no full logits), full, liger (CUDA, liger-kernel)", "optimisation",
                          choices=("chunked", "full", "liger"), runtime=True, plan=True)
    loss_chunk_tokens: int = option(1024, "tokens per LM-head chunk of the chunked loss", "optimisation", runtime=True, plan=True,
                                    check=_POSITIVE)
    grad_bucket_mb: float = option(25.0, "adapter gradients are all-reduced in buckets of this size while backward runs",
                                   "optimisation", runtime=True, check=(lambda v: v > 0, "> 0"))

    # runtime
    ds_config: str = option(DEFAULT_DS_CONFIG, "DeepSpeed config: a JSON file, or a packaged one by name "
                            "(zero3, zero3_offload, zero3_node_local)", "runtime", runtime=True, plan=True)
    dtype: str = option("auto", "base dtype: auto (bf16 where supported, else fp32)", "runtime",
                        choices=("auto", "bf16", "fp16", "fp32"), plan=True)
    adapter_dtype: str = option("auto", "adapter matmul precision (weights stay fp32): auto (bf16 with a bf16 base)", "runtime",
                                choices=("auto", "bf16", "fp32"), plan=True)
    log_every: int = option(10, "steps between log records", "runtime", runtime=True, check=(lambda v: v >= 1, ">= 1"))
    save_every: int = option(0, "steps between checkpoints (0: at the end only)", "runtime", runtime=True,
                             check=(lambda v: v >= 0, ">= 0 (0: save at the end only)"))
    save_every_minutes: float = option(0.0, "also save when this many minutes passed since the last save (0: off); ranks agree",
                                       "runtime", runtime=True, check=(lambda v: v >= 0, ">= 0 (0: off)"))
    preempt_signals: list[str] = option(["SIGTERM", "SIGINT", "SIGUSR1"], "signals that save a checkpoint at the end of the step, "
                                        "then exit with status 75 (a repeat exits at once)", "runtime", runtime=True,
                                        check=(lambda v: set(v) <= set(STOP_SIGNALS), f"a list of {', '.join(STOP_SIGNALS)}"))
    keep_last: int = option(0, "checkpoints kept (0: all)", "runtime", runtime=True, check=(lambda v: v >= 0, ">= 0 (0: keep all)"))
    resume: str = option("", "auto (the newest complete checkpoint in output_dir, if any) or a checkpoint path", "runtime",
                         runtime=True)
    resume_override: list[str] = option([], "training-defining options a resume may change", "runtime", runtime=True)
    overwrite: bool = option(False, "a fresh run may delete an earlier run's checkpoints in output_dir", "runtime", runtime=True)
    report_to: list[str] = option([], "extra metric sinks: tensorboard", "runtime", runtime=True)
    timeout_minutes: float = option(30.0, "collective timeout", "runtime", runtime=True, check=(lambda v: v > 0, "> 0"))

    def validate(self) -> "TrainConfig":
        if not self.model:
            raise ConfigError("model is not set (--model DIR)")
        if not self.data:
            raise ConfigError("data is not set (--data FILE [FILE ...])")
        for f in dataclasses.fields(self):
            value, (choices, check) = getattr(self, f.name), (f.metadata["choices"], f.metadata["check"])
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
            if check and (isinstance(value, float) and not math.isfinite(value) or not check[0](value)):
                raise ConfigError(f"{f.name} must be {check[1]}, got {value}")
        if self.pack_tokens and self.pack_tokens < self.max_length:
            raise ConfigError(f"pack_tokens ({self.pack_tokens}) must be 0 or at least max_length ({self.max_length})")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        read_ds_config(self.ds_config)  # exists and parses: found now, not after the data load and the rendezvous
        if self.overwrite and self.resume and (self.resume == "auto" or Path(self.resume).resolve().parent == Path(self.output_dir).resolve()):
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

def choices(name: str) -> tuple:
    """The allowed values of option `name` (its one definition, above)."""
    return _FIELDS[name].metadata["choices"]


# Options a resume may change freely (metadata `runtime`): every other option defines the
# training run, and a resume refuses a different value unless it is named in
# `resume_override`. `model` and `data` are compared by content (base fingerprint, data
# fingerprint), not by path, so moved files resume.
RUNTIME_OPTIONS = frozenset(n for n, f in _FIELDS.items() if f.metadata["runtime"])
STAGE1_ONLY = tuple(n for n, f in _FIELDS.items() if f.metadata["stage1_only"])
PLAN_OPTIONS = tuple(n for n, f in _FIELDS.items() if f.metadata["plan"])


def option_help(name: str) -> str:
    return _FIELDS[name].metadata["help"]


def options_help(stage: int | None = None) -> str:
    """Every option by group, with its default, allowed values and help: what `--help` prints."""
    lines, group = [], None
    defaults = TrainConfig()
    for name, f in _FIELDS.items():
        if stage == 2 and f.metadata["stage1_only"] or stage == 1 and f.metadata["group"] == "stage 2":
            continue
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f"\n{group}:")
        default = getattr(defaults, name)
        shown = " ".join(default) if isinstance(default, list) else default
        allowed = f" {{{'|'.join(map(str, f.metadata['choices']))}}}" if f.metadata["choices"] else ""
        lines.append(f"  --{name}{allowed} (default: {shown!s})\n      {f.metadata['help']}")
    return "\n".join(lines).lstrip("\n")


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
        return [_data_item(v) if name == "data" and isinstance(v, dict) else str(v) for v in items]
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


def _data_item(item: dict) -> str:
    """A YAML data entry `{path: a.jsonl, records: 20000}` as its spec `a.jsonl#20000`."""
    unknown = set(item) - {"path", "records"}
    if unknown or "path" not in item:
        raise ConfigError(f"data: an entry {item} must have 'path' and may have 'records' (got {', '.join(sorted(item))})")
    records = item.get("records")
    if records is not None and (not isinstance(records, int) or isinstance(records, bool) or records < 1):
        raise ConfigError(f"data: 'records' of {item['path']} must be a whole number >= 1, got {records!r}")
    return f"{item['path']}#{records}" if records is not None else str(item["path"])


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
