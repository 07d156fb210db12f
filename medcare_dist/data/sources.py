"""Where records come from: data specs, the files behind them, and reading records as streams.

A spec is a file, a directory of shards, a glob, or a `datasets.save_to_disk` directory,
optionally with a record count: ``a.jsonl#20000`` takes 20,000 records of a.jsonl drawn
with the run's seed (the file repeated when 20,000 exceeds it), as ms-swift's ``dataset#N``.
Files: JSON (an array), JSONL and Parquet, each optionally gzip-compressed (``.jsonl.gz``).
Records are yielded one at a time (Parquet in row batches, JSONL line by line); only a
JSON array is parsed whole.
"""

from __future__ import annotations

import glob
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from medcare_dist.errors import DataError, InputNotFoundError, location
from medcare_dist.files import DIGEST_CACHE, file_sha256

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".parquet")
COMPRESSED = (".gz",)
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One entry of the mix: its spec as given, the files it reads, and how many records it
    contributes (None: all of them, once)."""

    spec: str
    files: tuple[Path, ...]
    records: int | None = None

    def describe(self) -> dict:
        """Content identity (sizes and sha256s, not paths): what the cache key and the
        manifest record."""
        return {"spec": self.spec, "records": self.records,
                "files": [{"path": str(p.resolve()), "size": p.stat().st_size, "sha256": file_sha256(p)} for p in self.files]}


def data_specs(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Specs from a path, a comma-separated string of specs, or a list of them."""
    if isinstance(spec, str):
        parts = [part.strip() for part in spec.split(",")]
    elif isinstance(spec, Path):
        parts = [str(spec)]
    else:
        parts = [str(part).strip() for part in spec]
    parts = [part for part in parts if part]
    if not parts:
        raise ValueError(f"no data files given: {spec!r}")
    return parts


def data_files(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """The paths of the specs (record counts left off), unexpanded: what a reader opens by name."""
    return [Path(split_count(part)[0]) for part in data_specs(spec)]


def split_count(spec: str) -> tuple[str, int | None]:
    """``path#N`` -> (path, N); a spec without a count -> (spec, None)."""
    path, sep, count = spec.rpartition("#")
    if not sep or not count.strip().isdigit():
        return spec, None
    if int(count) < 1:
        raise DataError(f"{spec}: the record count after '#' must be at least 1")
    return path, int(count)


def resolve_sources(spec: str | Path | Sequence[str | Path]) -> list[Source]:
    """Each spec with the files it names; a missing path or an empty glob is an error here,
    before anything is read."""
    sources = []
    for part in data_specs(spec):
        path, count = split_count(part)
        sources.append(Source(part, tuple(_expand(path)), count))
    return sources


def _expand(path: str) -> list[Path]:
    if _GLOB_CHARS & set(path):
        found = sorted(Path(p) for p in glob.glob(path) if _readable(Path(p)))
        if not found:
            raise InputNotFoundError(f"no data file matches {path}")
        return found
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"data file not found: {p}")
    if not p.is_dir() or is_saved_dataset(p):
        return [p]
    found = sorted(child for child in p.iterdir() if child.is_file() and child.name != DIGEST_CACHE and _readable(child))
    if not found:
        raise DataError(f"{p} is a directory without data files ({', '.join(SUPPORTED_SUFFIXES)}, optionally .gz) "
                        "and not a datasets.save_to_disk directory")
    return found


def _readable(path: Path) -> bool:
    return is_saved_dataset(path) or _suffix(path) in SUPPORTED_SUFFIXES


def _suffix(path: Path) -> str:
    """The format suffix, lower-cased, under a compression suffix (`.JSONL.gz` -> `.jsonl`)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def saved_dataset_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- reading


def raw_records(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    """Yield (record index, JSONL line number or None, parsed record or DataError)."""
    if not path.exists():
        raise InputNotFoundError(f"data file not found: {path}")
    if is_saved_dataset(path):
        yield from _saved_records(path)
        return
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file")
    suffix = _suffix(path)  # `.JSONL` is as good as `.jsonl`
    if suffix == ".jsonl":
        yield from _jsonl_records(path)
    elif suffix == ".json":
        yield from ((index, None, record) for index, record in enumerate(_json_array(path)))
    elif suffix == ".parquet":
        yield from _parquet_records(path)
    else:
        raise DataError(f"unsupported data file type {path.suffix!r} (expected one of {', '.join(SUPPORTED_SUFFIXES)}, "
                        "optionally .gz)", path)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")


def _jsonl_records(path: Path) -> Iterator[tuple[int, int, Any]]:
    index = 0
    with _open(path) as file:
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
        with _open(path) as file:
            records = json.loads(file.read())
    except (json.JSONDecodeError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        raise DataError(f"invalid JSON: {err}", path) from None
    if not isinstance(records, list):
        raise DataError(f"expected a JSON array of records (got {type(records).__name__}); use .jsonl for one record per line", path)
    return records


def _parquet_records(path: Path, batch_size: int = 1024) -> Iterator[tuple[int, None, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        with _open(path) as file:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size):
                for record in batch.to_pylist():
                    yield index, None, record
                    index += 1
    except (pa.ArrowException, OSError) as err:  # a cut or damaged file: say which, and after how many records
        raise DataError(f"not a readable Parquet file (after {index} records): {err}", path) from None


def _saved_records(path: Path) -> Iterator[tuple[int, None, Any]]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(dataset)}); give one split's directory")
    for index, record in enumerate(dataset):
        yield index, None, record


def read_located(path: Path, normalize) -> Iterator[tuple[str, Any]]:
    """(location, normalize(record)) for each record of `path`; a bad record yields its
    located DataError in place of the messages."""
    for index, line, record in raw_records(path):
        try:
            if isinstance(record, DataError):
                raise record
            yield location(path, index, line), normalize(record)
        except DataError as err:
            yield location(path, index, line), err.at(path, index, line)


def draw(available: int, count: int, seed: int, source_index: int) -> list[int]:
    """`count` record indices out of `available`, drawn with the seed: every record once per
    full pass over the file, then a sample without repeats for the remainder; in file order."""
    import random

    rng = random.Random(f"{seed}:{source_index}")
    passes, rest = divmod(count, available)
    return sorted(list(range(available)) * passes + rng.sample(range(available), rest))
