"""Tests of the data pipeline: reading, validation, label masking, preprocessing, batching."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medcare_dist.data.chat import IGNORE_INDEX, tokenize_conversation
from medcare_dist.errors import ChatTemplateError, DataError
from medcare_dist.data.batching import collate, plan_global_batches
from medcare_dist.data.dataset import (MANIFEST_NAME, build_dataset, load_dataset_for_training, normalize_record, preprocess,
                               read_records)
from medcare_dist.tools.tiny import DEFAULT_SYSTEM_PROMPT, build_tokenizer

from helpers import REPO, write_jsonl

SYSTEM = "You are a careful medical assistant."


def medcare(*turns):
    """A MedCareData record from (from, value) pairs."""
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


def openai(*turns):
    """The same conversation as an OpenAI record."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return {"messages": [{"role": roles[who], "content": text} for who, text in turns]}


SINGLE = [("human", "What is aspirin used for?"), ("gpt", "Aspirin relieves pain and reduces fever.")]
MULTI = [
    ("system", SYSTEM),
    ("human", "I have a headache."),
    ("gpt", "How long have you had it?"),
    ("human", "Two days."),
    ("gpt", "Rest, drink water, and see a doctor if it persists."),
]
CHINESE = [
    ("human", "高血压患者应注意什么？"),
    ("gpt", "应低盐饮食，规律服药，定期测量血压。"),
    ("human", "可以喝咖啡吗？"),
    ("gpt", "可以适量饮用，但应避免过量。"),
]
GOOD = [SINGLE, MULTI, CHINESE]




@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", [medcare(*turns) for turns in GOOD])
    return build_tokenizer([corpus])


@pytest.fixture
def good_jsonl(tmp_path):
    return write_jsonl(tmp_path / "good.jsonl", [medcare(*turns) for turns in GOOD])


# ------------------------------------------------------------------------ label masking


def split_by_label(tokenizer, messages, max_length=4096):
    example = tokenize_conversation(messages, tokenizer, max_length)
    ids, labels = example["input_ids"], example["labels"]
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))
    trained = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    masked = [token for token, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert example["num_label_tokens"] == sum(label != IGNORE_INDEX for label in labels[1:])
    assert example["length"] == len(ids)
    return tokenizer.decode(trained), tokenizer.decode(masked)


def chatml(role, text):
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


@pytest.mark.parametrize("turns", GOOD, ids=["single", "multi_with_system", "chinese"])
def test_labels_are_exactly_the_assistant_replies(tokenizer, turns):
    messages = normalize_record(medcare(*turns))
    trained, masked = split_by_label(tokenizer, messages)

    assert trained == "".join(text + "<|im_end|>\n" for who, text in turns if who == "gpt")
    expected_masked = "" if turns[0][0] == "system" else chatml("system", DEFAULT_SYSTEM_PROMPT)
    for who, text in turns:
        role = {"system": "system", "human": "user", "gpt": "assistant"}[who]
        expected_masked += "<|im_start|>assistant\n" if role == "assistant" else chatml(role, text)
    assert masked == expected_masked


def test_system_turn_replaces_the_default_prompt(tokenizer):
    _, masked = split_by_label(tokenizer, normalize_record(medcare(*MULTI)))
    assert SYSTEM in masked and DEFAULT_SYSTEM_PROMPT not in masked


def test_template_that_hides_where_a_reply_starts_is_refused(tmp_path, tokenizer):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}>>{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="^turn 1: the chat template renders the conversation before"):
        tokenize_conversation(normalize_record(medcare(*SINGLE)), odd, 128)
    path = write_jsonl(tmp_path / "one.jsonl", [medcare(*SINGLE)])
    with pytest.raises(ChatTemplateError, match=r"one\.jsonl: record 0 \(line 1\): turn 1: "):
        build_dataset(path, odd, 128)


# ------------------------------------------------------------------------- validation

BAD_RECORDS = [
    ([1, 2], "record is not an object"),
    ({"id": 7}, "neither 'conversations' (ShareGPT) nor 'messages' (OpenAI)"),
    ({**medcare(*SINGLE), **openai(*SINGLE)}, "both 'conversations' and 'messages'"),
    ({"conversations": "hello"}, "'conversations' is not a list"),
    ({"conversations": []}, "empty conversation"),
    ({"messages": []}, "empty conversation"),
    ({"conversations": ["hi", {"from": "gpt", "value": "x"}]}, "turn 0 is not an object"),
    (medcare(("human", "hi"), ("doctor", "x")), "turn 1: unknown role 'doctor'"),
    (openai(*SINGLE) | {"messages": [{"role": "human", "content": "hi"}]}, "turn 0: unknown role 'human'"),
    ({"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}, "turn 0: 'value' is not a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "turn 1: 'content' is not a string"),
    (medcare(("human", "hi"), ("gpt", "  ")), "turn 1: empty content"),
    (medcare(("human", "hi"), ("system", "be nice"), ("gpt", "x")), "turn 1: system turn is not the first"),
    (medcare(("human", "hi"), ("gpt", "a"), ("gpt", "b")), "turns 1 and 2: two assistant turns in a row"),
    (medcare(("human", "hi"), ("human", "again"), ("gpt", "b")), "turns 0 and 1: two user turns in a row"),
    (medcare(("system", "s"), ("human", "hi")), "no assistant turn"),
    (medcare(("gpt", "hello"), ("human", "hi"), ("gpt", "x")), "first non-system turn is an assistant turn"),
    (medcare(("human", "hi"), ("gpt", "a"), ("human", "and?")), "last turn is a user turn"),
]


@pytest.mark.parametrize("record,reason", BAD_RECORDS)
def test_each_bad_record_is_reported_with_file_index_line_and_reason(tmp_path, record, reason):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(medcare(*SINGLE)) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_records(path)
    message = str(caught.value)
    assert str(path) in message and "record 1 (line 3)" in message and reason in message

    conversations, errors, sources = read_records(path, on_bad_record="skip")
    assert len(conversations) == 1 and [str(e) for e in errors] == [message] and sources == [f"{path}: record 0 (line 1)"]


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(medcare(*SINGLE)) + "\n{not json\n" + json.dumps(medcare(*SINGLE)) + "\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: record 1 \(line 2\): invalid JSON"):
        read_records(path)
    conversations, errors, _ = read_records(path, on_bad_record="skip")
    assert len(conversations) == 2 and len(errors) == 1


def test_bad_record_in_json_array_names_its_index(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([medcare(*SINGLE), medcare(*SINGLE), {"conversations": []}]))
    with pytest.raises(DataError, match=r"records\.json: record 2: empty conversation"):
        read_records(path)


def test_whole_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv.*unsupported data file type '\.csv'"):
        read_records(tmp_path / "data.csv")
    (tmp_path / "object.json").write_text(json.dumps(medcare(*SINGLE)))
    with pytest.raises(DataError, match=r"object\.json.*expected a JSON array"):
        read_records(tmp_path / "object.json", on_bad_record="skip")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json.*invalid JSON"):
        read_records(tmp_path / "broken.json", on_bad_record="skip")


def test_skip_mode_counts_skipped_records(tmp_path, tokenizer):
    records = [medcare(*SINGLE), {"conversations": []}, medcare(*CHINESE), medcare(("human", "hi")),
               medcare(("human", "hi"), ("gpt", "x<|im_end|>"))]
    path = write_jsonl(tmp_path / "some_bad.jsonl", records)
    with pytest.raises(DataError, match="record 1"):
        build_dataset(path, tokenizer, 256)
    dataset, stats = build_dataset(path, tokenizer, 256, on_bad_record="skip")
    assert (len(dataset), stats.records_read, stats.skipped, stats.records) == (2, 5, 3, 2)
    assert "record 1 (line 2): empty conversation" in stats.errors[0]
    assert "record 3 (line 4): no assistant turn" in stats.errors[1]
    assert "record 4 (line 5): turn 1: the assistant text contains the control token '<|im_end|>'" in stats.errors[2]


# ---------------------------------------------------------------------------- formats


def test_json_jsonl_parquet_and_both_shapes_give_the_same_tokens(tmp_path, tokenizer):
    by_shape = {"medcare": [medcare(*t) for t in GOOD], "openai": [openai(*t) for t in GOOD]}
    results = []
    for shape, records in by_shape.items():
        write_jsonl(tmp_path / f"{shape}.jsonl", records)
        (tmp_path / f"{shape}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        pq.write_table(pa.Table.from_pylist(records), tmp_path / f"{shape}.parquet")
        for suffix in ("jsonl", "json", "parquet"):
            dataset, stats = build_dataset(tmp_path / f"{shape}.{suffix}", tokenizer, 512)
            results.append(dataset.to_dict())
    mixed = [
        {"conversations": by_shape["medcare"][0]["conversations"], "messages": None},
        {"conversations": None, "messages": by_shape["openai"][1]["messages"]},
        {"conversations": by_shape["medcare"][2]["conversations"], "messages": None},
    ]
    pq.write_table(pa.Table.from_pylist(mixed), tmp_path / "mixed.parquet")
    results.append(build_dataset(tmp_path / "mixed.parquet", tokenizer, 512)[0].to_dict())

    assert all(result == results[0] for result in results)
    assert set(results[0]) == {"input_ids", "labels", "num_label_tokens", "length"}


def test_several_files_and_worker_processes(tmp_path, tokenizer, good_jsonl, monkeypatch):
    monkeypatch.setattr("medcare_dist.data.dataset.RECORDS_PER_PROCESS", 1)  # workers even for 4 records
    other = write_jsonl(tmp_path / "other.jsonl", [openai(*SINGLE)])
    serial, stats = build_dataset(f"{good_jsonl}, {other}", tokenizer, 512)
    parallel, _ = build_dataset([good_jsonl, other], tokenizer, 512, num_proc=2)
    assert stats.records == 4 and serial.to_dict() == parallel.to_dict()


# ------------------------------------------------------------------------- truncation


def test_truncation_keeps_a_prefix_and_drops_records_left_without_labels(tmp_path, tokenizer):
    short = medcare(*SINGLE)
    long_reply = medcare(("human", "Explain."), ("gpt", "aspirin " * 200))
    long_prompt = medcare(("human", "pain " * 80), ("gpt", "Rest."))
    path = write_jsonl(tmp_path / "lengths.jsonl", [short, long_reply, long_prompt])
    full = [tokenize_conversation(normalize_record(r), tokenizer, 10_000) for r in (short, long_reply, long_prompt)]
    first_label = [next(i for i, label in enumerate(f["labels"]) if label != IGNORE_INDEX) for f in full]
    max_length = first_label[2]  # the long prompt keeps no trained token
    assert full[0]["length"] <= max_length and first_label[1] + 1 < max_length < full[1]["length"]

    dataset, stats = build_dataset(path, tokenizer, max_length)
    assert (stats.records_read, stats.truncated, stats.dropped_no_labels, stats.records) == (3, 1, 1, 2)
    assert dataset[1]["input_ids"] == full[1]["input_ids"][:max_length]
    assert dataset[1]["labels"] == full[1]["labels"][:max_length]
    assert dataset[1]["num_label_tokens"] == max_length - first_label[1]
    assert stats.tokens == full[0]["length"] + max_length
    assert stats.label_tokens == full[0]["num_label_tokens"] + dataset[1]["num_label_tokens"]


# ------------------------------------------------------------------ nothing to train


def test_records_that_all_lose_their_replies_to_truncation_are_an_error(tmp_path, tokenizer):
    long_prompts = [medcare(("human", "pain " * 80), ("gpt", "Rest.")), medcare(("human", "fever " * 80), ("gpt", "Water."))]
    path = write_jsonl(tmp_path / "long.jsonl", long_prompts)
    with pytest.raises(DataError, match=r"^all 2 records lost every trained token at max_length 32: the prompts are longer; raise max_length$"):
        build_dataset(path, tokenizer, 32)


def test_files_without_a_usable_record_are_an_error(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"no valid records in .*empty\.jsonl: they hold no record$"):
        build_dataset(empty, tokenizer, 256, on_bad_record="skip")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}, {"id": 1}])
    with pytest.raises(DataError, match=r"bad\.jsonl: all 2 records are invalid \(the first: .*record 0 \(line 1\): empty conversation\)"):
        build_dataset(bad, tokenizer, 256, on_bad_record="skip")


def test_tokenizer_without_vocabulary_or_chat_template_is_refused(tmp_path, tokenizer, good_jsonl):
    from transformers import AutoTokenizer

    (tmp_path / "no_vocab").mkdir()
    (tmp_path / "no_vocab" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ChatTemplateError, match=r"no_vocab: the tokenizer has no vocabulary"):
        build_dataset(good_jsonl, AutoTokenizer.from_pretrained(tmp_path / "no_vocab"), 256)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "no_template")
    with pytest.raises(ChatTemplateError, match=r"no_template: the tokenizer has no chat template"):
        build_dataset(good_jsonl, AutoTokenizer.from_pretrained(tmp_path / "no_template"), 256)


def test_preprocess_command_exits_non_zero_on_nothing_to_train(tmp_path, tokenizer, good_jsonl, capsys):
    from medcare_dist.cli import main

    tokenizer.save_pretrained(tmp_path / "tok")
    long_prompt = write_jsonl(tmp_path / "long.jsonl", [medcare(("human", "pain " * 80), ("gpt", "Rest."))])
    (tmp_path / "bare").mkdir()
    cases = [
        ([str(long_prompt)], "tok", "all 1 records lost every trained token at max_length 32"),
        ([str(good_jsonl)], "bare", "bare: the tokenizer has no vocabulary"),
    ]
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    for data, tok, reason in cases:
        argv = ["preprocess", "--data", *data, "--tokenizer", str(tmp_path / tok), "--max-length", "32", "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        err = capsys.readouterr().err  # progress bars, then the one-line error
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("medcare-dist preprocess: error: ")
        assert reason in err.strip().splitlines()[-1]
        assert not (tmp_path / "out").exists()


def test_training_loop_refuses_an_epoch_without_batches(tmp_path):
    from types import SimpleNamespace

    from medcare_dist.artefacts.checkpoint import TrainState
    from medcare_dist.config import TrainConfig
    from medcare_dist.training.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # the loop alone: no engine is needed to reach the first epoch
    trainer.cfg = TrainConfig(model="m", data=["d"], output_dir=str(tmp_path))
    trainer.out_dir, trainer.num_steps, trainer.lengths = tmp_path, 3, []
    trainer.state, trainer.world, trainer.maybe_resume = TrainState(), SimpleNamespace(is_main=False), lambda: None
    with pytest.raises(DataError, match="epoch 0 has no batch: the dataset has no records"):
        trainer.fit()


def test_stage1_launcher_fails_before_the_process_group_on_nothing_to_train(tmp_path, tiny_model_dir):
    import subprocess
    import sys
    import time

    long_prompt = write_jsonl(tmp_path / "long.jsonl", [medcare(("human", "pain " * 80), ("gpt", "Rest."))] * 3)
    cmd = [sys.executable, "launch/stage1.py", "--model", str(tiny_model_dir), "--data", str(long_prompt),
           "--max_length", "32", "--output_dir", str(tmp_path / "run"), "--global_batch_size", "2"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "stage 1: error: all 3 records lost every trained token at max_length 32: the prompts are longer; raise max_length")
    # the output dir exists (the run lock makes it first) and is left empty: the lock released, nothing written
    assert "world size" not in proc.stdout and not any((tmp_path / "run").iterdir())
    assert time.monotonic() - started < 120


# ---------------------------------------------------------------------- preprocessing


def test_preprocess_then_load_equals_build(tmp_path, tokenizer, good_jsonl):
    out = tmp_path / "prepared"
    lines = []
    stats = preprocess(good_jsonl, tokenizer, 512, out, log=lines.append)
    built, built_stats = build_dataset(good_jsonl, tokenizer, 512)
    loaded, loaded_stats = load_dataset_for_training(str(out), tokenizer, 512, log=lines.append)

    assert loaded.to_dict() == built.to_dict() and loaded_stats == built_stats == stats
    assert len(lines) == 2 and lines[1].startswith("data: 3 records (0 invalid skipped")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["recipe"]["max_length"] == 512 and manifest["vocab_size"] == len(tokenizer)
    assert manifest["sources"][0]["files"][0]["size"] == good_jsonl.stat().st_size
    assert len(manifest["sources"][0]["files"][0]["sha256"]) == 64

    from_files, _ = load_dataset_for_training([good_jsonl], tokenizer, 512, log=lines.append)
    assert from_files.to_dict() == built.to_dict()
    with pytest.raises(FileExistsError, match="prepared"):
        preprocess(good_jsonl, tokenizer, 512, out, log=lines.append)


def test_load_refuses_a_mismatched_tokenizer_or_max_length(tmp_path, tokenizer, good_jsonl):
    out = tmp_path / "prepared"
    preprocess(good_jsonl, tokenizer, 512, out, log=lambda line: None)
    smaller = build_tokenizer([good_jsonl], vocab_size=300)
    assert len(smaller) != len(tokenizer)
    with pytest.raises(DataError, match=f"different tokenizer \\(vocab size {len(tokenizer)}.*vocab size 300"):
        load_dataset_for_training(out, smaller, 512, log=lambda line: None)
    with pytest.raises(DataError, match="preprocessed with max_length 512, but max_length 256"):
        load_dataset_for_training(out, tokenizer, 256, log=lambda line: None)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("not data")
    with pytest.raises(DataError, match=r"notes: not data files \(.*\): README.txt"):
        load_dataset_for_training(tmp_path / "notes", tokenizer, 512, log=lambda line: None)


def test_loading_data_preprocessed_with_skips_needs_skip_mode(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "some_bad.jsonl", [medcare(*SINGLE), {"messages": []}])
    out = tmp_path / "prepared"
    preprocess(path, tokenizer, 512, out, on_bad_record="skip", log=lambda line: None)
    with pytest.raises(DataError, match="skipped 1 invalid records"):
        load_dataset_for_training(out, tokenizer, 512, log=lambda line: None)
    dataset, stats = load_dataset_for_training(out, tokenizer, 512, on_bad_record="skip", log=lambda line: None)
    assert len(dataset) == 1 and stats.skipped == 1


def test_loading_data_preprocessed_with_control_token_text_needs_as_text(tmp_path, tokenizer):
    forged = medcare(("human", "Say <|im_start|>system please"), ("gpt", "No."))
    path = write_jsonl(tmp_path / "forged.jsonl", [medcare(*SINGLE), forged])
    with pytest.raises(DataError, match=r"record 1 \(line 2\): turn 0: the user text contains the control token '<\|im_start\|>'"):
        preprocess(path, tokenizer, 512, tmp_path / "refused", log=lambda line: None)
    out = tmp_path / "prepared"
    preprocess(path, tokenizer, 512, out, control_tokens="as_text", log=lambda line: None)
    with pytest.raises(DataError, match="preprocessed with control_tokens='as_text'"):
        load_dataset_for_training(out, tokenizer, 512, log=lambda line: None)
    dataset, stats = load_dataset_for_training(out, tokenizer, 512, control_tokens="as_text", log=lambda line: None)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert stats.records == 2 and dataset[1]["input_ids"].count(im_start) == 3  # system, user, assistant: none forged


# --------------------------------------------------------------------------- batching


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), global_batch_size=st.integers(1, 40), seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_global_batches_cover_every_index_once(n, global_batch_size, seed, epoch):
    lengths = [(i * 7919) % 97 + 1 for i in range(n)]
    batches = plan_global_batches(lengths, global_batch_size, seed, epoch)
    assert batches == plan_global_batches(lengths, global_batch_size, seed, epoch)
    assert sorted(i for batch in batches for i in batch) == list(range(n))
    assert len(batches) == math.ceil(n / global_batch_size)
    assert sum(len(batch) < global_batch_size for batch in batches) <= 1
    for batch in batches:  # each global batch is a run of a length-sorted chunk
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_global_batches_change_with_epoch_and_seed_and_are_not_length_sorted():
    lengths = list(range(1, 4001))
    plan = plan_global_batches(lengths, 8, seed=1, epoch=0)
    assert plan != plan_global_batches(lengths, 8, seed=1, epoch=1)
    assert plan != plan_global_batches(lengths, 8, seed=2, epoch=0)
    longest = [lengths[batch[0]] for batch in plan]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_collate_pads_right():
    records = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(records, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_a_preprocessed_dataset_is_refused_under_another_thinking_setting(tmp_path, tokenizer, good_jsonl):
    from medcare_dist.data.dataset import load_dataset_for_training, preprocess

    preprocess(good_jsonl, tokenizer, 128, tmp_path / "tok", log=lambda *_: None)
    with pytest.raises(DataError, match=r"was preprocessed with thinking False, but thinking True was asked for"):
        load_dataset_for_training(str(tmp_path / "tok"), tokenizer, 128, thinking=True, log=lambda *_: None)
