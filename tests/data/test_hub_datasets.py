"""Hugging Face datasets as data specs: `org/name[@REV][:CONFIG]` from an offline hub cache laid
out by the test, and a local clone of such a repository. Only the train split of one config is
read; ambiguity is an error, never a silent mix."""

from __future__ import annotations

import pytest

from medcare_dist.artefacts import hub
from medcare_dist.artefacts.hub import resolve_dataset
from medcare_dist.data.dataset import build_dataset
from medcare_dist.data.sources import resolve_sources
from medcare_dist.errors import DataError, InputNotFoundError, SourceError
from medcare_dist.tools.tiny import build_tokenizer

from helpers import layout_hub_cache, write_jsonl

REVISION = "c" * 40


def record(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}


TWO_CONFIGS = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.jsonl
  - split: test
    path: en/test.jsonl
- config_name: zh
  data_files: zh/*.jsonl
---
# a card
"""


@pytest.fixture
def repos(tmp_path):
    """Two dataset repositories: one by file-name convention (train shards beside a test split),
    one whose card declares two configs and no default."""
    conventional = tmp_path / "conventional"
    write_jsonl(conventional / "data" / "train-00000-of-00002.jsonl", [record(0), record(1)])
    write_jsonl(conventional / "data" / "train-00001-of-00002.jsonl", [record(2)])
    write_jsonl(conventional / "data" / "test-00000-of-00001.jsonl", [record(9)])
    write_jsonl(conventional / "data" / "validation.jsonl", [record(7)])
    (conventional / "README.md").write_text("# no YAML header\n")
    configs = tmp_path / "configs"
    write_jsonl(configs / "en" / "train.jsonl", [record(3)])
    write_jsonl(configs / "en" / "test.jsonl", [record(8)])
    write_jsonl(configs / "zh" / "part-0.jsonl", [record(4), record(5)])
    (configs / "README.md").write_text(TWO_CONFIGS)
    return conventional, configs


@pytest.fixture
def offline_hub(repos, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    for repo_dir, repo_id in zip(repos, ("org/med", "org/bilingual")):
        layout_hub_cache(repo_dir, cache, repo_id, REVISION, repo_type="dataset")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for repo in ("org/med", "org/bilingual", "org/missing"):  # markers of an earlier test from the same parent process
        hub._marker(repo, None, "dataset").unlink(missing_ok=True)
    return cache


def files_of(spec: str) -> list[str]:
    (source,) = resolve_sources(spec, fetch_dataset=resolve_dataset)
    return [str(p.relative_to(p.parents[1])) if p.parent.name in ("data", "en", "zh") else p.name for p in source.files]


def test_a_hub_dataset_is_its_train_split(offline_hub):
    assert files_of("org/med") == ["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl"]
    assert files_of(f"org/med@{REVISION}") == files_of("org/med")
    assert files_of("org/bilingual:en") == ["en/train.jsonl"]
    assert files_of("org/bilingual:zh") == ["zh/part-0.jsonl"]


def test_records_and_counts_of_a_hub_dataset_train_as_a_local_file_would(offline_hub, tmp_path):
    tokenizer = build_tokenizer([write_jsonl(tmp_path / "corpus.jsonl", [record(i) for i in range(10)])])
    local = write_jsonl(tmp_path / "train.jsonl", [record(0), record(1), record(2)])
    got, stats = build_dataset(resolve_sources(["org/med#5"], fetch_dataset=resolve_dataset), tokenizer, 64, seed=3)
    want, _ = build_dataset(f"{local}#5", tokenizer, 64, seed=3)
    assert got.to_dict() == want.to_dict() and stats.records == 5


def test_ambiguous_or_unknown_choices_are_one_line_errors(offline_hub):
    with pytest.raises(DataError, match=r"org/bilingual: the dataset has 2 configs \(en, zh\) and none is the default; "
                                        r"name one as org/bilingual:CONFIG"):
        files_of("org/bilingual")
    with pytest.raises(DataError, match=r"org/bilingual:fr: no config 'fr' in the dataset card \(configs: en, zh\)"):
        files_of("org/bilingual:fr")
    with pytest.raises(DataError, match="declares no configs, so there is no 'en' to choose"):
        files_of("org/med:en")
    with pytest.raises(SourceError, match=r"^data org/missing: no such local path, and as a Hugging Face dataset org/missing: "
                                          r"not in the Hugging Face cache .*"
                                          r"`hf download org/missing --repo-type dataset`"):
        files_of("org/missing")
    # A path with a data-file suffix is never taken for a hub id: a typo reads "not found".
    with pytest.raises(InputNotFoundError, match="data file not found: org/med.jsonl"):
        files_of("org/med.jsonl")


def test_a_local_clone_reads_the_same_files_and_a_dir_without_train_data_is_named(repos, tmp_path):
    conventional, configs = repos
    (source,) = resolve_sources(str(conventional))
    assert [p.name for p in source.files] == ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]
    with pytest.raises(DataError, match="2 configs"):
        resolve_sources(str(configs))
    only_test = tmp_path / "only_test"
    write_jsonl(only_test / "data" / "test-00000-of-00001.jsonl", [record(0)])
    with pytest.raises(DataError, match=r"only_test is a directory without data files .* of a train split \(splits: test\)"):
        resolve_sources(str(only_test))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no data files .* and no datasets.save_to_disk directory"):
        resolve_sources(str(tmp_path / "empty"))
