"""Evaluation of any pipeline artefact: held-out LM loss and multiple-choice exam accuracy.

    medcare-dist eval --model DIR --data exam.jsonl held_out.jsonl [--out report.json]
    deepspeed --num_gpus 8 --module medcare_dist eval --model DIR --data ...

`--model` is a plain HF model dir (or hub name), a prepared stage-2 base, a stage-1 or a
stage-2 checkpoint (`loading.load_trained_model`). Each rank loads the whole model (no
ZeRO: evaluation holds no optimizer state) and evaluates records rank, rank + W, rank + 2W,
... of every file; sums are all-reduced and per-record results gathered, so the numbers do
not depend on the number of ranks.

A data file is either

- conversations (the training format, `data.py`): the held-out LM loss is the token-weighted
  mean next-token cross entropy over the trained (assistant) tokens of all records, exactly
  the training objective's LM part; perplexity = exp(loss);
- an exam: records `{"question", "options": {"A": ..., "B": ...}, "answer": "B", "subject"?}`
  (`options` may also be a list, lettered A, B, ... in order). Each question becomes one user
  turn: the question, one line per option ("A. text"), and an instruction to answer in the
  form "The answer is X." (English) or "答案为X。" (Chinese, when the question contains CJK
  characters), rendered with the chat template and its generation prompt. Two accuracies:

  * loglik: for every option letter X, score(X) = the sum of the log-probabilities of the
    tokens of the answer sentence "The answer is X." (or "答案为X。"), tokenised on its own,
    given the prompt tokens. The prediction is the letter with the highest score (the first
    in option order on a tie). The sentences differ only in the letter, so this compares the
    model's probability of each letter where the answer format puts it, as the MedCare
    reference scores "the letter after the phrase".
  * generate: greedy decoding (no sampling, no repetition penalty, whatever the model's
    generation_config says) of at most `max_new_tokens` tokens, stopped at <|im_end|> / EOS;
    the letter is read from the text by `parse_answer_letter`. A generation that names no
    option letter scores wrong and is counted as `unparsed`.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .data import DataError, build_dataset, collate, data_files

REPORT_FORMAT = "medcare_dist.eval/1"
ANSWER_SENTENCE = {"en": "The answer is {letter}.", "zh": "答案为{letter}。"}
INSTRUCTION = {
    "en": 'Answer with the letter of the correct option, in the form "The answer is X."',
    "zh": "请选出正确答案，并以“答案为X。”的形式作答。",
}
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 8
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


# ------------------------------------------------------------------------------ records


@dataclass
class ExamRecord:
    index: int  # position in its file
    question: str
    options: dict[str, str]  # letter -> text, in the file's order
    answer: str
    subject: str | None = None
    lang: str = "en"


def is_exam_record(record) -> bool:
    return isinstance(record, dict) and all(k in record for k in ("question", "options", "answer"))


def question_language(question: str) -> str:
    return "zh" if _CJK.search(question) else "en"


def parse_exam_record(record, index: int) -> ExamRecord:
    """Validate one exam record; raises DataError (without a location) naming the problem."""
    if not is_exam_record(record):
        raise DataError("not an exam record (needs 'question', 'options' and 'answer')")
    question, options, answer = record["question"], record["options"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise DataError("'question' is not a non-empty string")
    if isinstance(options, list):
        options = {chr(ord("A") + i): text for i, text in enumerate(options)}
    if not isinstance(options, dict) or len(options) < 2:
        raise DataError("'options' must be an object {letter: text} (or a list) of at least 2 options")
    clean: dict[str, str] = {}
    for key, text in options.items():
        letter = str(key).strip().upper()
        if not re.fullmatch(r"[A-Z]", letter):
            raise DataError(f"option key {key!r} is not a single letter A-Z")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"option {letter} is not a non-empty string")
        if letter in clean:
            raise DataError(f"option {letter} appears twice")
        clean[letter] = text.strip()
    letter = str(answer).strip().upper()
    if letter not in clean:
        raise DataError(f"answer {answer!r} is not one of the option letters {', '.join(clean)}")
    subject = record.get("subject")
    return ExamRecord(index, question.strip(), clean, letter, str(subject) if subject not in (None, "") else None,
                      question_language(question))


def read_eval_file(path: str | Path) -> tuple[str, list[ExamRecord] | None]:
    """("exam", records) when the file's first record is an exam question (then all must be),
    else ("conversations", None): conversation files are read by `data.build_dataset`."""
    from .data import _raw_records  # the data module's reader: JSON, JSONL and Parquet

    path = Path(path)
    kind, records = None, []
    for index, line, raw in _raw_records(path):
        if isinstance(raw, DataError):
            raise raw.at(path, index, line)
        if kind is None:
            kind = "exam" if is_exam_record(raw) else "conversations"
            if kind == "conversations":
                return kind, None
        try:
            records.append(parse_exam_record(raw, index))
        except DataError as err:
            raise err.at(path, index, line) from None
    if kind is None:
        raise DataError("no records", path)
    return kind, records


# ------------------------------------------------------------------------------ prompts


def exam_messages(record: ExamRecord) -> list[dict]:
    lines = [record.question] + [f"{letter}. {text}" for letter, text in record.options.items()]
    lines.append(INSTRUCTION[record.lang])
    return [{"role": "user", "content": "\n".join(lines)}]


def exam_prompt(tokenizer, record: ExamRecord) -> str:
    """The chat-template rendering of the question, ending with the generation prompt."""
    return tokenizer.apply_chat_template(exam_messages(record), tokenize=False, add_generation_prompt=True)


def answer_sentence(letter: str, lang: str) -> str:
    return ANSWER_SENTENCE[lang].format(letter=letter)


# ------------------------------------------------------------------------------ parsing

_OPEN = r"[\s*(\[（【\"'“]*"  # what may stand between a phrase and its letter: spaces, **, (, [, quotes
_LETTER = r"([A-Za-z])(?![A-Za-z])"
# Phrases naming the answer, by priority: an "answer" phrase wins over an "option" phrase.
_PHRASES = [
    # "The answer is B", "Answer: (B)", "answer is **B**"; "答案为B", "答案是：B", "正确答案：（B）"
    re.compile(r"answer\s*(?:is|:|=)?\s*" + _OPEN + _LETTER, re.IGNORECASE),
    re.compile(r"答案\s*(?:为|是|应为|应该是|应选|选)?\s*[:：]?" + _OPEN + _LETTER),
    # "The correct option is C", "choice: C"; "故选C", "应选择B", "选项B"
    re.compile(r"(?:option|choice)\s*(?:is|:)\s*" + _OPEN + _LETTER, re.IGNORECASE),
    re.compile(r"(?:选项|选择|选)\s*(?:为|是)?\s*[:：]?" + _OPEN + _LETTER),
]
# A reply that starts with a lone letter: "B", "(B)", "B.", "B. Loop diuretic", "B)", "B。".
_LONE = re.compile(r"^" + _OPEN + r"([A-Z])[\s*)\]）】\"'”]*(?:[.。:：,，)）、]|$)")


def parse_answer_letter(text: str, letters: Sequence[str] = "ABCD") -> str | None:
    """The option letter a generated answer names, or None.

    In order of priority: the first "answer is X" / "answer: X" phrase (English, any case of
    "answer"), then "答案为X" / "答案是X" / "答案：X" (Chinese), then "option is X" / "choice: X",
    then "选X" / "选项X" / "选择X"; else a reply that starts with a lone letter ("B", "(B)",
    "B.", "B. Loop diuretic", "B。"). Only a capital letter that is one of `letters` counts
    ("the answer is a fever" names none). Full-width letters and punctuation are normalised
    first. None means the reply names no option: it scores wrong and counts as `unparsed`.
    """
    text = unicodedata.normalize("NFKC", text or "")
    valid = {letter.upper() for letter in letters}
    for pattern in _PHRASES:
        for match in pattern.finditer(text):
            letter = match.group(1)
            # in English phrases only a capital counts: "the answer is a fever" names no option
            if letter.isupper() and letter in valid:
                return letter
    match = _LONE.match(text.strip())
    if match and match.group(1) in valid:
        return match.group(1)
    return None


# ------------------------------------------------------------------------------ scoring


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids for left-padded rows (positions start at 0
    at each row's first real token, so padding does not shift the rotary positions)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.no_grad()
def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int,
                          batch_size: int, device) -> list[float]:
    """sum_t log p(continuation_t | prompt, continuation_<t) for each (prompt, continuation) pair.

    Rows are left-padded so that every continuation ends at the last position; only the last
    (longest continuation + 1) positions' logits are computed (`logits_to_keep`)."""
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        p_batch, c_batch = prompts[start:start + batch_size], continuations[start:start + batch_size]
        ids, mask, positions = _left_pad([p + c for p, c in zip(p_batch, c_batch)], pad_id, device)
        keep = max(len(c) for c in c_batch) + 1
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        except TypeError:  # a custom model without logits_to_keep
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -keep:]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [rows, keep, vocab]
        width = ids.shape[1]
        for i, cont in enumerate(c_batch):
            n = len(cont)
            # token at sequence position p is predicted by the logits at p - 1, kept at index p - 1 - (width - keep)
            first = width - n - 1 - (width - keep)
            target = torch.as_tensor(cont, device=logprobs.device)
            scores.append(float(logprobs[i, first:first + n].gather(-1, target[:, None]).sum()))
    return scores


def score_options(model, tokenizer, records: list[ExamRecord], batch_size: int, device) -> list[dict[str, float]]:
    """Per record, {letter: log-likelihood of its answer sentence given the prompt}."""
    prompts, conts, owners = [], [], []
    for r, record in enumerate(records):
        prompt_ids = tokenizer(exam_prompt(tokenizer, record), add_special_tokens=False)["input_ids"]
        for letter in record.options:
            prompts.append(prompt_ids)
            conts.append(tokenizer(answer_sentence(letter, record.lang), add_special_tokens=False)["input_ids"])
            owners.append((r, letter))
    flat = continuation_logprobs(model, prompts, conts, _pad_id(tokenizer), batch_size, device)
    out: list[dict[str, float]] = [{} for _ in records]
    for (r, letter), score in zip(owners, flat):
        out[r][letter] = score
    return out


def best_option(scores: dict[str, float]) -> str:
    """The highest-scoring letter; the first in option order on a tie."""
    return max(scores, key=scores.__getitem__)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _stop_ids(tokenizer) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[ExamRecord], batch_size: int, max_new_tokens: int, device) -> list[str]:
    """Greedy replies (decoded, special tokens dropped) to each record's prompt."""
    from transformers import GenerationConfig

    pad_id, stops = _pad_id(tokenizer), _stop_ids(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              eos_token_id=stops, pad_token_id=pad_id, use_cache=True)
    # Our own copy of the model: drop its generation defaults (sampling, top_p, penalties) so
    # that nothing but `config` applies.
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad_id)
    replies: list[str] = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        rows = [tokenizer(exam_prompt(tokenizer, r), add_special_tokens=False)["input_ids"] for r in batch]
        ids, mask, _ = _left_pad(rows, pad_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, ids.shape[1]:]:
            tokens = row.tolist()
            for i, t in enumerate(tokens):
                if t in stops:
                    tokens = tokens[:i]
                    break
            replies.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return replies


@torch.no_grad()
def conversation_loss_sum(model, dataset, indices: list[int], pad_id: int, batch_size: int, device) -> tuple[float, int]:
    """(sum of next-token cross entropy over the trained tokens, their count) for `indices`."""
    from .losses import causal_lm_loss_sum

    total, tokens = 0.0, 0
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start:start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(causal_lm_loss_sum(logits, batch["labels"]))
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total, tokens


# ------------------------------------------------------------------------------ files


@dataclass
class EvalSettings:
    batch_size: int = DEFAULT_BATCH_SIZE  # sequences per forward
    max_length: int = 2048  # conversation files: records are cut here, as in training
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    generate: bool = True  # the generated-answer accuracy (the slower of the two)
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _accuracy_block(rows: list[dict]) -> dict:
    n = len(rows)
    ll = sum(r["loglik_choice"] == r["answer"] for r in rows)
    block = {"records": n, "correct_loglik": ll, "accuracy_loglik": ll / n if n else None}
    if rows and "generated_choice" in rows[0]:
        gen = sum(r["generated_choice"] == r["answer"] for r in rows)
        block |= {"correct_generate": gen, "accuracy_generate": gen / n if n else None,
                  "unparsed": sum(r["generated_choice"] is None for r in rows)}
    return block


def evaluate_exam(model, tokenizer, path: Path, records: list[ExamRecord], s: EvalSettings) -> dict:
    mine = records[s.rank::s.world_size]
    scores = score_options(model, tokenizer, mine, s.batch_size, s.device)
    replies = generate_answers(model, tokenizer, mine, s.batch_size, s.max_new_tokens, s.device) if s.generate else None
    rows = []
    for k, (record, sc) in enumerate(zip(mine, scores)):
        row = {"index": record.index, "subject": record.subject, "answer": record.answer,
               "loglik_choice": best_option(sc), "loglik_scores": {l: round(v, 6) for l, v in sc.items()}}
        if replies is not None:
            row["generated"] = replies[k]
            row["generated_choice"] = parse_answer_letter(replies[k], list(record.options))
        rows.append(row)
    from . import distributed as dist_utils

    rows = sorted((r for part in dist_utils.gather_objects(rows) for r in part), key=lambda r: r["index"])
    result = {"path": str(path), "kind": "exam", **_accuracy_block(rows)}
    subjects = sorted({r["subject"] for r in rows if r["subject"] is not None})
    if subjects:
        result["subjects"] = {name: _accuracy_block([r for r in rows if r["subject"] == name]) for name in subjects}
    result["predictions"] = rows
    return result


def evaluate_conversations(model, tokenizer, path: Path, s: EvalSettings) -> dict:
    from . import distributed as dist_utils

    dataset, stats = build_dataset([path], tokenizer, s.max_length)
    indices = list(range(s.rank, len(dataset), s.world_size))
    loss_sum, tokens = conversation_loss_sum(model, dataset, indices, _pad_id(tokenizer), s.batch_size, s.device)
    loss_sum, tokens = dist_utils.all_reduce_sum([loss_sum, float(tokens)])
    loss = loss_sum / tokens if tokens else float("nan")
    return {"path": str(path), "kind": "conversations", "records": len(dataset), "truncated": stats.truncated,
            "label_tokens": int(tokens), "loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def evaluate(model, tokenizer, paths: Sequence[str | Path], settings: EvalSettings,
             log: Callable[[str], None] = print) -> list[dict]:
    """One result per file (see the module docstring); collective over the process group, if any."""
    results = []
    for path in data_files(list(paths)):
        kind, records = read_eval_file(path)
        t0 = time.perf_counter()
        if kind == "exam":
            result = evaluate_exam(model, tokenizer, path, records, settings)
        else:
            result = evaluate_conversations(model, tokenizer, path, settings)
        result["elapsed_s"] = round(time.perf_counter() - t0, 3)
        log(f"evaluated {path} ({kind}, {result['records']} records) in {result['elapsed_s']:.1f} s")
        results.append(result)
    return results


# ------------------------------------------------------------------------------ report


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(report: dict) -> str:
    """The report as a fixed-width text table: one row per file, one per subject under it."""
    header = ("file / subject", "records", "loss", "ppl", "acc_loglik", "acc_generate", "unparsed")
    rows = [header]
    for result in report["files"]:
        name = Path(result["path"]).name
        if result["kind"] == "conversations":
            rows.append((name, str(result["records"]), _fmt(result["loss"]), _fmt(result["perplexity"], 2), "-", "-", "-"))
            continue
        rows.append((name, str(result["records"]), "-", "-", _fmt(result["accuracy_loglik"]),
                     _fmt(result.get("accuracy_generate")), _fmt(result.get("unparsed"))))
        for subject, block in result.get("subjects", {}).items():
            rows.append((f"  {subject}", str(block["records"]), "", "", _fmt(block["accuracy_loglik"]),
                         _fmt(block.get("accuracy_generate")), _fmt(block.get("unparsed"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def build_report(model_path: str, artefact: str, dtype: torch.dtype, settings: EvalSettings, results: list[dict],
                 elapsed_s: float) -> dict:
    return {
        "format": REPORT_FORMAT,
        "model": str(model_path),
        "artefact": artefact,
        "dtype": str(dtype).replace("torch.", ""),
        "world_size": settings.world_size,
        "settings": {"batch_size": settings.batch_size, "max_length": settings.max_length,
                     "max_new_tokens": settings.max_new_tokens, "generate": settings.generate,
                     "loglik_continuation": ANSWER_SENTENCE},
        "files": results,
        "elapsed_s": round(elapsed_s, 3),
    }


def run_eval(model_path: str, data: Sequence[str] | None = None, out: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             max_length: int = 2048, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, dtype: str = "auto",
             generate: bool = True, trust_remote_code: bool = False, timeout_minutes: float = 30.0) -> dict | None:
    """The `medcare-dist eval` command: join the process group (a world of one without a
    launcher), load the artefact on every rank, evaluate, write and print the report on rank 0.
    Returns the report on rank 0, None elsewhere."""
    from . import distributed as dist_utils
    from .artefacts import describe
    from .errors import ConfigError, InputNotFoundError
    from .loading import load_trained_model
    from .model import resolve_dtype

    if batch_size < 1 or max_new_tokens < 0 or max_length < 2:
        raise ConfigError(f"bad settings: batch_size={batch_size}, max_new_tokens={max_new_tokens}, max_length={max_length}")
    if not data:
        from .tiny import SAMPLE_DIR

        if not (SAMPLE_DIR / "exam.jsonl").is_file():
            raise ConfigError("no --data given (and the sample exam of a source checkout is not here)")
        data = [str(SAMPLE_DIR / "exam.jsonl")]
    files = data_files(list(data))
    for path in files:  # bad input fails before the process group and the model load
        if not path.is_file():
            raise InputNotFoundError(f"data file not found: {path}")
    if not Path(model_path).is_dir() and (Path(model_path).exists() or str(model_path).startswith((".", "/"))):
        raise InputNotFoundError(f"model directory not found: {model_path}")
    artefact = describe(model_path)  # "hf" for a hub name
    torch_dtype = resolve_dtype(dtype)
    t0 = time.perf_counter()
    world = dist_utils.init_distributed(timeout_minutes)
    try:
        log = print if world.is_main else (lambda *_: None)
        if not world.is_main:
            import datasets

            datasets.disable_progress_bars()
        model, tokenizer, adapters = load_trained_model(model_path, torch_dtype, trust_remote_code)
        model.to(world.device)
        if adapters is not None:
            adapters.to(world.device)
        log(f"eval: {model_path} ({artefact}), {torch_dtype}, {world.world_size} rank(s)")
        settings = EvalSettings(batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
                                generate=generate and max_new_tokens > 0, rank=world.rank,
                                world_size=world.world_size, device=world.device)
        results = evaluate(model, tokenizer, files, settings, log=log)
        report = build_report(model_path, artefact, torch_dtype, settings, results, time.perf_counter() - t0)
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
