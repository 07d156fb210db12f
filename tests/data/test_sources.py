"""What a data spec reads: every data file of a directory or glob or none with an error, a
Hugging Face layout's train split only, saved datasets through the cache, and inputs that
must be named rather than dropped or half-read."""

from __future__ import annotations

import json
import time

import datasets
import pytest

import medcare_dist.data.dataset as data
from medcare_dist.data.chat import tokenizer_fingerprint
from medcare_dist.data.sources import resolve_sources
from medcare_dist.errors import DataError

from helpers import fever_record, write_jsonl


@pytest.fixture
def tokenizer(fever_tokenizer):
    return fever_tokenizer


def test_a_shard_directory_reads_every_data_file_below_it_and_refuses_what_is_not_data(tmp_path):
    shards = tmp_path / "shards"
    write_jsonl(shards / "a.jsonl", [fever_record(0)])
    write_jsonl(shards / "sub" / "b.jsonl", [fever_record(1)])
    (shards / "README.md").write_text("about the shards")
    assert [p.name for p in resolve_sources(str(shards))[0].files] == ["a.jsonl", "b.jsonl"]
    (shards / "sub" / "c.csv").write_text("q,a\n")
    (shards / "d.jsonl.bz2").write_bytes(b"BZh9")
    with pytest.raises(DataError, match=r"shards: not data files \(.*\): d\.jsonl\.bz2, c\.csv; convert or remove them"):
        resolve_sources(str(shards))
    with pytest.raises(DataError, match=r"shards/\*: not data files .*: d\.jsonl\.bz2"):
        resolve_sources(str(shards / "*"))
    with pytest.raises(DataError, match="a zstd-compressed Parquet file cannot be read"):
        list(data.read_located(write_jsonl(tmp_path / "x.parquet.zst", []), lambda r: r))


def test_a_local_dataset_clone_gives_its_train_split_only(tmp_path):
    clone = tmp_path / "clone"
    for split in ("train", "test", "validation"):
        write_jsonl(clone / f"{split}.jsonl", [fever_record(0)])
    assert [p.name for p in resolve_sources(str(clone))[0].files] == ["train.jsonl"]
    card = tmp_path / "card"
    write_jsonl(card / "a.jsonl", [fever_record(0)])
    write_jsonl(card / "b.jsonl", [fever_record(1)])
    (card / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: a.jsonl\n---\n")
    assert [p.name for p in resolve_sources(str(card))[0].files] == ["a.jsonl"]


def test_a_saved_dataset_goes_through_the_cache_keyed_by_its_content(tmp_path, tokenizer):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([fever_record(i) for i in range(3)]).save_to_disk(str(saved))
    lines = []
    dataset, _ = data.load_dataset_for_training(str(saved), tokenizer, 256, cache_dir=tmp_path / "cache", log=lines.append)
    assert len(dataset) == 3
    datasets.Dataset.from_list([fever_record(i) for i in range(5)]).save_to_disk(str(tmp_path / "saved5"))
    (saved / "data-00000-of-00001.arrow").write_bytes((tmp_path / "saved5" / "data-00000-of-00001.arrow").read_bytes())
    (saved / "state.json").write_text((tmp_path / "saved5" / "state.json").read_text())
    again, _ = data.load_dataset_for_training(str(saved), tokenizer, 256, cache_dir=tmp_path / "cache", log=lines.append)
    assert len(again) == 5 and len(list((tmp_path / "cache").iterdir())) == 2


def test_a_preprocessed_directory_takes_no_count_and_no_mix(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "a.jsonl", [fever_record(i) for i in range(5)])
    data.preprocess(str(source), tokenizer, 256, tmp_path / "pre", log=lambda _: None)
    for spec in (f"{tmp_path / 'pre'}#2", [str(tmp_path / "pre"), str(source)]):
        with pytest.raises(DataError, match="pre is a preprocessed dataset, read whole as it was written: it takes no record count"):
            data.load_dataset_for_training(spec, tokenizer, 256, log=lambda _: None)


def test_the_tokenizer_fingerprint_covers_its_merges(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][: len(spec["model"]["merges"]) // 2]
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    from transformers import AutoTokenizer

    fewer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert fewer.get_vocab() == tokenizer.get_vocab() and fewer("Question 1 about fever?") != tokenizer("Question 1 about fever?")
    assert tokenizer_fingerprint(fewer) != tokenizer_fingerprint(tokenizer)
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a question", "another"], truncation=True, max_length=3, padding=True)  # per-call state is not identity
    assert tokenizer_fingerprint(tokenizer) == before


@pytest.mark.parametrize("line,reason", [
    ('{"messages": [{"role": "user", "content": "q \\ud83d"}, {"role": "assistant", "content": "a"}]}',
     r"turn 0: 'content' is not valid Unicode: a lone surrogate '\\ud83d' at character 2"),
    ('{"system": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}, '
     '{"from": "gpt", "value": "a"}]}', "turns 0 and 1: two user turns in a row"),
    ("[" * 100000, "invalid JSON: nested too deeply to parse"),
])
def test_records_that_cannot_be_trained_are_named_by_record_and_turn(tmp_path, tokenizer, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(fever_record(0)) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl: record 1 \\(line 2\\): {reason}"):
        data.build_dataset(path, tokenizer, 256)
    _, stats = data.build_dataset(path, tokenizer, 256, on_bad_record="skip")
    assert (stats.records, stats.skipped) == (1, 1)


def test_an_empty_system_field_is_no_system_prompt(tmp_path, tokenizer):
    plain = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    want = data.build_dataset(write_jsonl(tmp_path / "a.jsonl", [plain]), tokenizer, 256)[0].to_dict()
    assert data.build_dataset(write_jsonl(tmp_path / "b.jsonl", [{"system": "", **plain}]), tokenizer, 256)[0].to_dict() == want


def test_odd_counts_and_bracketed_names_are_paths(tmp_path):
    literal = write_jsonl(tmp_path / "data[1].jsonl", [fever_record(0)])
    assert resolve_sources(str(literal))[0].files == (literal,)
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*a\.jsonl#²"):
        resolve_sources(str(tmp_path / "a.jsonl#²"))


def test_a_source_rewritten_with_its_size_and_mtime_kept_is_hashed_again(tmp_path):
    """`cp -p` / `rsync -t` keep the mtime: the cached digest must not hide the new content."""
    import hashlib
    import os

    from medcare_dist.files import file_sha256

    path = tmp_path / "a.jsonl"
    path.write_text("first\n")
    assert file_sha256(path) == hashlib.sha256(b"first\n").hexdigest()
    stat = path.stat()
    time.sleep(0.01)
    path.write_text("other\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert file_sha256(path) == hashlib.sha256(b"other\n").hexdigest()
