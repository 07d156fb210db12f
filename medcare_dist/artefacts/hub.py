"""Where a base model (or a dataset) comes from: a local directory or a Hugging Face hub repository.

A run names its base as the user wrote it (`Qwen/Qwen1.5-7B-Chat`, `org/name@REV`,
`runs/stage2-base`) and records what it actually loaded as a `ModelSource`: the name, the
absolute local directory, and for a hub model the repository and the commit of the snapshot.
Every later step finds the same files from that record (`locate`), on this machine or on
another one with the same cache, and never re-resolves a moving name like `main`.

On a node, only local rank 0 asks the hub (and downloads what is missing); the other local
ranks wait for it, then read the same snapshot from the cache without network access. A hub
dataset (`resolve_dataset`) is fetched the same way; which of its files are trained on is the
data layer's business.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from medcare_dist.errors import SourceError

# What a model needs, and nothing pickled: configs, tokenizer files, chat templates, safetensors.
# What a dataset needs: its card (configs and splits) and the record files the data layer reads.
ALLOW_PATTERNS = {
    "model": ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"],
    "dataset": ["README.md", "*.json", "*.jsonl", "*.parquet", "*.gz", "*.zst", "*.arrow"],
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it
    path: str  # absolute local directory with the files
    repo_id: str | None = None  # hub repository, for a hub model
    revision: str | None = None  # commit hash of the snapshot that was loaded

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "ModelSource":
        return cls(**{key: record.get(key) for key in ("name", "path", "repo_id", "revision")})


def is_hub_id(name: str) -> bool:
    """`org/name` or `org/name@revision` that is not an existing path."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))


def resolve_model(name: str, *, log: Callable[[str], None] = print, wait_timeout_s: float = 4 * 3600) -> ModelSource:
    """The ModelSource for a local directory or a hub id (download on local rank 0 only)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(name=name, path=str(path.resolve()))
    if path.exists():
        raise SourceError(f"model {name}: is a file, not a model directory")
    if not is_hub_id(name):
        raise SourceError(f"model directory not found: {name}")
    repo_id, _, revision = name.partition("@")
    snapshot = _node_snapshot(repo_id, revision or None, "model", log, wait_timeout_s)
    return ModelSource(name=name, path=str(snapshot), repo_id=repo_id, revision=snapshot.name)


def resolve_dataset(name: str, *, log: Callable[[str], None] = print, wait_timeout_s: float = 4 * 3600) -> Path:
    """The local snapshot directory of hub dataset `org/name` or `org/name@revision`
    (offline from the cache under HF_HUB_OFFLINE=1; downloaded on local rank 0 only)."""
    if not is_hub_id(name):
        raise SourceError(f"dataset {name}: not a hub id (org/name or org/name@revision)")
    repo_id, _, revision = name.partition("@")
    return _node_snapshot(repo_id, revision or None, "dataset", log, wait_timeout_s)


def _node_snapshot(repo_id: str, revision: str | None, repo_type: str, log, wait_timeout_s: float) -> Path:
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return _fetch_and_announce(repo_id, revision, repo_type)
    _wait_for_node_leader(repo_id, revision, repo_type, log, wait_timeout_s)
    return _snapshot(repo_id, revision, local_files_only=True, repo_type=repo_type)


def locate(source: dict | ModelSource) -> Path:
    """The local directory of a recorded ModelSource: the recorded path if it is still there,
    else the same commit of the same hub repository (from the cache, or downloaded)."""
    source = source if isinstance(source, ModelSource) else ModelSource.from_dict(source)
    path = Path(source.path)
    if path.is_dir():
        return path
    if not source.repo_id:
        raise SourceError(f"base model directory {path} (recorded as {source.name!r}) no longer exists")
    return _snapshot(source.repo_id, source.revision, local_files_only=False)


def _snapshot(repo_id: str, revision: str | None, local_files_only: bool, repo_type: str = "model") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    where = f"{repo_type} {repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, allow_patterns=ALLOW_PATTERNS[repo_type],
                                      local_files_only=local_files_only))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        raise SourceError(
            f"{where}: not in the Hugging Face cache ({_cache_dir()}) and the hub cannot be reached "
            f"({type(err).__name__}); download it first (`hf download {repo_id}{kind}"
            + (f" --revision {revision}`" if revision else "`") + ") or give a local " + ("directory" if repo_type == "model" else "path")
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise SourceError(f"{where}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _marker(repo_id: str, revision: str | None, repo_type: str = "model") -> Path:
    """Node-local file through which local rank 0 tells its siblings that the snapshot is there.
    Keyed by the parent process (the per-node launcher), so a marker of an earlier run is
    never taken for this one's."""
    key = re.sub(r"[^\w.-]", "_", f"{repo_type}-{repo_id}@{revision or 'default'}")
    return Path(tempfile.gettempdir()) / "medcare_dist-hub" / f"{os.getppid()}-{key}.json"


def _fetch_and_announce(repo_id: str, revision: str | None, repo_type: str) -> Path:
    marker = _marker(repo_id, revision, repo_type)
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        snapshot = _snapshot(repo_id, revision, local_files_only=False, repo_type=repo_type)
        outcome = {"path": str(snapshot)}
        return snapshot
    except SourceError as err:
        outcome = {"error": str(err)}
        raise
    finally:
        tmp = marker.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(outcome))
        os.replace(tmp, marker)


def _wait_for_node_leader(repo_id: str, revision: str | None, repo_type: str, log, timeout_s: float) -> None:
    marker, start, last_note = _marker(repo_id, revision, repo_type), time.monotonic(), time.monotonic()
    while not marker.exists():
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise SourceError(f"{repo_type} {repo_id}: local rank 0 did not finish fetching it within {timeout_s:.0f} s")
        if time.monotonic() - last_note > 60:
            log(f"local rank {os.environ.get('LOCAL_RANK')}: waiting for local rank 0 to fetch {repo_id} ({waited:.0f} s)")
            last_note = time.monotonic()
        time.sleep(0.2)
    outcome = json.loads(marker.read_text())
    if "error" in outcome:
        raise SourceError(outcome["error"])
