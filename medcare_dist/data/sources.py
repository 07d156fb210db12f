"""Where records come from: data specs, the files behind them, and reading records as streams.

A spec is a file, a directory of shards, a glob, a `datasets.save_to_disk` directory, or a
Hugging Face dataset (a local copy of its repository, or `org/name[@revision][:config]` that
the caller's `fetch_dataset` turns into one), optionally with a record count: ``a.jsonl#20000``
takes 20,000 records of a.jsonl drawn with the run's seed (the file repeated when 20,000
exceeds it), as ms-swift's ``dataset#N``. Of a Hugging Face dataset, the train split of one
config is read, found as `datasets` finds it (the card's `configs`, else the file-name
conventions); several configs and none chosen is an error, never a silent mix.
Files: JSON (an array), JSONL and Parquet, each optionally gzip-compressed, JSON and JSONL
also zstd (``.jsonl.gz``, ``.jsonl.zst``). A directory of shards is read whole, its
subdirectories too; an entry in it that is not data is an error, never skipped (a directory
laid out as a Hugging Face dataset, with split-named files or a card, gives its train split).
Records are yielded one at a time (Parquet in row batches, JSONL line by line); only a JSON
array is parsed whole.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from medcare_dist.errors import DataError, InputNotFoundError, SourceError, location
from medcare_dist.files import DIGEST_CACHE, file_sha256

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".parquet")
COMPRESSED = (".gz", ".zst")
_GLOB_CHARS = set("*?[")
# hub dataset `org/name[@revision]` -> its local snapshot directory; raises SourceError for a
# name that is not a hub id or not fetchable (the hub layer owns what a hub id is)
FetchDataset = Callable[[str], Path]


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
        files = [f for p in self.files for f in (saved_dataset_files(p) if p.is_dir() else [p])]
        return {"spec": self.spec, "records": self.records,
                "files": [{"path": str(f.resolve()), "size": f.stat().st_size, "sha256": file_sha256(f)} for f in files]}


def data_specs(spec: str | Path | Sequence[str | Path | Source]) -> list[str]:
    """Specs from a path, a comma-separated string of specs, or a list of them (or of Sources)."""
    if isinstance(spec, str):
        parts = [part.strip() for part in spec.split(",")]
    elif isinstance(spec, Path):
        parts = [str(spec)]
    else:
        parts = [(part.spec if isinstance(part, Source) else str(part)).strip() for part in spec]
    parts = [part for part in parts if part]
    if not parts:
        raise ValueError(f"no data files given: {spec!r}")
    return parts


def data_files(spec: str | Path | Sequence[str | Path | Source]) -> list[Path]:
    """The paths of the specs (record counts left off), unexpanded: what a reader opens by name."""
    return [Path(split_count(part)[0]) for part in data_specs(spec)]


def split_count(spec: str) -> tuple[str, int | None]:
    """``path#N`` -> (path, N); a spec without a count -> (spec, None)."""
    path, sep, count = spec.rpartition("#")
    if not sep or not re.fullmatch(r"\s*[0-9]+\s*", count):
        return spec, None
    if int(count) < 1:
        raise DataError(f"{spec}: the record count after '#' must be at least 1")
    return path, int(count)


def resolve_sources(spec: str | Path | Sequence[str | Path | Source], fetch_dataset: FetchDataset | None = None) -> list[Source]:
    """Each spec with the files it names (Sources pass through); a missing path or an empty
    glob is an error here, before anything is read. A spec that is not a path but reads as a
    hub dataset id is fetched with `fetch_dataset` when one is given."""
    if not isinstance(spec, (str, Path)) and spec and all(isinstance(part, Source) for part in spec):
        return list(spec)
    sources = []
    for part in data_specs(spec):
        path, count = split_count(part)
        sources.append(Source(part, tuple(_expand(path, fetch_dataset)), count))
    return sources


def _may_name_a_dataset(spec: str) -> bool:
    """Not written as a path (./, /, ~) and without a data-file suffix: a missing file then
    reads "not found", never a hub lookup."""
    return not spec.startswith((".", "/", "~")) and _suffix(Path(spec.partition("@")[0].partition(":")[0])) not in SUPPORTED_SUFFIXES


def _expand(path: str, fetch_dataset: FetchDataset | None = None) -> list[Path]:
    p = Path(path)
    if _GLOB_CHARS & set(path) and not p.exists():
        matched = [Path(m) for m in sorted(glob.glob(path))]
        if not matched:
            raise InputNotFoundError(f"no data file matches {path}")
        return _shards(matched, path)
    if not p.exists():
        if fetch_dataset is not None and _may_name_a_dataset(path):
            name, _, config = path.partition(":")
            try:
                directory = fetch_dataset(name)
            except SourceError as err:  # a mistyped local path reads as a hub id too: say both
                raise SourceError(f"data {path}: no such local path, and as a Hugging Face {err}") from None
            return hf_dataset_files(directory, config or None, path)
        raise InputNotFoundError(f"data file not found: {p}")
    if not p.is_dir() or is_saved_dataset(p):
        return [p]
    if _card_configs(p) or set(_split_patterns(p)) - {"train"}:  # laid out as a Hugging Face dataset
        return hf_dataset_files(p, None, path)
    return _shards(sorted(p.iterdir()), path)


# Files a directory of shards (or a dataset repository) may hold beside its data.
_NOT_DATA = {DIGEST_CACHE, "README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", ".gitattributes", ".gitignore"}


def _shards(entries: list[Path], spec: str) -> list[Path]:
    """The data files among `entries` (a directory's or a glob's), every one of them: a
    subdirectory is read whole (its data files at any depth, or as a saved dataset), and an
    entry that is neither data nor a known companion file is an error, never skipped."""
    found, refused = [], []
    for entry in _entries_below(entries):
        (found if _readable(entry) else refused).append(entry)
    if refused:
        listed = ", ".join(p.name for p in refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise DataError(f"{spec}: not data files ({', '.join(SUPPORTED_SUFFIXES)}, optionally {' or '.join(COMPRESSED)}, or "
                        f"a datasets.save_to_disk directory): {listed}; convert or remove them, or name the files to read")
    if not found:
        raise DataError(f"{spec}: no data files ({', '.join(SUPPORTED_SUFFIXES)}, optionally {' or '.join(COMPRESSED)}) "
                        "and no datasets.save_to_disk directory")
    return found


def _entries_below(entries: list[Path]) -> Iterator[Path]:
    """Files and saved datasets among `entries` and in their subdirectories, in order, less the
    companions of data (a card, a licence, dotfiles, our digest cache)."""
    for entry in entries:
        if entry.name in _NOT_DATA or entry.name.startswith("."):
            continue
        if entry.is_dir() and not is_saved_dataset(entry):
            yield from _entries_below(sorted(entry.iterdir()))
        else:
            yield entry


def _split_patterns(directory: Path) -> dict[str, list[str]]:
    """{split: file patterns} as `datasets` assigns a directory's files to splits by name."""
    from datasets.data_files import EmptyDatasetError, get_data_patterns

    try:
        return get_data_patterns(str(directory))
    except EmptyDatasetError:  # no file it recognises
        return {}


def hf_dataset_files(directory: Path, config: str | None, spec: str) -> list[Path]:
    """The train-split files of one config of a Hugging Face dataset repository (a snapshot
    or a clone), as `datasets` resolves them: the card's `configs` when it has them, else the
    file-name conventions (`data/train-*`, `train.jsonl`, ...)."""
    from datasets.data_files import resolve_pattern, sanitize_patterns

    configs = _card_configs(directory)
    if configs:
        names = sorted(configs)
        if config is None:
            defaults = [n for n, c in configs.items() if c.get("default")] or [n for n in names if n == "default"]
            if len(defaults) != 1 and len(names) > 1:
                raise DataError(f"{spec}: the dataset has {len(names)} configs ({', '.join(names)}) and none is the default; "
                                f"name one as {spec.partition('#')[0]}:CONFIG")
            config = defaults[0] if len(defaults) == 1 else names[0]
        if config not in configs:
            raise DataError(f"{spec}: no config {config!r} in the dataset card (configs: {', '.join(names)})")
        splits = sanitize_patterns(configs[config].get("data_files", "**"))
    elif config is not None:
        raise DataError(f"{spec}: the dataset card of {directory} declares no configs, so there is no {config!r} to choose")
    else:
        splits = _split_patterns(directory)
    readable = f"({', '.join(SUPPORTED_SUFFIXES)}, optionally {' or '.join(COMPRESSED)})"
    def matches(pattern: str) -> list[str]:
        try:
            return resolve_pattern(pattern, str(directory))
        except FileNotFoundError:  # datasets' way of saying "none"; one of several patterns may match nothing
            return []

    files = {Path(f) for pattern in splits.get("train", []) for f in matches(pattern) if _readable(Path(f))}
    if not files:
        where = str(directory) if spec == str(directory) else f"{spec} ({directory})"
        found = f" (splits: {', '.join(map(str, splits))})" if set(splits) - {"train"} else ""
        raise DataError(f"{where} is a directory without data files {readable} of a train split{found}, "
                        "and not a datasets.save_to_disk directory")
    return sorted(files)


def _card_configs(directory: Path) -> dict[str, dict]:
    """{config name: its card entry} from README.md's YAML header; {} when there is none."""
    readme = directory / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import DatasetCard

    try:
        entries = DatasetCard.load(readme).data.to_dict().get("configs") or []
    except Exception as err:  # a card whose YAML header does not parse
        raise DataError(f"the dataset card's YAML header does not parse: {err}", readme) from None
    return {entry.get("config_name", "default"): entry for entry in entries if isinstance(entry, dict)}


def _readable(path: Path) -> bool:
    return is_saved_dataset(path) or (_suffix(path) in SUPPORTED_SUFFIXES and not _zstd_parquet(path))


def _zstd_parquet(path: Path) -> bool:
    """Parquet needs random access, which a zstd stream does not give (Parquet compresses its
    own columns; a gzip'd Parquet file is read, slowly)."""
    return _suffix(path) == ".parquet" and path.suffix.lower() == ".zst"


def _suffix(path: Path) -> str:
    """The format suffix, lower-cased, under a compression suffix (`.JSONL.gz` -> `.jsonl`)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def saved_dataset_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != DIGEST_CACHE)


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
    elif _zstd_parquet(path):
        raise DataError("a zstd-compressed Parquet file cannot be read (Parquet needs random access; it compresses its "
                        "columns itself): decompress it with `zstd -d`", path)
    elif suffix == ".parquet":
        yield from _parquet_records(path)
    else:
        raise DataError(f"unsupported data file type {path.suffix!r} (expected one of {', '.join(SUPPORTED_SUFFIXES)}, "
                        f"optionally {' or '.join(COMPRESSED)})", path)


def _open(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(_ZstdStream(path))
    return path.open("rb")


class _ZstdStream(io.RawIOBase):
    """A .zst file (one frame or several) decompressed as a stream. Unlike zstandard's own
    reader, which ends a cut file with a short read, a stream that stops inside a frame
    raises EOFError, as gzip does."""

    def __init__(self, path: Path):
        try:
            import zstandard
        except ImportError:
            raise DataError("reading .zst needs the zstandard package: pip install 'medcare-dist[zstd]' "
                            "(or zstandard), or decompress the file", path) from None
        self._file = path.open("rb")
        self._context = zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._file.read(1 << 20)
            if not chunk:
                if not self._frame.eof:
                    raise EOFError("the zstd stream ends inside a frame")
                return 0
            self._pending = self._decompress(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:  # the next of concatenated frames
                self._frame = self._context.decompressobj()
            out.append(self._frame.decompress(data))
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _jsonl_records(path: Path) -> Iterator[tuple[int, int, Any]]:
    index = line_no = 0
    with _open(path) as file, _damaged(path, lambda: f"after line {line_no}"):
        for line_no, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                record = DataError(f"invalid JSON: {'nested too deeply to parse' if isinstance(err, RecursionError) else err}")
            yield index, line_no, record
            index += 1


def _json_array(path: Path) -> list:
    try:
        with _open(path) as file, _damaged(path, lambda: "while reading"):
            records = json.loads(file.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"invalid JSON: {err}", path) from None
    if not isinstance(records, list):
        raise DataError(f"expected a JSON array of records (got {type(records).__name__}); use .jsonl for one record per line", path)
    return records


@contextlib.contextmanager
def _damaged(path: Path, where: Callable[[], str]):
    """A cut or corrupt compressed stream as one DataError naming the file and how far it was read."""
    try:
        yield
    except (OSError, EOFError) as err:
        raise DataError(f"a damaged or cut file ({where()}): {type(err).__name__}: {err}", path) from None
    except Exception as err:
        if type(err).__name__ != "ZstdError":
            raise
        raise DataError(f"a damaged or cut zstd file ({where()}): {err}", path) from None


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
