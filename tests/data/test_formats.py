"""Each record shape and file kind users bring, read from files written here; the labels of
what is read are decoded token by token."""

from __future__ import annotations

import copy
import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medcare_dist.data.chat import IGNORE_INDEX
from medcare_dist.data.dataset import build_dataset
from medcare_dist.errors import DataError
from medcare_dist.tools.tiny import DEFAULT_SYSTEM_PROMPT, build_tokenizer

from helpers import write_jsonl

SYSTEM = "You are a careful medical assistant."
QUESTION, ANSWER = "What is aspirin used for?", "Aspirin relieves pain and reduces fever."
EARLIER_Q, EARLIER_A = "I have a headache.", "How long have you had it?"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl",
                         [{"messages": [{"role": "user", "content": f"{SYSTEM} {EARLIER_Q} {QUESTION} Ibuprofen?"},
                                        {"role": "assistant", "content": f"{EARLIER_A} {ANSWER}"}]}])
    return build_tokenizer([corpus])


def decoded(tokenizer, row) -> tuple[list[str], str]:
    """(the trained spans, decoded one run of labelled tokens at a time; all masked text)."""
    spans, current, masked = [], [], []
    assert len(row["input_ids"]) == len(row["labels"])
    for token, label in zip(row["input_ids"], row["labels"]):
        assert label in (token, IGNORE_INDEX)
        if label == IGNORE_INDEX:
            masked.append(token)
            if current:
                spans.append(tokenizer.decode(current))
                current = []
        else:
            current.append(token)
    if current:
        spans.append(tokenizer.decode(current))
    return spans, tokenizer.decode(masked)


def reply(text: str) -> str:
    return text + "<|im_end|>\n"


SHAPES = {
    "alpaca": {"instruction": "What is aspirin", "input": "used for?", "output": ANSWER, "system": SYSTEM,
               "history": [[EARLIER_Q, EARLIER_A]]},
    "sharegpt": {"system": SYSTEM, "conversations": [{"from": "user", "value": EARLIER_Q},
                                                     {"from": "assistant", "value": EARLIER_A},
                                                     {"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]},
    "openai": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EARLIER_Q},
                            {"role": "assistant", "content": EARLIER_A}, {"role": "user", "content": QUESTION},
                            {"role": "assistant", "content": ANSWER}]},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_trains_exactly_the_replies_with_the_records_system_prompt(tmp_path, tokenizer, shape):
    path = write_jsonl(tmp_path / f"{shape}.jsonl", [SHAPES[shape]])
    dataset, stats = build_dataset(path, tokenizer, 512)
    spans, masked = decoded(tokenizer, dataset[0])
    assert spans == [reply(EARLIER_A), reply(ANSWER)]
    question = "What is aspirin\nused for?" if shape == "alpaca" else QUESTION
    assert masked == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{EARLIER_Q}<|im_end|>\n"
                      f"<|im_start|>assistant\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert DEFAULT_SYSTEM_PROMPT not in masked and stats.records == 1


def test_alpaca_without_input_system_or_history(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": QUESTION, "input": "", "output": ANSWER}])
    spans, masked = decoded(tokenizer, build_dataset(path, tokenizer, 512)[0][0])
    assert spans == [reply(ANSWER)] and f"user\n{QUESTION}<|im_end|>" in masked and DEFAULT_SYSTEM_PROMPT in masked


def test_gzip_shard_dirs_globs_and_saved_datasets_read_the_same_records(tmp_path, tokenizer):
    records = [SHAPES["openai"], SHAPES["sharegpt"], SHAPES["alpaca"]]
    reference = build_dataset(write_jsonl(tmp_path / "all.jsonl", records), tokenizer, 512)[0].to_dict()

    with gzip.open(tmp_path / "all.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with gzip.open(tmp_path / "all.json.gz", "wt", encoding="utf-8") as f:
        json.dump(records, f)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", records[:1])
    pq.write_table(pa.Table.from_pylist([{"messages": None, **records[1]}]), shards / "part-1.parquet")
    write_jsonl(shards / "part-2.jsonl", records[2:])
    (shards / "README.md").write_text("not data")  # ignored: not a data file
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"messages": json.dumps(r)} for r in records]).save_to_disk(str(saved))

    zstandard = pytest.importorskip("zstandard", reason="the zstd extra (tests/run.sh installs it)")
    (tmp_path / "all.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in records).encode()))
    (tmp_path / "all.json.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps(records).encode()))

    for spec in (tmp_path / "all.jsonl.gz", tmp_path / "all.json.gz", tmp_path / "all.jsonl.zst", tmp_path / "all.json.zst",
                 shards, str(shards / "part-*")):
        assert build_dataset(spec, tokenizer, 512)[0].to_dict() == reference, spec

    openai_saved = tmp_path / "saved_openai"
    datasets.Dataset.from_list([SHAPES["openai"]]).save_to_disk(str(openai_saved))
    assert build_dataset(openai_saved, tokenizer, 512)[0].to_dict()["input_ids"] == reference["input_ids"][:1]
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        build_dataset(str(tmp_path / "nothing-*.jsonl"), tokenizer, 512)
    with pytest.raises(DataError, match=r"saved: record 0: 'messages' is not a list"):
        build_dataset(saved, tokenizer, 512)  # a column of JSON strings is not a record shape: named, not guessed


def test_tool_use_under_a_template_without_tool_support_is_refused_by_record_never_dropped(tmp_path, tokenizer):
    calls = [{"type": "function", "function": {"name": "dose", "arguments": {}}}]
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": None, "tool_calls": calls},
                           {"role": "tool", "content": "500 mg"}, {"role": "assistant", "content": ANSWER}]}
    path = write_jsonl(tmp_path / "tools.jsonl", [SHAPES["openai"], record])
    with pytest.raises(DataError, match=r"tools\.jsonl: record 1 \(line 2\): turn 1: tool calls or results, and the chat "
                                        r"template has no tool support"):
        build_dataset(path, tokenizer, 512)
    dataset, stats = build_dataset(path, tokenizer, 512, on_bad_record="skip")
    assert (stats.records, stats.skipped) == (1, 1) and "no tool support" in stats.errors[0]
    definitions = write_jsonl(tmp_path / "definitions.jsonl", [{**SHAPES["openai"], "tools": [{"type": "function"}]}])
    with pytest.raises(DataError, match=r"record 0 \(line 1\): the record has 'tools' \(tool definitions\), and the chat "
                                        r"template has no tool support"):
        build_dataset(definitions, tokenizer, 512)


@pytest.mark.parametrize("messages,reason", [
    ([{"role": "user", "content": QUESTION}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": ANSWER}],
     "turn 1: a tool result that follows no assistant turn with tool_calls"),
    ([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "x", "tool_calls": []}],
     "turn 1: 'tool_calls' is not a non-empty list of objects"),
    ([{"role": "user", "content": QUESTION, "tool_calls": [{}]}, {"role": "assistant", "content": ANSWER}],
     "turn 0: a 'user' turn has tool_calls"),
])
def test_malformed_tool_use_is_a_record_error(tmp_path, tokenizer, messages, reason):
    with pytest.raises(DataError, match=f"record 0 \\(line 1\\): {reason}"):
        build_dataset(write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}]), tokenizer, 512)


def test_record_system_field_beside_a_system_turn_is_an_error(tmp_path, tokenizer):
    record = {"system": SYSTEM, "conversations": [{"from": "system", "value": SYSTEM}, *SHAPES["sharegpt"]["conversations"]]}
    with pytest.raises(DataError, match=r"record 0 \(line 1\): the record has both a 'system' field and a system turn"):
        build_dataset(write_jsonl(tmp_path / "two.jsonl", [record]), tokenizer, 512)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_template_that_raises_is_a_per_record_error_that_skip_counts(tmp_path, tokenizer, num_proc, monkeypatch):
    monkeypatch.setattr("medcare_dist.data.dataset.RECORDS_PER_PROCESS", 1)  # num_proc 2: the error comes from a worker
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (  # Mistral v0.1's rule: no system turn, roles alternate
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    plain = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [plain, SHAPES["openai"], plain])
    with pytest.raises(DataError, match=r"mixed\.jsonl: record 1 \(line 2\): the chat template refused this record: "
                                        r"Conversation roles must alternate"):
        build_dataset(path, strict, 512, num_proc=num_proc)
    dataset, stats = build_dataset(path, strict, 512, on_bad_record="skip", num_proc=num_proc)
    assert (stats.records, stats.skipped, len(dataset)) == (2, 1, 2)
    assert "record 1 (line 2): the chat template refused" in stats.errors[0]
    assert decoded(strict, dataset[0])[0] == [reply(ANSWER)]


def test_a_template_that_trims_replies_trains_them_as_rendered_and_counts_them(tmp_path, tokenizer):
    trimming = copy.deepcopy(tokenizer)  # Llama 3's rule: every message's content `| trim`
    trimming.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] | trim) + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    records = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": text}]}
               for text in (ANSWER + "\n", ANSWER)]
    dataset, stats = build_dataset(write_jsonl(tmp_path / "trim.jsonl", records), trimming, 512)
    assert [decoded(trimming, row)[0] for row in dataset] == [[reply(ANSWER)], [reply(ANSWER)]]
    assert stats.whitespace_adjusted == 1 and "1 records with replies the chat template trims" in stats.summary(512)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz", ".jsonl.zst"])
def test_a_cut_compressed_file_is_one_error_naming_it(tmp_path, tokenizer, suffix):
    text = "".join(json.dumps(SHAPES["openai"]) + "\n" for _ in range(200))
    if suffix.endswith(".gz"):
        whole = gzip.compress((json.dumps([SHAPES["openai"]] * 200) if suffix == ".json.gz" else text).encode())
    else:
        whole = pytest.importorskip("zstandard").ZstdCompressor().compress(text.encode())
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"^{path}: a damaged or cut (zstd )?file \((after line \d+|while reading)\)"):
        build_dataset(path, tokenizer, 512)
