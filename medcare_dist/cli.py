"""`medcare-dist`: the commands that are not training runs (those are launch/stage*.py)."""

from __future__ import annotations

import argparse
import sys


def _tiny_model(args) -> None:
    from medcare_dist.tools.tiny import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed, pretrain_steps=args.pretrain_steps, pretrain_files=args.pretrain_data)
    print(f"wrote tiny Qwen2 model and tokenizer to {out}")


def _preprocess(args) -> None:
    from transformers import AutoTokenizer

    from medcare_dist.artefacts.hub import resolve_dataset
    from medcare_dist.data.cache import default_cache_dir
    from medcare_dist.data.dataset import default_num_proc, load_dataset_for_training, preprocess
    from medcare_dist.data.sources import resolve_sources

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    num_proc = args.num_proc or default_num_proc()
    sources = resolve_sources(args.data, fetch_dataset=resolve_dataset)
    if args.out:
        preprocess(sources, tokenizer, args.max_length, args.out, args.on_bad_record, num_proc, args.control_tokens,
                   args.seed, thinking=args.thinking)
        print(f"wrote tokenised dataset to {args.out}")
    else:  # fill the cache that training runs with the same inputs and options will find
        load_dataset_for_training(sources, tokenizer, args.max_length, args.on_bad_record, num_proc, args.control_tokens,
                                  seed=args.seed, cache_dir=args.data_cache or default_cache_dir(), thinking=args.thinking)


def _prepare_stage2(args) -> None:
    from medcare_dist.artefacts.stage2_base import prepare_stage2
    from medcare_dist.files import reading

    with reading(args.stage1):
        prepare_stage2(args.stage1, args.out, max_shard_size=args.max_shard_size)


def _export(args) -> None:
    from medcare_dist.artefacts.export import export_adapter, export_merged
    from medcare_dist.files import reading

    with reading(args.checkpoint):
        if args.adapter_only:
            export_adapter(args.checkpoint, args.out)
        else:
            export_merged(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)


def _eval(args) -> None:
    from medcare_dist.eval.run import run_eval

    run_eval(args.model, args.data, args.out, adapter=args.adapter, records_dir=args.records,
             fewshot_dev=args.fewshot_dev or (), dtype=args.dtype, trust_remote_code=args.trust_remote_code,
             batch_size=args.batch_size, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
             methods=tuple(args.methods), num_fewshot=args.num_fewshot, fewshot_seed=args.seed, limit=args.limit,
             fmt=args.format, thinking=args.thinking)


def _eval_table(args) -> None:
    import json
    from pathlib import Path

    from medcare_dist.errors import ConfigError, InputNotFoundError
    from medcare_dist.eval.report import compare_table

    named = []
    for spec in args.reports:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise ConfigError(f"{spec!r} is not NAME=REPORT.json")
        if not Path(path).is_file():
            raise InputNotFoundError(f"report not found: {path}")
        named.append((name, json.loads(Path(path).read_text(encoding="utf-8"))))
    print(compare_table(named))


def _plot(args) -> None:
    from medcare_dist.tools.plotting import plot_metrics_file

    plot_metrics_file(args.metrics, args.out)
    print(f"wrote {args.out}")


def _plan(args) -> None:
    import json

    from medcare_dist.config import PLAN_OPTIONS, TrainConfig, load_config
    from medcare_dist.tools.planner import AdapterLayout, StepOptions, plan

    given = {k: getattr(args, k) for k in PLAN_OPTIONS if getattr(args, k) is not None}
    if args.model:
        given["model"] = args.model
    cfg = load_config(args.config, given, data=["(not read by plan)"])
    # A ds_config other than the default is planned as given; else plan picks zero3 or zero3_offload.
    ds_config = cfg.ds_config if "ds_config" in given or cfg.ds_config != TrainConfig.ds_config else None
    layout = AdapterLayout(
        stage=cfg.stage, lora_r=cfg.lora_r, num_experts=cfg.num_experts, top_k=cfg.top_k, num_shared=cfg.num_shared,
        lora_dropout=cfg.lora_dropout, freeze_knowledge=cfg.freeze_knowledge, align_attention=cfg.align_attention,
        routed_compute=cfg.routed_compute,
    )
    step = StepOptions(lm_loss=cfg.lm_loss, loss_chunk_tokens=cfg.loss_chunk_tokens, adapter_dtype=cfg.adapter_dtype,
                       packing=cfg.packing, pack_tokens=cfg.pack_tokens)
    dtype = "bf16" if cfg.dtype == "auto" else cfg.dtype  # auto is bf16 on the GPUs planned for
    result = plan(cfg.model, cfg.stage, args.nodes, args.gpus_per_node, args.gpu_memory, cfg.micro_batch_size, cfg.max_length,
                  cfg.grad_checkpointing, dtype, layout, args.reserve, ds_config, step)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.render())


def add_plan_parser(subparsers) -> None:
    """Register `plan` on the `medcare-dist` subcommand parser."""
    from medcare_dist.config import PLAN_OPTIONS, TrainConfig, option_help

    defaults = TrainConfig()
    p = subparsers.add_parser(
        "plan", help="GPU memory per rank for a stage-1/2 run, and the ds_config to use",
        description="The training options are the training run's own (--micro_batch_size, --max_length, "
                    "--grad_checkpointing, ...; also spelled with dashes), from --config FILE and the command line.")
    p.add_argument("--model", default=None, help="config.json, a model dir, or a built-in name: Qwen1.5-1.8B, Qwen1.5-7B, "
                   "Qwen1.5-14B (default: the config's model)")
    p.add_argument("--config", default=None, help="a training YAML (e.g. launch/configs/stage1_qwen7b.yaml): plan what it runs")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB kept for CUDA context, NCCL and fragmentation")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    for name in PLAN_OPTIONS:
        default = getattr(defaults, name)
        flag = isinstance(default, bool)
        spellings = sorted({f"--{name}", f"--{name.replace('_', '-')}"}, key=len)
        p.add_argument(*spellings, dest=name, default=None, nargs="?" if flag else None, const="true" if flag else None,
                       help=f"{option_help(name)} (default {default})" + ("; a ds_config other than the default is planned as given, "
                       "else zero3 or, if that does not fit, zero3_offload" if name == "ds_config" else ""))
    p.set_defaults(run=_plan)


def build_parser() -> argparse.ArgumentParser:
    from medcare_dist import package_version

    parser = argparse.ArgumentParser(prog="medcare-dist", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medcare-dist {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write the built-in tiny Qwen2 model and tokenizer (HF format)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=0, help="steps of a short full-parameter pretraining (the quickstart: 150)")
    p.add_argument("--pretrain-data", nargs="+", default=None, help="conversation files (default: data/sample/stage2.jsonl)")
    p.set_defaults(run=_tiny_model)

    p = sub.add_parser("preprocess", help="tokenise training data once, ahead of a cluster run: into the data cache, "
                       "or into a directory (--out)")
    p.add_argument("--data", nargs="+", required=True, help="data specs, as training's --data (README: Data)")
    p.add_argument("--tokenizer", required=True, help="model dir or hub name whose tokenizer to use")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--out", default=None, help="write the tokenised dataset to this new directory (train with --data DIR)")
    p.add_argument("--data-cache", default=None, help="the cache to fill when --out is not given (training's --data_cache)")
    p.add_argument("--seed", type=int, default=42, help="draws the records of `file#N` specs (training's --seed)")
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    p.add_argument("--control-tokens", choices=["error", "as_text"], default="error",
                   help="message text that spells a control token (<|im_end|>, ...): refuse the record, or keep it as plain text")
    p.add_argument("--thinking", action="store_true", help="train the think block before a last reply (as thinking: true)")
    p.add_argument("--num-proc", type=int, default=0, help="tokenising processes (0: the cores, at most 8)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=_preprocess)

    p = sub.add_parser("prepare-stage2", help="stage-1 checkpoint -> stage-2 base (attention LoRA merged) + knowledge adapter")
    p.add_argument("--stage1", required=True, help="a stage-1 checkpoint dir (output_dir/checkpoint-STEP)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(run=_prepare_stage2)

    p = sub.add_parser("export", help="checkpoint -> plain Hugging Face model (or PEFT adapter with --adapter-only)")
    p.add_argument("--checkpoint", required=True, help="a stage-2 checkpoint (a stage-1 one with --adapter-only)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--adapter-only", action="store_true", help="write PEFT adapter(s) instead of merged weights")
    p.set_defaults(run=_export)

    p = sub.add_parser("eval", help="exam accuracy on benchmark files and held-out LM loss of any artefact "
                                     "(data-parallel under deepspeed); docs/evaluation.md")
    p.add_argument("--model", default=None, help="HF model dir or hub name, a prepared stage-2 base, or a stage-1/2 checkpoint")
    p.add_argument("--adapter", default=None, help="a PEFT adapter dir (export --adapter-only) on --model (default: its base)")
    p.add_argument("--data", nargs="+", default=None, help="benchmark and/or conversation files (default: the sample exam)")
    p.add_argument("--format", default=None, help="force a benchmark format: medcare, medqa, medmcqa, medmcqa0, medmcqa1, "
                                                  "cmb, cmexam, mmlu, cmmlu, ceval (default: from the fields)")
    p.add_argument("--methods", nargs="+", default=["loglik", "cloze", "generate", "reference"],
                   choices=["loglik", "cloze", "generate", "reference"], help="reference: CoT, then the forced answer letter")
    p.add_argument("--num-fewshot", type=int, default=0, help="solved examples before each question")
    p.add_argument("--fewshot-dev", nargs="+", default=None,
                   help="where few-shot examples come from: one file, or one per exam file (default: the same file, minus the record)")
    p.add_argument("--seed", type=int, default=0, help="few-shot draw")
    p.add_argument("--limit", type=int, default=None, help="the first N records of each file")
    p.add_argument("--records", default=None, help="directory for per-record JSONL; a rerun resumes from it")
    p.add_argument("--max-length", type=int, default=2048, help="conversation records are cut here")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward on each rank")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy generation length (generate, reference; the paper: 1024)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--thinking", action="store_true", help="prompts end before the think block and thinking is scored "
                                                           "(for a model trained with thinking: true); default: Qwen3's "
                                                           "empty think block is prompt, as training rendered it")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=_eval)

    p = sub.add_parser("eval-table", help="eval reports side by side, one row per model")
    p.add_argument("reports", nargs="+", help="NAME=REPORT.json (written by eval --out)")
    p.set_defaults(run=_eval_table)

    p = sub.add_parser("plot", help="draw a metrics.jsonl (loss, lr, tokens/s, router load) into a PNG")
    p.add_argument("metrics", help="a run's output_dir/metrics.jsonl")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(run=_plot)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from medcare_dist.errors import MedcareError

    from medcare_dist.dist.rank_env import without_local_rank

    # `deepspeed --module medcare_dist eval ...` passes --local_rank=N before the subcommand
    args = build_parser().parse_args(without_local_rank(sys.argv[1:] if argv is None else argv))
    try:
        args.run(args)
    except MedcareError as err:
        print(f"medcare-dist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # inputs are checked first (InputNotFoundError): this one went away meanwhile
        print(f"medcare-dist {args.command}: error: {err.filename}: missing, though the inputs were checked when the "
              "command started: removed while it ran (a running job's keep_last pruning an older checkpoint?)", file=sys.stderr)
        return 2
    return 0
