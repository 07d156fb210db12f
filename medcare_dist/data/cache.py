"""The tokenised-data cache: one entry per recipe, written once, memory-mapped by every rank.

An entry is a directory named after the sha256 of its recipe (each source's size and sha256,
the tokenizer fingerprint, max_length, the record rules, the mix, the format version):

    <cache>/<key>/medcare_data.json    manifest: format, key, recipe, stats, and the size and
                                       sha256 of every file below
    <cache>/<key>/dataset/             datasets.save_to_disk (Arrow)

One process writes it (`writer=True`): into a temporary directory beside it, renamed into
place when complete, so that a crash leaves no half entry under the key. Everyone else waits
for a complete entry, printing a note every 30 s, and memory-maps it (`datasets.load_from_disk`).
An entry whose files do not match its manifest (truncated, overwritten) is not used: the
writer rebuilds it. `medcare-dist preprocess --out DIR` writes the same layout to DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from medcare_dist.errors import DataError
from medcare_dist.files import stream_sha256

MANIFEST_NAME = "medcare_data.json"
MANIFEST_FORMAT = "medcare_dist.data.dataset/4"  # 3: content-addressed entries with their own digests; 4: the tokenizer pipeline in the fingerprint, record tools, empty system as none
DATASET_SUBDIR = "dataset"
NOTE_EVERY_S = 30.0


def default_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "medcare_dist"


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps({"format": MANIFEST_FORMAT, **recipe}, sort_keys=True).encode()).hexdigest()


def read_manifest(entry: Path) -> dict | None:
    try:
        manifest = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def entry_problem(entry: Path, manifest: dict | None) -> str | None:
    """Why `entry` cannot be used (its manifest is missing or unknown, a file differs from
    its recorded size or sha256), or None when it is whole."""
    if manifest is None:
        return f"no readable {MANIFEST_NAME}"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"unknown format {manifest.get('format')!r} (expected {MANIFEST_FORMAT})"
    recorded = manifest.get("files") or {}
    present = {str(p.relative_to(entry)) for p in (entry / DATASET_SUBDIR).rglob("*") if p.is_file()}
    if not recorded or set(recorded) != present:
        return "its files are not the ones its manifest lists"
    for name, digest in recorded.items():
        path = entry / name
        if path.stat().st_size != digest["size"] or stream_sha256(path) != digest["sha256"]:
            return f"{name} differs from its recorded size or sha256"
    return None


def write_entry(final: Path, build: Callable[[Path], dict], log: Callable[[str], None]) -> dict:
    """Build an entry at `final`: `build(work_dir)` saves the dataset under
    work_dir/dataset and returns the manifest's body. Returns the manifest."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        body = build(tmp)
        shutil.rmtree(tmp / "work", ignore_errors=True)
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": stream_sha256(p)}
                 for p in sorted((tmp / DATASET_SUBDIR).rglob("*")) if p.is_file()}
        manifest = {"format": MANIFEST_FORMAT, **body, "files": files}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if final.exists():  # a broken entry under the same key: set it aside, then replace it
            stale = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.stale"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another node's writer got there first (a shared directory): theirs is as good
            if entry_problem(final, read_manifest(final)) is not None:
                raise
            log(f"data: {final} was written by another process meanwhile; using it")
            return read_manifest(final)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def failure_note(entry: Path) -> Path:
    """Where the writer leaves the one-line error that stopped it (a user error: the same
    inputs fail the same way), so that waiting ranks stop with it under any launcher."""
    return entry.parent / f"{entry.name}.failed"


def wait_for_entry(entry: Path, writer: str, note: Callable[[str], None], poll_s: float = 1.0) -> dict:
    """Wait until `entry` is whole; say so every NOTE_EVERY_S seconds. Returns its manifest;
    raises the writer's DataError when it failed on these inputs."""
    started = last_note = time.monotonic()
    while True:
        manifest = read_manifest(entry)
        if manifest is not None and entry_problem(entry, manifest) is None:
            return manifest
        try:
            failed = failure_note(entry).read_text(encoding="utf-8").strip()
        except OSError:
            failed = None
        if failed:
            raise DataError(f"{writer} could not tokenise the data: {failed}")
        now = time.monotonic()
        if now - last_note >= NOTE_EVERY_S:
            note(f"data: waiting for {writer} to tokenise the data into {entry} ({now - started:.0f} s so far)")
            last_note = now
        time.sleep(poll_s)
