"""Hub-named models, offline: a Hugging Face cache laid out by the test (HF_HUB_OFFLINE=1)."""

import json
import os
import threading
import time

import pytest

from medcare_dist.artefacts import hub
from medcare_dist.artefacts.hub import ModelSource, locate, resolve_model
from medcare_dist.errors import SourceError

from helpers import layout_hub_cache


@pytest.fixture
def offline_cache(tiny_model_dir, tmp_path, monkeypatch):
    cache, revision = layout_hub_cache(tiny_model_dir, tmp_path / "hub", "org/name")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for repo in ("org/name", "org/missing"):  # markers of an earlier test run from the same parent process
        hub._marker(repo, None).unlink(missing_ok=True)
    return cache, revision


def test_local_dir_is_recorded_absolute(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    source = resolve_model(tiny_model_dir.name)
    assert source == ModelSource(name=tiny_model_dir.name, path=str(tiny_model_dir.resolve()))
    assert locate(source.to_dict()) == tiny_model_dir.resolve()


def test_hub_id_resolves_to_the_cached_snapshot_and_its_commit(offline_cache):
    cache, revision = offline_cache
    source = resolve_model("org/name")
    assert source.repo_id == "org/name" and source.revision == revision
    assert source.path == str(cache / "models--org--name" / "snapshots" / revision)
    assert resolve_model(f"org/name@{revision}") == ModelSource(f"org/name@{revision}", source.path, "org/name", revision)


def test_locate_falls_back_to_the_recorded_commit_when_the_path_is_gone(offline_cache):
    _, revision = offline_cache
    record = {"name": "org/name", "path": "/nonexistent/snapshot", "repo_id": "org/name", "revision": revision}
    assert locate(record).name == revision
    with pytest.raises(SourceError, match="no longer exists"):
        locate({"name": "runs/base", "path": "/nonexistent/base"})


def test_bad_names_are_one_line_errors(offline_cache, tmp_path):
    with pytest.raises(SourceError, match=r"org/missing: not in the Hugging Face cache .*`hf download org/missing`"):
        resolve_model("org/missing")
    commit = "f" * 40  # a recorded commit that is not in the cache: the advice fetches that commit, not main
    with pytest.raises(SourceError, match=rf"`hf download org/missing --revision {commit}`\) or give a local"):
        resolve_model(f"org/missing@{commit}")
    with pytest.raises(SourceError, match="model directory not found: ./no/such"):
        resolve_model("./no/such")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="is a file, not a model directory"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_other_local_ranks_wait_for_local_rank_0_and_share_its_outcome(offline_cache, monkeypatch):
    """Rank 1 must not touch the hub before rank 0 is done; it then reads the cache offline,
    and rank 0's failure reaches it as the same error instead of a wait."""
    _, revision = offline_cache
    calls = []
    real_snapshot = hub._snapshot
    monkeypatch.setattr(hub, "_snapshot", lambda *a, **k: calls.append(k["local_files_only"]) or real_snapshot(*a, **k))
    monkeypatch.setenv("LOCAL_RANK", "1")
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("source", resolve_model("org/name")))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and calls == []  # waiting, not fetching
    monkeypatch.setenv("LOCAL_RANK", "0")
    leader = resolve_model("org/name")
    waiter.join(timeout=10)
    assert result["source"] == leader and leader.revision == revision
    assert calls == [False, True]  # the leader may download; the waiter reads the cache only

    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SourceError):
        resolve_model("org/missing")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SourceError, match="org/missing: not in the Hugging Face cache"):
        resolve_model("org/missing", wait_timeout_s=5)
    marker = hub._marker("org/missing", None)
    assert json.loads(marker.read_text())["error"].startswith("model org/missing")
    os.remove(marker)
