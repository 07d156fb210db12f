"""Data pipeline: read chat records and tokenise them (`chat`: assistant-only labels) into datasets.

Records come from JSON (an array of records), JSONL or Parquet files, in one of two shapes:

    MedCareData  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
    OpenAI       {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

Both are normalised to a list of ``{"role", "content"}`` messages and validated; text that
spells a control token (``<|im_end|>``, ...) is refused (``control_tokens="error"``: it could
forge turns) or kept as plain text (``"as_text"``). Labels: see `chat`. No record or no
trained token left is an error, never an empty run. Batches: see `batching`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import datasets

from medcare_dist.files import require_empty_dir, stream_sha256
from medcare_dist.data.chat import (check_tokenizer, control_token_strings, find_control_token,
                   tokenize_conversation, tokenizer_fingerprint)
from medcare_dist.config import choices
from medcare_dist.errors import ChatTemplateError, DataError, InputNotFoundError, location

MANIFEST_NAME = "medcare_data.json"
MANIFEST_FORMAT = "medcare_dist.data.dataset/2"  # 2: control-token text checked, replies located in the whole rendering
DATASET_SUBDIR = "tokenized"
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".parquet")

# Per record shape: the conversation key, the role key, the content key, role names.
SHAPES = {
    "conversations": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
}

FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "num_label_tokens": datasets.Value("int32"),
        "length": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
    }
)


@dataclass
class DataStats:
    """What happened to the records on their way into the dataset.

    records_read = skipped + dropped_no_labels + records.
    """

    records_read: int = 0  # records found in the files
    skipped: int = 0  # invalid records skipped (on_bad_record="skip")
    truncated: int = 0  # kept records that were cut at max_length
    dropped_no_labels: int = 0  # records cut so short that no trained token was left
    records: int = 0  # records in the dataset
    tokens: int = 0  # input tokens in the dataset
    label_tokens: int = 0  # tokens that contribute to the loss (sum of num_label_tokens)
    errors: list[str] = field(default_factory=list)  # one message per skipped record

    def summary(self, max_length: int) -> str:
        return (
            f"data: {self.records} records ({self.skipped} invalid skipped, {self.truncated} "
            f"truncated to {max_length} tokens, {self.dropped_no_labels} dropped with no trained "
            f"token left), {self.tokens} tokens, {self.label_tokens} trained"
        )


# ---------------------------------------------------------------------------- reading


def normalize_record(record: Any, forbidden: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Validate one raw record and return its messages as ``{"role", "content"}`` dicts.
    A message that spells one of the `forbidden` control tokens is an error.

    Raises DataError (without a location) naming the first problem found.
    """
    if not isinstance(record, dict):
        raise DataError(f"record is not an object (got {type(record).__name__})")
    present = [key for key in SHAPES if record.get(key) is not None]
    if not present:
        raise DataError("record has neither 'conversations' nor 'messages'")
    if len(present) > 1:
        raise DataError("record has both 'conversations' and 'messages'")
    key = present[0]
    role_key, content_key, role_names = SHAPES[key]
    turns = record[key]
    if not isinstance(turns, list):
        raise DataError(f"'{key}' is not a list (got {type(turns).__name__})")
    if not turns:
        raise DataError("empty conversation")
    messages = [_normalize_turn(turn, j, role_key, content_key, role_names, forbidden) for j, turn in enumerate(turns)]
    _check_turn_order([m["role"] for m in messages])
    return messages


def _normalize_turn(turn: Any, j: int, role_key: str, content_key: str, role_names: dict, forbidden: tuple) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f"turn {j} is not an object (got {type(turn).__name__})")
    role = turn.get(role_key)
    if role not in role_names:
        raise DataError(f"turn {j}: unknown role {role!r} in '{role_key}' (expected one of {', '.join(role_names)})")
    content = turn.get(content_key)
    if not isinstance(content, str):
        raise DataError(f"turn {j}: '{content_key}' is not a string (got {type(content).__name__})")
    if not content.strip():
        raise DataError(f"turn {j}: empty content")
    message = {"role": role_names[role], "content": content}
    reasoning = turn.get("reasoning_content")  # an assistant's reasoning (Qwen3's template renders it in <think>)
    if reasoning is not None:
        if message["role"] != "assistant" or not isinstance(reasoning, str) or not reasoning.strip():
            raise DataError(f"turn {j}: 'reasoning_content' must be non-empty text on an assistant turn")
        message["reasoning_content"] = reasoning
    for text in message.values():
        token = find_control_token(text, forbidden)
        if token is not None:
            raise DataError(f"turn {j}: the {role_names[role]} text contains the control token {token!r}, which would "
                            "act as one (a forged turn); remove it, or set control_tokens: as_text to keep it as plain text")
    return message


def _check_turn_order(roles: list[str]) -> None:
    for j, role in enumerate(roles):
        if role == "system" and j > 0:
            raise DataError(f"turn {j}: system turn is not the first turn")
        if j > 0 and role == roles[j - 1]:
            raise DataError(f"turns {j - 1} and {j}: two {role} turns in a row")
    dialogue = [role for role in roles if role != "system"]
    if "assistant" not in dialogue:
        raise DataError("no assistant turn")
    if dialogue[0] != "user":
        raise DataError("the first non-system turn is an assistant turn (expected a user turn)")
    if dialogue[-1] != "assistant":
        raise DataError("the last turn is a user turn (nothing after it would be trained)")


def read_records(path: str | Path, on_bad_record: str = "error",
                 forbidden: tuple[str, ...] = ()) -> tuple[list[list[dict]], list[DataError], list[str]]:
    """Read and validate one file; return the conversations, in skip mode the errors, and
    where each conversation came from ("FILE: record I (line L)").

    With ``on_bad_record="error"`` the first invalid record raises its DataError.
    """
    _check_on_bad_record(on_bad_record)
    conversations, errors, sources = [], [], []
    for index, line, record in _raw_records(Path(path)):
        try:
            if isinstance(record, DataError):
                raise record
            conversations.append(normalize_record(record, forbidden))
            sources.append(location(path, index, line))
        except DataError as err:
            located = err.at(path, index, line)
            if on_bad_record == "error":
                raise located from None
            errors.append(located)
    return conversations, errors, sources


def _raw_records(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    """Yield (record index, JSONL line number or None, parsed record or DataError)."""
    if not path.exists():
        raise InputNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file")
    suffix = path.suffix.lower()  # `.JSONL` is as good as `.jsonl`
    if suffix == ".jsonl":
        yield from _jsonl_records(path)
    elif suffix == ".json":
        yield from ((index, None, record) for index, record in enumerate(_json_array(path)))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from ((index, None, record) for index, record in enumerate(pq.read_table(path).to_pylist()))
    else:
        raise DataError(f"unsupported data file type {path.suffix!r} (expected one of {', '.join(SUPPORTED_SUFFIXES)})", path)


def _jsonl_records(path: Path) -> Iterator[tuple[int, int, Any]]:
    index = 0
    with path.open("rb") as file:
        for line_no, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                record = DataError(f"invalid JSON: {err}")
            yield index, line_no, record
            index += 1


def _json_array(path: Path) -> list:
    try:
        records = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"invalid JSON: {err}", path) from None
    if not isinstance(records, list):
        raise DataError(f"expected a JSON array of records (got {type(records).__name__}); use .jsonl for one record per line", path)
    return records


def _check_on_bad_record(on_bad_record: str) -> None:
    if on_bad_record not in choices("on_bad_record"):
        raise ValueError(f"on_bad_record must be one of {', '.join(choices('on_bad_record'))}, not {on_bad_record!r}")


def _check_control_tokens(mode: str) -> None:
    if mode not in choices("control_tokens"):
        raise ValueError(f"control_tokens must be one of {', '.join(choices('control_tokens'))}, not {mode!r}")


# --------------------------------------------------------------------------- datasets


def build_dataset(paths: str | Path | Sequence[str | Path], tokenizer, max_length: int, on_bad_record: str = "error",
                  num_proc: int | None = None, control_tokens: str = "error",
                  thinking: bool = False) -> tuple[datasets.Dataset, DataStats]:
    """Read, validate and tokenise the files into a Dataset with columns
    input_ids, labels, num_label_tokens, length (`thinking`: `chat.assistant_prompt`).
    No usable record left is a DataError."""
    _check_on_bad_record(on_bad_record)
    _check_control_tokens(control_tokens)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, not {max_length}")
    check_tokenizer(tokenizer)
    forbidden = control_token_strings(tokenizer) if control_tokens == "error" else ()
    files = data_files(paths)
    conversations, errors, sources = [], [], []
    for path in files:
        file_conversations, file_errors, file_sources = read_records(path, on_bad_record, forbidden)
        conversations += file_conversations
        errors += file_errors
        sources += file_sources
    if not conversations:
        found = f": all {len(errors)} records are invalid (the first: {errors[0]})" if errors else ": they hold no record"
        raise DataError(f"no valid records in {', '.join(map(str, files))}{found}")
    raw = datasets.Dataset.from_dict({"messages": conversations, "source": sources})
    tokenized = raw.map(
        _tokenize_record,
        input_columns=["messages", "source"],
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "thinking": thinking},
        remove_columns=["messages", "source"],
        features=FEATURES,
        num_proc=num_proc,
        desc="tokenising",
    )
    kept = tokenized.filter(lambda n: n > 0, input_columns="num_label_tokens", desc="dropping untrained")
    if not len(kept):  # every record has a non-empty reply: only truncation can take all of it
        raise DataError(f"all {len(tokenized)} records lost every trained token at max_length {max_length}: "
                        "the prompts are longer; raise max_length")
    stats = DataStats(
        records_read=len(conversations) + len(errors),
        skipped=len(errors),
        truncated=sum(kept["truncated"]),
        dropped_no_labels=len(tokenized) - len(kept),
        records=len(kept),
        tokens=sum(kept["length"]),
        label_tokens=sum(kept["num_label_tokens"]),
        errors=[str(err) for err in errors],
    )
    return kept.remove_columns("truncated"), stats


def _tokenize_record(messages: list[dict], source: str, tokenizer, max_length: int, thinking: bool) -> dict:
    try:
        return tokenize_conversation(messages, tokenizer, max_length, thinking)
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{source}: {err}") from None


def data_files(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Paths from a path, a comma-separated string of paths, or a list of paths."""
    if isinstance(spec, str):
        parts = [part.strip() for part in spec.split(",")]
    elif isinstance(spec, Path):
        parts = [spec]
    else:
        parts = list(spec)
    files = [Path(part) for part in parts if str(part)]
    if not files:
        raise ValueError(f"no data files given: {spec!r}")
    return files


# ------------------------------------------------------------- preprocessed datasets


def preprocess(paths: str | Path | Sequence[str | Path], tokenizer, max_length: int, out_dir: str | Path,
               on_bad_record: str = "error", num_proc: int | None = None, control_tokens: str = "error",
               log: Callable[[str], None] = print, thinking: bool = False) -> DataStats:
    """Tokenise the files once into `out_dir` (the dataset plus a medcare_data.json manifest)."""
    out = Path(out_dir)
    require_empty_dir(out)
    dataset, stats = build_dataset(paths, tokenizer, max_length, on_bad_record, num_proc, control_tokens, thinking)
    dataset.save_to_disk(str(out / DATASET_SUBDIR))
    manifest = {
        "format": MANIFEST_FORMAT,
        "sources": [_describe_file(path) for path in data_files(paths)],
        "tokenizer": {"vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)},
        "max_length": max_length,
        "on_bad_record": on_bad_record,
        "control_tokens": control_tokens,
        "thinking": thinking,
        "stats": asdict(stats),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(stats.summary(max_length))
    return stats


def _describe_file(path: Path) -> dict:
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": stream_sha256(path)}


def load_dataset_for_training(spec: str | Path | Sequence[str | Path], tokenizer, max_length: int,
                              on_bad_record: str = "error", num_proc: int | None = None, control_tokens: str = "error",
                              log: Callable[[str], None] = print, thinking: bool = False) -> tuple[datasets.Dataset, DataStats]:
    """The training dataset from a preprocessed directory (checked against the tokenizer,
    max_length and the record rules) or built from data files; logs a one-line summary."""
    _check_on_bad_record(on_bad_record)
    _check_control_tokens(control_tokens)
    files = data_files(spec)
    if len(files) == 1 and files[0].is_dir():
        dataset, stats = _load_preprocessed(files[0], tokenizer, max_length, on_bad_record, control_tokens, thinking)
    else:
        dataset, stats = build_dataset(files, tokenizer, max_length, on_bad_record, num_proc, control_tokens, thinking)
    log(stats.summary(max_length))
    return dataset, stats


def _load_preprocessed(directory: Path, tokenizer, max_length: int, on_bad_record: str,
                       control_tokens: str, thinking: bool) -> tuple[datasets.Dataset, DataStats]:
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(f"{directory} is a directory without {MANIFEST_NAME}: not a preprocessed dataset")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{manifest_path}: unknown format {manifest.get('format')!r} (expected {MANIFEST_FORMAT})")
    if manifest["max_length"] != max_length:
        raise DataError(f"{directory} was preprocessed with max_length {manifest['max_length']}, "
                        f"but max_length {max_length} was asked for: preprocess again")
    if manifest.get("thinking", False) != thinking:
        raise DataError(f"{directory} was preprocessed with thinking {manifest.get('thinking', False)}, "
                        f"but thinking {thinking} was asked for: preprocess again")
    made_with, given = manifest["tokenizer"], tokenizer_fingerprint(tokenizer)
    if made_with["fingerprint"] != given:
        raise DataError(f"{directory} was tokenised with a different tokenizer (vocab size "
                        f"{made_with['vocab_size']}, fingerprint {made_with['fingerprint'][:12]}) than the "
                        f"one given (vocab size {len(tokenizer)}, fingerprint {given[:12]}): preprocess again")
    stats = DataStats(**manifest["stats"])
    if stats.skipped and on_bad_record == "error":
        raise DataError(f"{directory} was preprocessed with on_bad_record='skip' and skipped {stats.skipped} "
                        "invalid records; pass on_bad_record='skip' to accept that")
    if manifest["control_tokens"] == "as_text" and control_tokens == "error":
        raise DataError(f"{directory} was preprocessed with control_tokens='as_text' (control-token text kept as "
                        "plain text); pass control_tokens='as_text' to accept that")
    return datasets.load_from_disk(str(directory / DATASET_SUBDIR)), stats
