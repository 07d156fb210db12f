"""File-level helpers every on-disk format shares: streamed and cached sha256, output dirs.

No format lives here (manifests: artefacts/manifest.py; tokenised datasets: data/); only what
each of them needs of a file or a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from medcare_dist.errors import CheckpointError, OutputExistsError

DIGEST_CACHE = ".medcare_digests.json"  # beside the files it describes: {name: {size, mtime_ns, ctime_ns, ino, sha256}}


def _cache_paths(directory: Path) -> list[Path]:
    """Where a dir's digest cache lives: beside the files, else (read-only dir) under the
    user's cache dir, named after the dir's absolute path."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medcare_dist" / "digests"
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return [directory / DIGEST_CACHE, user / f"{key}.json"]


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed; cached per dir, keyed by (size, mtime_ns, ctime_ns, inode):
    an unchanged file is not read again, a rewritten one is, also when the writer kept its size
    and mtime (`cp -p`, `rsync -t`: the change time cannot be set back)."""
    path = Path(path)
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
    places = _cache_paths(path.parent)
    for place in places:
        entry = _read_cache(place).get(path.name)
        if entry and {k: entry.get(k) for k in key} == key:
            return entry["sha256"]
    digest = stream_sha256(path)
    for place in places:
        cache = _read_cache(place)
        cache[path.name] = {**key, "sha256": digest}
        tmp = place.with_name(f"{place.name}.{os.getpid()}.tmp")
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, place)
            break
        except OSError:  # read-only: the next place
            tmp.unlink(missing_ok=True)
    return digest


def stream_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (never whole into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def require_output_dir(out_dir: str | Path) -> Path:
    """An output directory path must be a directory or not exist yet (not a file)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output directory {out} is a file; give a directory path")
    return out


def require_empty_dir(out_dir: str | Path) -> Path:
    """Outputs are never written over: the directory must be new or empty."""
    out = require_output_dir(out_dir)
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"output directory {out} exists and is not empty")
    return out


def _listing(directory: Path) -> dict | None:
    try:
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}
    except OSError:
        return None


@contextmanager
def reading(directory: str | Path):
    """Read an artefact dir that a running job may prune (keep_last) or replace meanwhile: an
    error raised after it vanished or changed says so, instead of naming whichever of its
    files went missing first."""
    directory = Path(directory)
    before = _listing(directory)
    try:
        yield
    except Exception:
        if before is not None and _listing(directory) != before:
            raise CheckpointError(f"{directory} was removed or changed while being read: pruned by a running job (keep_last)? "
                                  "Read a checkpoint the job keeps, or copy it first") from None
        raise
