"""Streaming reads and writes of Hugging Face safetensors checkpoints.

A 14B base is ~28 GB in bf16; the conversion commands (prepare-stage2, export) must run on a
CPU box without holding it in memory. Tensors are read one at a time from their shard
(`safe_open`, memory-mapped) and written into output shards of bounded size, so peak memory
is about one output shard plus one tensor. `merge_into_base` is the one streaming merge that
prepare-stage2 and export run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medcare_dist.adapters.lora import merge_delta
from medcare_dist.errors import CheckpointError, InputNotFoundError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Everything in an HF model dir that is not weights: configs, tokenizer, chat template.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def check_model_dir(model_dir: Path) -> None:
    """Refuse a directory that is not a loadable HF model (no config, no safetensors weights),
    before anything expensive reads it."""
    if not (model_dir / "config.json").is_file():
        raise InputNotFoundError(f"{model_dir}: no config.json; not a Hugging Face model directory")
    weight_files(model_dir)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it."""
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.exists():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    if list(model_dir.glob("*.bin")):
        raise CheckpointError(f"{model_dir} holds only pickled *.bin weights; convert it to safetensors first (safe loading only)")
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight, one at a time, shard by shard.

    The file is opened once per tensor on purpose: a safetensors tensor is a zero-copy view
    of the file's memory map, and every page read through an open handle stays resident
    until the handle closes. One mapping per tensor lets each tensor's pages go when the
    tensor does, so memory follows what is in use, not the input shard size
    (bench/export_rss.py measured both).
    """
    by_file: dict[Path, list[str]] = {}
    for name, f in weight_files(model_dir).items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        for name in names:
            with safe_open(str(f), framework="pt") as handle:
                tensor = handle.get_tensor(name)
            yield name, tensor


def parse_size(text: str | int) -> int:
    """"5GB" -> 5e9 bytes (decimal units, as in transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


class ShardedWriter:
    """Collects tensors and writes `model-0000i-of-0000n.safetensors` shards of at most
    `max_shard_bytes` each (a larger single tensor gets a shard of its own), plus the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._written):05d}.tmp.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            final = self.out_dir / SINGLE_FILE
            self._written[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._written):
            final = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return finals


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files, so `dst` is a complete HF model dir."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def merge_into_base(base_dir: Path, out: Path, deltas: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], scale: float,
                    max_shard_size: str, dtype: torch.dtype | None = None) -> tuple[int, list[Path]]:
    """Write base_dir's weights to `out` with W += scale * sum(B @ A) for every target in
    `deltas` ({target: [(A, B), ...]}), merged in fp32, then cast to `dtype` (floating tensors;
    None: each keeps its own dtype); plus the side files. Returns (merged count, shards)."""
    writer = ShardedWriter(out, parse_size(max_shard_size))
    merged = 0
    for name, tensor in iter_tensors(base_dir):
        pairs = deltas.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if pairs:
            weight = tensor.to(torch.float32, copy=True)
            for a, b in pairs:
                merge_delta(weight, a, b, scale)
            tensor = weight if dtype is not None else weight.to(tensor.dtype)
            merged += 1
        writer.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
    shards = writer.close()
    copy_side_files(base_dir, out)
    return merged, shards
