"""Evaluation of any pipeline artefact: exam accuracy on benchmark files and held-out LM loss.

    medcare-dist eval --model DIR --data medqa_test.jsonl cmb_val.json cmmlu/*.csv held_out.jsonl
    deepspeed --num_gpus 8 --module medcare_dist eval --model DIR --data ... --records runs/eval

`--model` is a plain HF model dir (or hub name), a prepared stage-2 base, a stage-1 or a
stage-2 checkpoint (`loading.load_trained_model`); `--adapter DIR` puts a PEFT adapter on a
plain base. Each rank loads the whole model (no ZeRO: evaluation holds no optimizer state) and
takes every world_size-th of the records still to do; rows are gathered, so the report does
not depend on the number of ranks.

Exam files (`exam_files.py` reads them) are scored by up to three methods, each a prediction
per record (a set of letters; correct = exactly the gold set):

- loglik: the log-likelihood of each answer sentence "The answer is X." / "答案为X。" after
  the prompt; the best one. A multiple-answer question scores one sentence per non-empty set
  of its letters ("答案为AC。").
- cloze: the mean log-probability per token of each option's text as the reply to the
  question alone (no options shown), the best one: what the model knows, without the
  letter format (lm-evaluation-harness's "cloze" formulation, token-normalised). It picks one
  option, so a multiple-answer question is right only when its gold set is that one letter.
- generate: greedy generation of up to `max_new_tokens`, the letter(s) parsed from its text
  (`exam_prompts.parse_answer`).
- reference (the MedCare reference protocol): the same greedy generation (the chain of
  thought), then "The answer is" / "答案为" appended and one letter forced among the option
  letters (+100 on their logits); a multiple-answer question repeats the forced step while it
  chooses new letters.

Conversation files (the training format) get the token-weighted next-token cross entropy over
their trained (assistant) tokens, the training objective's LM part; perplexity = exp(loss).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Callable, Sequence

import torch

from medcare_dist.eval.exam_files import ExamRecord, read_eval_file
from medcare_dist.data.batching import collate
from medcare_dist.data.chat import IGNORE_INDEX, pad_token_id
from medcare_dist.data.dataset import build_dataset, data_files
from medcare_dist.errors import ConfigError
from medcare_dist.eval.records import RecordStore
from medcare_dist.eval.report import METHODS, average, exam_result, format_table
from medcare_dist.eval.prompts import ANSWER_PREFIX, answer_sentence, cloze_prompt, exam_prompt, fewshot_examples, parse_answer
from medcare_dist.eval.scoring import continuation_logprobs, forced_letters, greedy_generate, letter_token_ids
from medcare_dist.training.lm_loss import check_logits_after_head, model_lm_loss_sum

REPORT_FORMAT = "medcare_dist.eval/2"
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 8
MAX_MULTI_OPTIONS = 8  # a multiple-answer question's loglik scores 2^n - 1 letter sets


@dataclass
class EvalSettings:
    batch_size: int = DEFAULT_BATCH_SIZE  # sequences per forward
    max_length: int = 2048  # conversation files: records are cut here, as in training
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # greedy generation (generate, reference)
    methods: tuple[str, ...] = METHODS
    num_fewshot: int = 0
    fewshot_seed: int = 0
    limit: int | None = None  # the first N records of each file
    fmt: str | None = None  # force a benchmark format (benchmarks.FORMATS)
    thinking: bool = False  # prompts as training rendered them with `thinking` (data.chat.assistant_prompt)
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("rank", "world_size", "device")} | {
            "methods": list(self.methods)}


def answer_candidates(record: ExamRecord) -> list[str]:
    """What loglik compares: each letter, or for a multiple-answer question each non-empty
    set of letters (in option order)."""
    letters = list(record.options)
    if not record.multi:
        return letters
    return ["".join(c) for n in range(1, len(letters) + 1) for c in combinations(letters, n)]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def score_records(model, tokenizer, records: list[ExamRecord], shots: list[list[ExamRecord]], s: EvalSettings) -> list[dict]:
    """One row per record: its prompt, gold letters and each method's prediction."""
    prompts = [exam_prompt(tokenizer, r, sh, s.thinking) for r, sh in zip(records, shots)]
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    rows = [{"index": r.index, "subject": r.subject, "gold": r.answer, "multi": r.multi, "prompt": p}
            for r, p in zip(records, prompts)]
    pad = pad_token_id(tokenizer)
    if "loglik" in s.methods:
        pairs = [(k, c) for k, r in enumerate(records) for c in answer_candidates(r)]
        flat = continuation_logprobs(model, [prompt_ids[k] for k, _ in pairs],
                                     [_encode(tokenizer, answer_sentence(c, records[k].lang)) for k, c in pairs],
                                     pad, s.batch_size, s.device)
        for k, row in enumerate(rows):
            scores = {c: round(v, 6) for (j, c), v in zip(pairs, flat) if j == k}
            best = max(scores, key=scores.__getitem__)  # the first in option order on a tie
            row["loglik"] = {"scores": scores, "pred": best, "correct": best == row["gold"]}
    if "cloze" in s.methods:
        q_ids = [_encode(tokenizer, cloze_prompt(tokenizer, r, sh, s.thinking)) for r, sh in zip(records, shots)]
        pairs = [(k, x, _encode(tokenizer, text)) for k, r in enumerate(records) for x, text in r.options.items()]
        flat = continuation_logprobs(model, [q_ids[k] for k, _, _ in pairs], [c for _, _, c in pairs], pad,
                                     s.batch_size, s.device)
        for k, row in enumerate(rows):
            scores = {x: round(v / len(c), 6) for (j, x, c), v in zip(pairs, flat) if j == k}
            best = max(scores, key=scores.__getitem__)
            row["cloze"] = {"scores": scores, "pred": best, "correct": best == row["gold"]}
    if "generate" in s.methods or "reference" in s.methods:
        generated = greedy_generate(model, tokenizer, prompt_ids, s.batch_size, s.max_new_tokens, s.device)
        for row, ids, r in zip(rows, generated, records):
            row["generation"] = tokenizer.decode(ids, skip_special_tokens=True)
            if "generate" in s.methods:
                pred = parse_answer(row["generation"], list(r.options), r.multi)
                pred = "".join(pred) if pred else None
                row["generate"] = {"pred": pred, "correct": pred == row["gold"]}
        if "reference" in s.methods:
            forced_rows, candidates = [], []
            for p, ids, r in zip(prompt_ids, generated, records):
                prefix = ("\n" if ids else "") + ANSWER_PREFIX[r.lang]
                forced_rows.append(p + ids + _encode(tokenizer, prefix))
                candidates.append(letter_token_ids(tokenizer, prefix, list(r.options)))
            forced = forced_letters(model, forced_rows, candidates, [r.multi for r in records], pad, s.batch_size, s.device)
            for row, letters in zip(rows, forced):
                pred = "".join(letters) if letters else None
                row["reference"] = {"pred": pred, "correct": pred == row["gold"]}
    return rows


def evaluate_exam(model, tokenizer, path: Path, fmt: str, records: list[ExamRecord], s: EvalSettings,
                  pool: list[ExamRecord] | None = None, store: RecordStore | None = None, key: str = "",
                  log: Callable[[str], None] = print) -> dict:
    """Score this rank's share of the records not in `store`, gather every rank's rows.
    Few-shot examples come from `pool` (a dev file), else from the whole file minus the record."""
    from medcare_dist.dist import process_group as dist_utils

    wanted = {r.index for r in records}
    done = {i: row for i, row in (store.done(key) if store is not None else {}).items() if i in wanted}
    todo = [r for r in records if r.index not in done]
    if done:
        log(f"{path}: {len(done)} records already evaluated, {len(todo)} to go")
    same_file = pool is None
    pool = read_eval_file(path, s.fmt)[1] if same_file and s.num_fewshot else pool  # not cut by --limit
    mine = todo[s.rank::s.world_size]
    new_rows: list[dict] = []
    for start in range(0, len(mine), s.batch_size):
        batch = mine[start:start + s.batch_size]
        shots = [fewshot_examples(r, pool or [], s.num_fewshot, s.fewshot_seed, same_file) for r in batch]
        rows = score_records(model, tokenizer, batch, shots, s)
        if store is not None:
            store.append(key, rows)
        new_rows += rows
    gathered = [row for part in dist_utils.gather_objects(new_rows) for row in part]
    rows = sorted([*done.values(), *gathered], key=lambda r: r["index"])
    return exam_result(path, fmt, rows, s.methods)


@torch.no_grad()
def conversation_loss_sum(model, dataset, indices: list[int], pad_id: int, batch_size: int, device) -> tuple[float, int]:
    """(sum of next-token cross entropy over the trained tokens, their count) for `indices`:
    the training loss itself (training/lm_loss.py), so eval and training agree by construction."""
    total, tokens = 0.0, 0
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start:start + batch_size]], pad_id)
        labels = batch.pop("labels").to(device)
        inputs = {k: v.to(device) for k, v in batch.items()}
        total += float(model_lm_loss_sum(model, inputs, labels))
        tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total, tokens


def evaluate_conversations(model, tokenizer, path: Path, s: EvalSettings) -> dict:
    from medcare_dist.dist import process_group as dist_utils

    dataset, stats = build_dataset([path], tokenizer, s.max_length, thinking=s.thinking)
    n = len(dataset) if s.limit is None else min(s.limit, len(dataset))
    indices = list(range(s.rank, n, s.world_size))
    loss_sum, tokens = conversation_loss_sum(model, dataset, indices, pad_token_id(tokenizer), s.batch_size, s.device)
    loss_sum, tokens = dist_utils.all_reduce_sum([loss_sum, float(tokens)])
    loss = loss_sum / tokens if tokens else float("nan")
    return {"path": str(path), "kind": "conversations", "records": n, "truncated": stats.truncated,
            "label_tokens": int(tokens), "loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def read_files(paths: Sequence[str | Path], s: EvalSettings, fewshot_dev: Sequence[str | Path] = ()) -> list[tuple]:
    """[(path, format, records (cut at --limit) or None, few-shot dev pool or None)], every file read and checked
    before any model work. `fewshot_dev`: one dev file for all exam files, or one per exam file."""
    files = [(path, *read_eval_file(path, s.fmt)) for path in data_files(list(paths))]
    exams = [f for f in files if f[1] != "conversations"]
    if fewshot_dev and len(fewshot_dev) not in (1, len(exams)):
        raise ConfigError(f"--fewshot-dev gives {len(fewshot_dev)} files for {len(exams)} exam files (give 1 or {len(exams)})")
    pools = [read_eval_file(p, s.fmt)[1] for p in fewshot_dev]
    if any(p is None for p in pools):
        raise ConfigError("a --fewshot-dev file is a conversation file, not an exam")
    out, k = [], 0
    for path, fmt, records in files:
        pool = None
        if records is not None:
            pool = (pools[0] if len(pools) == 1 else pools[k]) if pools else None
            k += 1
            available = len(pool) if pool is not None else len(records) - 1  # the record itself is excluded
            records = records[:s.limit] if s.limit is not None else records
            wide = [r.index for r in records if r.multi and len(r.options) > MAX_MULTI_OPTIONS]
            if wide and "loglik" in s.methods:
                raise ConfigError(f"{path}: record {wide[0]}: a multiple-answer question with more than {MAX_MULTI_OPTIONS} "
                                 "options, too many letter sets for loglik (leave loglik out of --methods)")
            if s.num_fewshot > available:
                raise ConfigError(f"{path}: --num-fewshot {s.num_fewshot} needs more examples than its few-shot source has ({available})")
        out.append((path, fmt, records, pool))
    return out


def evaluate(model, tokenizer, files: list[tuple], settings: EvalSettings, store: RecordStore | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """One result per file of `read_files`; collective over the process group, if any."""
    results = []
    for position, (path, fmt, records, pool) in enumerate(files):
        t0 = time.perf_counter()
        if records is None:
            result = evaluate_conversations(model, tokenizer, path, settings)
        else:
            result = evaluate_exam(model, tokenizer, path, fmt, records, settings, pool, store,
                                   RecordStore.key(position, path), log)
        result["elapsed_s"] = round(time.perf_counter() - t0, 3)
        log(f"evaluated {path} ({fmt}, {result['records']} records) in {result['elapsed_s']:.1f} s")
        results.append(result)
    return results


def build_report(model_path: str, artefact: str, dtype: torch.dtype, settings: EvalSettings, results: list[dict],
                 elapsed_s: float) -> dict:
    return {"format": REPORT_FORMAT, "model": str(model_path), "artefact": artefact,
            "dtype": str(dtype).replace("torch.", ""), "world_size": settings.world_size,
            "settings": settings.public(), "files": results, "average": average(results, settings.methods),
            "elapsed_s": round(elapsed_s, 3)}


def _check_thinking(model_path: str, kind: str, thinking: bool) -> None:
    """A checkpoint is evaluated with the prompts it was trained with (`thinking`, data.chat.assistant_prompt)."""
    from medcare_dist.artefacts.manifest import STAGE1_CHECKPOINT, STAGE2_CHECKPOINT, checkpoint_config

    if kind in (STAGE1_CHECKPOINT, STAGE2_CHECKPOINT) and checkpoint_config(model_path).thinking != thinking:
        raise ConfigError(f"{model_path} was trained with thinking: {str(not thinking).lower()}; evaluate it "
                          f"{'with' if not thinking else 'without'} --thinking, as its prompts were rendered")


def run_eval(model_path: str | None, data: Sequence[str] | None = None, out: str | None = None, *,
             adapter: str | None = None, records_dir: str | None = None, fewshot_dev: Sequence[str] = (),
             dtype: str = "auto", trust_remote_code: bool = False, timeout_minutes: float = 30.0,
             **settings) -> dict | None:
    """The `medcare-dist eval` command: read and check every file, join the process group (a
    world of one without a launcher), load the artefact on every rank, evaluate, write and
    print the report on rank 0. `settings` are EvalSettings fields. Returns the report on
    rank 0, None elsewhere."""
    from medcare_dist.dist import process_group as dist_utils
    from medcare_dist.eval.model import check_model_args, load_eval_model
    from medcare_dist.artefacts.hf_model import resolve_dtype

    s = EvalSettings(**settings)
    bad = [m for m in s.methods if m not in METHODS]
    if bad or not s.methods:
        raise ConfigError(f"unknown method(s) {bad} (choose from {', '.join(METHODS)})")
    if s.batch_size < 1 or s.max_new_tokens < 0 or s.max_length < 2 or s.num_fewshot < 0 or (s.limit or 1) < 1:
        raise ConfigError(f"bad settings: {s.public()}")
    generating = [m for m in s.methods if m in ("generate", "reference")]
    if s.max_new_tokens == 0 and generating:
        raise ConfigError(f"--max-new-tokens 0 generates nothing for --methods {' '.join(generating)}: "
                          "give --max-new-tokens >= 1, or --methods loglik cloze")
    if not data:
        from medcare_dist.resources import SAMPLE_DIR

        if not (SAMPLE_DIR / "exam.jsonl").is_file():
            raise ConfigError("no --data given (and the sample exam of a source checkout is not here)")
        data = [str(SAMPLE_DIR / "exam.jsonl")]
    # bad input fails before the process group and the model load
    files = read_files(data, s, fewshot_dev)
    model_path, kind = check_model_args(model_path, adapter)
    _check_thinking(model_path, kind, s.thinking)
    torch_dtype = resolve_dtype(dtype)
    store = None
    if records_dir:
        run_info = {"model": model_path, "adapter": adapter, "dtype": str(torch_dtype),
                    "files": [str(f[0]) for f in files], "fewshot_dev": [str(p) for p in fewshot_dev]} | {
            k: v for k, v in s.public().items() if k not in ("batch_size", "limit", "max_length")}
        store = RecordStore(records_dir, run_info)
        store.check()
    t0 = time.perf_counter()
    world = dist_utils.init_distributed(timeout_minutes)
    try:
        log = print if world.is_main else (lambda *_: None)
        if not world.is_main:
            import datasets

            datasets.disable_progress_bars()
        model, tokenizer, artefact = load_eval_model(model_path, kind, adapter, torch_dtype, world.device, trust_remote_code)
        check_logits_after_head(model, world.device)  # scores and losses are computed from the LM head's output
        log(f"eval: {model_path} ({artefact}{', adapter ' + str(adapter) if adapter else ''}), {torch_dtype}, "
            f"{world.world_size} rank(s)")
        s.rank, s.world_size, s.device = world.rank, world.world_size, world.device
        if store is not None:
            store.rank = world.rank
            dist_utils.barrier()  # every rank has checked run.json before rank 0 writes it
            if world.is_main:
                store.prepare(log)
            dist_utils.barrier()
        results = evaluate(model, tokenizer, files, s, store, log=log)
        report = build_report(model_path, artefact, torch_dtype, s, results, time.perf_counter() - t0)
        if adapter:
            report["adapter"] = str(adapter)
        if world.is_main:
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            print(format_table(report))
            if out:
                print(f"wrote {out}")
            sys.stdout.flush()
        dist_utils.barrier()
        return report if world.is_main else None
    finally:
        dist_utils.shutdown()
