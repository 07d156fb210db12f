"""Mixes by record count, and the tokenised-data cache: hit, invalidation, repair, waiting."""

from __future__ import annotations

import threading
import time

import pytest

import medcare_dist.data.cache as cache
import medcare_dist.data.dataset as data
from medcare_dist.config import load_config
from medcare_dist.errors import ConfigError, DataError

from helpers import fever_record, write_jsonl


@pytest.fixture
def tokenizer(fever_tokenizer):
    return fever_tokenizer


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "a.jsonl", [fever_record(i) for i in range(3)]), write_jsonl(tmp_path / "b.jsonl", [fever_record(9)])


def first_user_numbers(tokenizer, dataset) -> list[int]:
    texts = [tokenizer.decode(ids) for ids in dataset["input_ids"]]
    return [int(text.split("Question ")[1].split(" ")[0]) for text in texts]


def test_a_count_draws_records_with_the_seed_and_repeats_the_file_when_larger(tokenizer, files):
    a, b = files
    dataset, stats = data.build_dataset([f"{a}#7", str(b)], tokenizer, 256, seed=1)
    numbers = first_user_numbers(tokenizer, dataset)
    assert len(numbers) == 8 and numbers[-1] == 9  # 7 of a, then all of b
    assert sorted(numbers[:7])[:6] == [0, 0, 1, 1, 2, 2]  # two full passes, then one drawn
    assert data.build_dataset([f"{a}#7", str(b)], tokenizer, 256, seed=1)[0].to_dict() == dataset.to_dict()
    draws = {tuple(first_user_numbers(tokenizer, data.build_dataset(f"{a}#2", tokenizer, 256, seed=s)[0])) for s in range(8)}
    assert len(draws) > 1 and all(len(set(d)) == 2 for d in draws)  # fewer than the file: no record twice

    empty = write_jsonl(a.parent / "empty.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match=r"empty\.jsonl#5: no valid record to draw 5 records from \(the first error: .*empty conv"):
        data.build_dataset([f"{empty}#5", str(b)], tokenizer, 256, on_bad_record="skip")

    per = {s["spec"]: s for s in stats.sources}
    assert per[f"{a}#7"]["records"] == 7 and per[str(b)]["records"] == 1
    assert per[f"{a}#7"]["label_tokens"] + per[str(b)]["label_tokens"] == stats.label_tokens
    assert f"{a}#7: 7 records" in stats.summary(256)


def test_yaml_entries_with_records_are_count_specs(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\ndata:\n  - {path: a.jsonl, records: 20000}\n  - b.parquet\n")
    assert load_config(str(config)).data == ["a.jsonl#20000", "b.parquet"]
    config.write_text("model: m\ndata:\n  - {path: a.jsonl, rows: 5}\n")
    with pytest.raises(ConfigError, match="must have 'path' and may have 'records'"):
        load_config(str(config))


@pytest.fixture
def builds(monkeypatch):
    """How many times the data were tokenised."""
    calls = []
    real = data.build_dataset

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "build_dataset", counting)
    return calls


def load(spec, tokenizer, cache_dir, lines, **kwargs):
    return data.load_dataset_for_training(spec, tokenizer, 256, cache_dir=cache_dir, log=lines.append, **kwargs)


def test_a_second_load_hits_the_cache_without_tokenising(tmp_path, tokenizer, files, builds):
    lines = []
    first, stats = load([str(f) for f in files], tokenizer, tmp_path / "cache", lines)
    again, again_stats = load([str(f) for f in files], tokenizer, tmp_path / "cache", lines)
    assert len(builds) == 1 and lines[0].startswith("data: tokenising into") and lines[2].startswith("data: cache hit")
    assert again.to_dict() == first.to_dict() and again_stats == stats
    assert again.cache_files  # memory-mapped from the entry, not copied into memory
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [lines[2].split()[-1].rsplit("/", 1)[-1]]  # no temp dir left


def test_a_changed_source_or_mix_or_option_makes_a_new_entry(tmp_path, tokenizer, files, builds):
    a, b = files
    lines = []
    load([str(a)], tokenizer, tmp_path / "cache", lines)
    write_jsonl(a, [fever_record(i) for i in range(4)])
    changed, _ = load([str(a)], tokenizer, tmp_path / "cache", lines)
    load([f"{a}#2"], tokenizer, tmp_path / "cache", lines)
    load([f"{a}#2"], tokenizer, tmp_path / "cache", lines, seed=5)
    load([str(a)], tokenizer, tmp_path / "cache", lines, control_tokens="as_text")
    assert len(changed) == 4 and len(builds) == 5 and len(list((tmp_path / "cache").iterdir())) == 5


def test_a_corrupt_or_half_written_entry_is_rebuilt(tmp_path, tokenizer, files, builds):
    lines = []
    good = load([str(files[0])], tokenizer, tmp_path / "cache", lines)[0].to_dict()  # before its files are damaged
    entry = next((tmp_path / "cache").iterdir())
    arrow = next((entry / cache.DATASET_SUBDIR).glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-20] + b"\0" * 20)  # same size, other bytes
    rebuilt, _ = load([str(files[0])], tokenizer, tmp_path / "cache", lines)
    assert "the entry there is broken: dataset/" in lines[2] and "differs from its recorded size or sha256" in lines[2]
    (entry / cache.MANIFEST_NAME).unlink()  # as if the writer died before the manifest
    load([str(files[0])], tokenizer, tmp_path / "cache", lines)
    assert f"broken: no readable {cache.MANIFEST_NAME}" in lines[4]
    assert len(builds) == 3 and rebuilt.to_dict() == good


def test_other_processes_wait_with_a_note_and_load_the_writers_entry(tmp_path, tokenizer, files, monkeypatch):
    monkeypatch.setattr(cache, "NOTE_EVERY_S", 0.2)
    notes, got = [], {}
    spec = [str(f) for f in files]

    def reader():
        got["dataset"], got["stats"] = load(spec, tokenizer, tmp_path / "cache", [], writer=False,
                                            writer_name="local rank 0", note=notes.append)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not notes and time.monotonic() < deadline:
        time.sleep(0.1)
    assert thread.is_alive() and notes and notes[0].startswith("data: waiting for local rank 0 to tokenise the data into")
    written, stats = load(spec, tokenizer, tmp_path / "cache", [])
    thread.join(60)
    assert got["dataset"].to_dict() == written.to_dict() and got["stats"] == stats
    assert notes[-1].startswith("data: loading ") and "tokenised by local rank 0" in notes[-1]


def test_waiting_processes_stop_with_the_writers_error(tmp_path, tokenizer):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": []}])
    with pytest.raises(DataError, match=r"bad\.jsonl: record 0 \(line 1\): empty conversation"):
        load([str(bad)], tokenizer, tmp_path / "cache", [])
    with pytest.raises(DataError, match=r"^local rank 0 could not tokenise the data: .*bad\.jsonl: record 0 \(line 1\): empty"):
        load([str(bad)], tokenizer, tmp_path / "cache", [], writer=False, writer_name="local rank 0", note=print)


def test_preprocess_without_out_fills_the_cache_that_training_hits(tmp_path, tokenizer, files, capsys):
    from medcare_dist.cli import main
    from medcare_dist.config import TrainConfig

    tokenizer.save_pretrained(tmp_path / "tok")
    spec = [f"{files[0]}#2", str(files[1])]
    assert main(["preprocess", "--data", *spec, "--tokenizer", str(tmp_path / "tok"), "--max-length", "256",
                 "--data-cache", str(tmp_path / "cache")]) == 0
    assert "data: tokenising into" in capsys.readouterr().out
    lines = []
    load(spec, tokenizer, tmp_path / "cache", lines, seed=TrainConfig().seed)  # the run's default seed draws the same records
    assert lines[0].startswith("data: cache hit")
