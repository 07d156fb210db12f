"""`medcare-dist`: the commands that are not training runs (those are launch/stage*.py)."""

from __future__ import annotations

import argparse
import sys


def _tiny_model(args) -> None:
    from .tiny import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed)
    print(f"wrote tiny Qwen2 model and tokenizer to {out}")


def _preprocess(args) -> None:
    from transformers import AutoTokenizer

    from .data import preprocess

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    preprocess(args.data, tokenizer, args.max_length, args.out, args.on_bad_record, num_proc=args.num_proc,
               control_tokens=args.control_tokens)
    print(f"wrote tokenised dataset to {args.out}")


def _prepare_stage2(args) -> None:
    from .stage2 import prepare_stage2

    prepare_stage2(args.stage1, args.out, max_shard_size=args.max_shard_size)


def _export(args) -> None:
    from .export import export_adapter, export_merged

    if args.adapter_only:
        export_adapter(args.checkpoint, args.out)
    else:
        export_merged(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)


def _eval(args) -> None:
    from .evaluate import run_eval

    run_eval(args.model, args.data, args.out, batch_size=args.batch_size, max_length=args.max_length,
             max_new_tokens=args.max_new_tokens, dtype=args.dtype, generate=not args.no_generate,
             trust_remote_code=args.trust_remote_code)


def _plot(args) -> None:
    from .plotting import plot_metrics_file

    plot_metrics_file(args.metrics, args.out)
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcare-dist", description=__doc__)
    # `deepspeed --module medcare_dist eval ...` passes --local_rank=N before the subcommand
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write the built-in tiny Qwen2 model and tokenizer (HF format)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_tiny_model)

    p = sub.add_parser("preprocess", help="tokenise training data once, ahead of a cluster run")
    p.add_argument("--data", nargs="+", required=True, help="JSON, JSONL or Parquet files")
    p.add_argument("--tokenizer", required=True, help="model dir or hub name whose tokenizer to use")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--out", required=True)
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    p.add_argument("--control-tokens", choices=["error", "as_text"], default="error",
                   help="message text that spells a control token (<|im_end|>, ...): refuse the record, or keep it as plain text")
    p.add_argument("--num-proc", type=int, default=None)
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

    p = sub.add_parser("eval", help="LM loss / perplexity and exam accuracy of any artefact (data-parallel under deepspeed)")
    p.add_argument("--model", required=True, help="HF model dir or hub name, a prepared stage-2 base, or a stage-1/2 checkpoint")
    p.add_argument("--data", nargs="+", default=None, help="conversation and/or exam files (default: the sample exam)")
    p.add_argument("--max-length", type=int, default=2048, help="conversation records are cut here")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward on each rank")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length for the generated-answer accuracy")
    p.add_argument("--no-generate", action="store_true", help="skip the generated-answer accuracy")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=_eval)

    p = sub.add_parser("plot", help="draw a metrics.jsonl (loss, lr, tokens/s, router load) into a PNG")
    p.add_argument("metrics", help="a run's output_dir/metrics.jsonl")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(run=_plot)
    from .planner import add_plan_parser

    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, KeyError) as err:  # CheckpointError, DataError are ValueErrors
        print(f"medcare-dist {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
