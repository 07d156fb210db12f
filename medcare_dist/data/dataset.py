"""Data pipeline: from data specs to a tokenised dataset (`chat`: assistant-only labels).

Records are read as streams (`sources`), validated and normalised (`formats`), written to
Arrow in batches (`datasets.Dataset.from_generator`), mixed by count, and tokenised by
`num_proc` processes. Training loads go through the content-addressed cache (`cache`): one
process per job tokenises, every rank memory-maps the result. No record or no trained token
left is an error, never an empty run; a bad record stops the run or, with
``on_bad_record="skip"``, is counted and named in the stats. Batches: see `batching`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import datasets
import numpy as np

from medcare_dist.config import choices
from medcare_dist.data.cache import (DATASET_SUBDIR, MANIFEST_NAME, entry_problem, failure_note, read_manifest, recipe_key,
                                     wait_for_entry, write_entry)
from medcare_dist.data.chat import check_tokenizer, control_token_strings, tokenize_conversation, tokenizer_fingerprint
from medcare_dist.data.formats import normalize_record
from medcare_dist.data.sources import Source, data_files, data_specs, draw, read_located, resolve_sources, split_count
from medcare_dist.errors import ChatTemplateError, DataError, MedcareError
from medcare_dist.files import require_empty_dir

__all__ = ["DataStats", "build_dataset", "data_files", "load_dataset_for_training", "normalize_record", "preprocess",
           "read_records", "MANIFEST_NAME"]

RAW_FEATURES = datasets.Features({"messages": datasets.Value("string"), "source": datasets.Value("string"),
                                  "error": datasets.Value("string")})
FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "num_label_tokens": datasets.Value("int32"),
        "length": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        "whitespace_adjusted": datasets.Value("bool"),
        "error": datasets.Value("string"),
    }
)
RECORDS_PER_PROCESS = 1000  # fewer records per worker than this: starting the workers costs more than it saves


@dataclass
class DataStats:
    """What happened to the records on their way into the dataset.

    records_read = skipped + dropped_no_labels + records, for a mix without counts.
    """

    records_read: int = 0  # records found in the files
    skipped: int = 0  # invalid records skipped (on_bad_record="skip"), the chat template's refusals included
    truncated: int = 0  # kept records that were cut at max_length
    whitespace_adjusted: int = 0  # kept records with a reply the template trimmed (trained as rendered)
    dropped_no_labels: int = 0  # records cut so short that no trained token was left
    records: int = 0  # records in the dataset
    tokens: int = 0  # input tokens in the dataset
    label_tokens: int = 0  # tokens that contribute to the loss (sum of num_label_tokens)
    errors: list[str] = field(default_factory=list)  # one message per skipped record
    sources: list[dict] = field(default_factory=list)  # per spec: records and label_tokens in the dataset

    def summary(self, max_length: int) -> str:
        line = (
            f"data: {self.records} records ({self.skipped} invalid skipped, {self.truncated} "
            f"truncated to {max_length} tokens, {self.dropped_no_labels} dropped with no trained "
            f"token left), {self.tokens} tokens, {self.label_tokens} trained"
        )
        if self.whitespace_adjusted:
            line += f"; {self.whitespace_adjusted} records with replies the chat template trims, trained as it renders them"
        if len(self.sources) > 1 or any("#" in s["spec"] for s in self.sources):
            line += "; " + "; ".join(f"{s['spec']}: {s['records']} records, {s['label_tokens']} trained" for s in self.sources)
        return line


# ---------------------------------------------------------------------------- reading


def read_records(path: str | Path, on_bad_record: str = "error",
                 forbidden: tuple[str, ...] = ()) -> tuple[list[list[dict]], list[DataError], list[str]]:
    """Read and validate one file into lists (small files: evaluation, tests); return the
    conversations, in skip mode the errors, and where each conversation came from
    ("FILE: record I (line L)"). With ``on_bad_record="error"`` the first invalid record raises."""
    _check_choice("on_bad_record", on_bad_record)
    conversations, errors, sources = [], [], []
    for where, result in read_located(Path(path), partial(normalize_record, forbidden=forbidden)):
        if isinstance(result, DataError):
            if on_bad_record == "error":
                raise result
            errors.append(result)
        else:
            conversations.append(result)
            sources.append(where)
    return conversations, errors, sources


def _generate_records(files: list[str], forbidden: tuple[str, ...], on_bad_record: str):
    """Rows for `Dataset.from_generator`: a record's messages as JSON, its location, and in
    skip mode the error of a bad record (its messages empty)."""
    for path in files:
        for where, result in read_located(Path(path), partial(normalize_record, forbidden=forbidden)):
            if isinstance(result, DataError):
                if on_bad_record == "error":
                    raise result
                yield {"messages": "", "source": where, "error": str(result)}
            else:
                yield {"messages": json.dumps(result, ensure_ascii=False), "source": where, "error": ""}


def _check_choice(name: str, value: str) -> None:
    if value not in choices(name):
        raise ValueError(f"{name} must be one of {', '.join(choices(name))}, not {value!r}")


# --------------------------------------------------------------------------- datasets


def build_dataset(spec: str | Path | Sequence[str | Path], tokenizer, max_length: int, on_bad_record: str = "error",
                  num_proc: int | None = None, control_tokens: str = "error", seed: int = 0,
                  work_dir: str | Path | None = None, thinking: bool = False) -> tuple[datasets.Dataset, DataStats]:
    """Read, validate, mix and tokenise the specs into a Dataset with columns input_ids,
    labels, num_label_tokens, length (`thinking`: `chat.assistant_prompt`). Arrow files go
    under `work_dir` (None: a temporary directory, and the result is held in memory). No usable
    record left is a DataError."""
    _check_choice("on_bad_record", on_bad_record)
    _check_choice("control_tokens", control_tokens)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, not {max_length}")
    check_tokenizer(tokenizer)
    sources = resolve_sources(spec)  # missing files are named before anything is read
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="medcare_data_") as tmp:
            dataset, stats = build_dataset(spec, tokenizer, max_length, on_bad_record, num_proc, control_tokens, seed, tmp,
                                           thinking)
            return dataset.flatten_indices(keep_in_memory=True), stats
    work = str(Path(work_dir) / "work")
    forbidden = control_token_strings(tokenizer) if control_tokens == "error" else ()
    parts, errors, records_read = [], [], 0
    for i, source in enumerate(sources):
        raw = _read_source(source, forbidden, on_bad_record, work)
        records_read += len(raw)
        bad = raw.filter(lambda e: e != "", input_columns="error", cache_file_name=f"{work}/bad{i}.arrow")
        errors += bad["error"]
        valid = raw.filter(lambda e: e == "", input_columns="error", cache_file_name=f"{work}/valid{i}.arrow")
        if source.records is not None:
            if not len(valid):
                raise DataError(f"{source.spec}: no valid record to draw {source.records} records from"
                                + (f" (the first error: {errors[-1]})" if len(bad) else ""))
            valid = valid.select(draw(len(valid), source.records, seed, i))
        parts.append(valid)
    if not sum(map(len, parts)):
        found = f": all {len(errors)} records are invalid (the first: {errors[0]})" if errors else ": they hold no record"
        raise DataError(f"no valid records in {', '.join(s.spec for s in sources)}{found}")
    source_of = np.concatenate([np.full(len(part), i, dtype=np.int32) for i, part in enumerate(parts)])  # per-source counts
    raw = datasets.concatenate_datasets(parts).add_column("source_index", source_of)
    procs = max(1, min(num_proc or 1, len(raw) // RECORDS_PER_PROCESS))
    tokenized = raw.map(
        _tokenize_row,
        input_columns=["messages", "source"],
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "on_bad_record": on_bad_record, "thinking": thinking},
        remove_columns=["messages", "source"],
        features=datasets.Features({**FEATURES, "source_index": datasets.Value("int32")}),
        num_proc=procs if procs > 1 else None,
        cache_file_name=f"{work}/tokenized.arrow",
        desc="tokenising",
    )
    refused = tokenized.filter(lambda e: e != "", input_columns="error", cache_file_name=f"{work}/refused.arrow")
    errors += refused["error"]
    kept = tokenized.filter(lambda n, e: n > 0 and e == "", input_columns=["num_label_tokens", "error"],
                            cache_file_name=f"{work}/kept.arrow")
    if not len(kept):  # every record has a non-empty reply: only truncation (or the template) can take all of it
        if refused.num_rows == tokenized.num_rows:
            raise DataError(f"no valid records: the chat template refused all {len(refused)} (the first: {errors[-len(refused)]})")
        raise DataError(f"all {len(tokenized) - len(refused)} records lost every trained token at max_length {max_length}: "
                        "the prompts are longer; raise max_length")
    stats = _stats(tokenized, len(kept), sources, records_read, errors, dropped=len(tokenized) - len(refused) - len(kept))
    return kept.remove_columns(["truncated", "whitespace_adjusted", "error", "source_index"]), stats


def _read_source(source: Source, forbidden: tuple[str, ...], on_bad_record: str, work: str) -> datasets.Dataset:
    """The source's records as an Arrow dataset, written in batches; the first bad record's
    DataError (error mode) or a whole-file error comes out as itself, not wrapped."""
    try:
        return datasets.Dataset.from_generator(
            _generate_records, features=RAW_FEATURES, cache_dir=work,
            gen_kwargs={"files": [str(p) for p in source.files], "forbidden": forbidden, "on_bad_record": on_bad_record},
        )
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, MedcareError):
            raise err.__cause__ from None
        raise
    except ValueError as err:  # files without a single record: datasets finds "no data" to build from
        if isinstance(err, MedcareError) or "no data" not in str(err):
            raise
        return datasets.Dataset.from_dict({name: [] for name in RAW_FEATURES}, features=RAW_FEATURES)


def _tokenize_row(messages: str, source: str, tokenizer, max_length: int, on_bad_record: str, thinking: bool) -> dict:
    """One record's tokens; a chat template that raises on it (Mistral's "roles must alternate"),
    or tool use it cannot render, is this record's DataError: raised, or in skip mode carried
    in `error` and counted."""
    import jinja2

    try:
        return {**tokenize_conversation(json.loads(messages), tokenizer, max_length, thinking), "error": ""}
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{source}: {err}") from None
    except (jinja2.TemplateError, DataError) as err:
        refused = "the chat template refused this record: " if isinstance(err, jinja2.TemplateError) else ""
        message = f"{source}: {refused}{err}"
        if on_bad_record == "error":
            raise DataError(message) from None
        return {"input_ids": [], "labels": [], "num_label_tokens": 0, "length": 0, "truncated": False,
                "whitespace_adjusted": False, "error": message}


def _stats(tokenized: datasets.Dataset, kept: int, sources: list[Source], records_read: int, errors: list[str],
           dropped: int) -> DataStats:
    """Totals and per-source counts over the `kept` rows of `tokenized` (those with a trained
    token and no error), summed over Arrow batches of the count columns only. Not over the
    filtered dataset itself: reading through its indices mapping copies the rows out of the
    memory-mapped file (about 300 MB per 100,000 records of token ids, measured)."""
    import pyarrow.compute as pc

    per = [{"spec": s.spec, "records": 0, "label_tokens": 0} for s in sources]
    totals = dict.fromkeys(("truncated", "whitespace_adjusted", "length", "num_label_tokens"), 0)
    counts = tokenized.select_columns([*totals, "source_index", "error"]).with_format("arrow")
    for batch in counts.iter(batch_size=65536):
        batch = batch.filter(pc.and_(pc.greater(batch["num_label_tokens"], 0), pc.equal(batch["error"], "")))
        for name in totals:
            totals[name] += pc.sum(pc.cast(batch[name], "int64")).as_py() or 0
        grouped = batch.group_by("source_index").aggregate([("num_label_tokens", "sum"), ("source_index", "count")])
        for row in grouped.to_pylist():
            per[row["source_index"]]["records"] += row["source_index_count"]
            per[row["source_index"]]["label_tokens"] += row["num_label_tokens_sum"]
    return DataStats(records_read=records_read, skipped=len(errors), truncated=totals["truncated"],
                     whitespace_adjusted=totals["whitespace_adjusted"], dropped_no_labels=dropped,
                     records=kept, tokens=totals["length"], label_tokens=totals["num_label_tokens"], errors=errors,
                     sources=per)


# ------------------------------------------------------------- cached and preprocessed


def _recipe(sources: list[Source], tokenizer, max_length: int, on_bad_record: str, control_tokens: str, seed: int,
            thinking: bool) -> tuple[dict, list[dict]]:
    """What decides an entry's content: inputs by content (size and sha256, not path), the
    tokenizer, the rules and the mix (the seed only where a count draws records); and the
    sources described with their paths, for the manifest."""
    described = [s.describe() for s in sources]
    return {
        "sources": [{"records": d["records"], "files": [{k: f[k] for k in ("size", "sha256")} for f in d["files"]]}
                    for d in described],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "on_bad_record": on_bad_record,
        "control_tokens": control_tokens,
        "thinking": thinking,
        "seed": seed if any(s.records is not None for s in sources) else None,
    }, described


def _write(entry: Path, spec, tokenizer, max_length: int, on_bad_record: str, num_proc: int | None, control_tokens: str,
           seed: int, log: Callable[[str], None], thinking: bool) -> dict:
    recipe, described = _recipe(resolve_sources(spec), tokenizer, max_length, on_bad_record, control_tokens, seed, thinking)

    def build(tmp: Path) -> dict:
        dataset, stats = build_dataset(spec, tokenizer, max_length, on_bad_record, num_proc, control_tokens, seed, tmp,
                                       thinking)
        dataset.save_to_disk(str(tmp / DATASET_SUBDIR))
        return {"key": recipe_key(recipe), "recipe": recipe, "sources": described, "vocab_size": len(tokenizer),
                "stats": asdict(stats)}

    return write_entry(entry, build, log)


def preprocess(spec: str | Path | Sequence[str | Path], tokenizer, max_length: int, out_dir: str | Path,
               on_bad_record: str = "error", num_proc: int | None = None, control_tokens: str = "error", seed: int = 0,
               log: Callable[[str], None] = print, thinking: bool = False) -> DataStats:
    """Tokenise the specs once into `out_dir` (the dataset plus a medcare_data.json manifest:
    the layout of a cache entry)."""
    out = require_empty_dir(out_dir)
    manifest = _write(out, spec, tokenizer, max_length, on_bad_record, num_proc, control_tokens, seed, log, thinking)
    stats = DataStats(**manifest["stats"])
    log(stats.summary(max_length))
    return stats


def load_dataset_for_training(spec: str | Path | Sequence[str | Path], tokenizer, max_length: int,
                              on_bad_record: str = "error", num_proc: int | None = None, control_tokens: str = "error",
                              log: Callable[[str], None] = print, *, seed: int = 0, cache_dir: str | Path | None = None,
                              writer: bool = True, writer_name: str = "rank 0",
                              note: Callable[[str], None] = print, thinking: bool = False) -> tuple[datasets.Dataset, DataStats]:
    """The training dataset; logs a one-line summary. From a preprocessed directory (checked
    against the tokenizer, max_length and the record rules); else, with `cache_dir`, from the
    cache entry of these inputs, which the `writer` builds when it is missing or broken and
    the others wait for (`note`: their progress lines); else built in memory."""
    _check_choice("on_bad_record", on_bad_record)
    _check_choice("control_tokens", control_tokens)
    files = data_files(spec)
    preprocessed = [f for f in files if (f / MANIFEST_NAME).is_file()]
    if preprocessed and (len(files) > 1 or split_count(data_specs(spec)[0])[1] is not None):
        raise DataError(f"{preprocessed[0]} is a preprocessed dataset, read whole as it was written: it takes no record "
                        "count and mixes with nothing; preprocess the mix itself (medcare-dist preprocess with the same --data)")
    if preprocessed:
        dataset, stats = _load_preprocessed(files[0], tokenizer, max_length, on_bad_record, control_tokens, thinking)
    elif cache_dir is None:
        dataset, stats = build_dataset(spec, tokenizer, max_length, on_bad_record, num_proc, control_tokens, seed,
                                       thinking=thinking)
    else:
        dataset, stats = _load_cached(Path(cache_dir), spec, tokenizer, max_length, on_bad_record, num_proc, control_tokens,
                                      seed, log, writer, writer_name, note, thinking)
    log(stats.summary(max_length))
    return dataset, stats


def default_num_proc() -> int:
    """Tokenising processes: the cores this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def _load_cached(cache_dir: Path, spec, tokenizer, max_length: int, on_bad_record: str, num_proc: int | None,
                 control_tokens: str, seed: int, log, writer: bool, writer_name: str, note,
                 thinking: bool) -> tuple[datasets.Dataset, DataStats]:
    check_tokenizer(tokenizer)
    recipe, _ = _recipe(resolve_sources(spec), tokenizer, max_length, on_bad_record, control_tokens, seed, thinking)
    entry = cache_dir / recipe_key(recipe)
    if writer:
        manifest = read_manifest(entry)
        problem = entry_problem(entry, manifest) if entry.exists() else "missing"
        if problem is None:
            log(f"data: cache hit, {entry}")
        else:
            log(f"data: tokenising into {entry}" + ("" if problem == "missing" else f" (the entry there is broken: {problem})"))
            failed = failure_note(entry)
            failed.unlink(missing_ok=True)
            try:
                manifest = _write(entry, spec, tokenizer, max_length, on_bad_record, num_proc, control_tokens, seed, log,
                                  thinking)
            except MedcareError as err:
                failed.write_text(f"{str(err).splitlines()[0]}\n", encoding="utf-8")
                raise
    else:
        started = time.monotonic()
        manifest = wait_for_entry(entry, writer_name, note)
        note(f"data: loading {entry}, tokenised by {writer_name} (waited {time.monotonic() - started:.0f} s)")
    return datasets.load_from_disk(str(entry / DATASET_SUBDIR)), DataStats(**manifest["stats"])


def _load_preprocessed(directory: Path, tokenizer, max_length: int, on_bad_record: str,
                       control_tokens: str, thinking: bool) -> tuple[datasets.Dataset, DataStats]:
    manifest = read_manifest(directory)
    problem = entry_problem(directory, manifest)
    if problem is not None:
        raise DataError(f"{directory}: not a usable preprocessed dataset: {problem}; preprocess again")
    recipe = manifest["recipe"]
    if recipe["max_length"] != max_length:
        raise DataError(f"{directory} was preprocessed with max_length {recipe['max_length']}, "
                        f"but max_length {max_length} was asked for: preprocess again")
    if recipe.get("thinking", False) != thinking:
        raise DataError(f"{directory} was preprocessed with thinking {recipe.get('thinking', False)}, "
                        f"but thinking {thinking} was asked for: preprocess again")
    given = tokenizer_fingerprint(tokenizer)
    if recipe["tokenizer"] != given:
        raise DataError(f"{directory} was tokenised with a different tokenizer (vocab size "
                        f"{manifest['vocab_size']}, fingerprint {recipe['tokenizer'][:12]}) than the "
                        f"one given (vocab size {len(tokenizer)}, fingerprint {given[:12]}): preprocess again")
    stats = DataStats(**manifest["stats"])
    if stats.skipped and on_bad_record == "error":
        raise DataError(f"{directory} was preprocessed with on_bad_record='skip' and skipped {stats.skipped} "
                        "invalid records; pass on_bad_record='skip' to accept that")
    if recipe["control_tokens"] == "as_text" and control_tokens == "error":
        raise DataError(f"{directory} was preprocessed with control_tokens='as_text' (control-token text kept as "
                        "plain text); pass control_tokens='as_text' to accept that")
    return datasets.load_from_disk(str(directory / DATASET_SUBDIR)), stats
