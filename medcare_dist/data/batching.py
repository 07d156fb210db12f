"""The batch plan: which records form each global batch and micro-batch, and their tensors.

Batches are planned over global indices only (seed, epoch, global batch size), so the data
order does not depend on the world size. Each global batch is cut into pieces (micro-batches)
that do not depend on the world size either (`split_global_batch`: fixed-size runs of records,
or rows packed to a token budget); rank r runs pieces r, r + W, ... (`pieces_for_rank`).
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Sequence

import torch

from medcare_dist.data.chat import IGNORE_INDEX

LENGTH_GROUP_BATCHES = 16  # global batches per chunk that is sorted by length


def plan_global_batches(lengths: Iterable[int], global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global batches of record indices, the same on every rank and world size.

    A seeded shuffle of all indices, sorted by length (longest first) within chunks of
    16 global batches, cut into global batches (the last may be smaller), whose order is
    then shuffled. Every index appears exactly once.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, not {global_batch_size}")
    lengths = list(lengths)
    rng = random.Random(f"medcare_dist:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = global_batch_size * LENGTH_GROUP_BATCHES
    grouped = []
    for start in range(0, len(order), chunk):
        grouped += sorted(order[start : start + chunk], key=lengths.__getitem__, reverse=True)
    batches = [grouped[start : start + global_batch_size] for start in range(0, len(grouped), global_batch_size)]
    rng.shuffle(batches)
    return batches


Piece = list[list[int]]  # a micro-batch: its rows, each row the record indices laid end to end in it


def row_tokens(max_length: int, pack_tokens: int) -> int:
    """Tokens in one row of a micro-batch, at most: packed (pack_tokens > 0) the packing
    budget, padded the longest record (max_length)."""
    return pack_tokens or max_length


def split_global_batch(global_batch: Sequence[int], lengths: Sequence[int], micro_batch_size: int,
                       pack_tokens: int = 0) -> list[Piece]:
    """The micro-batches ("pieces") of one global batch, the same at every world size; each
    piece has at most micro_batch_size rows.

    Padded (pack_tokens 0): one record per row, consecutive runs of micro_batch_size records
    (the last piece may be shorter). Packed: the records are binned into rows of at most
    pack_tokens tokens (`pack_by_tokens`), and consecutive runs of micro_batch_size rows make
    the pieces. A packed row is never longer than pack_tokens, so attention over it (which
    sdpa computes over the whole row, masked) costs no more than over one such record.
    """
    if micro_batch_size < 1 or pack_tokens < 0:
        raise ValueError(f"bad micro_batch_size={micro_batch_size}, pack_tokens={pack_tokens}")
    if not global_batch:
        raise ValueError("empty global batch")
    rows = pack_by_tokens(global_batch, lengths, pack_tokens) if pack_tokens else [[i] for i in global_batch]
    return [rows[start:start + micro_batch_size] for start in range(0, len(rows), micro_batch_size)]


def pack_by_tokens(indices: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: longest record first, each into the first pack with room for it.
    Deterministic (a stable sort, then a fixed scan); every index lands in exactly one pack."""
    packs: list[list[int]] = []
    room: list[int] = []
    for index in sorted(indices, key=lambda i: -lengths[i]):
        n = lengths[index]
        if n > budget:
            raise ValueError(f"record {index} has {n} tokens, more than the packing budget of {budget}")
        slot = next((p for p, free in enumerate(room) if n <= free), None)
        if slot is None:
            packs.append([])
            room.append(budget)
            slot = len(packs) - 1
        packs[slot].append(index)
        room[slot] -= n
    return packs


def pieces_for_rank(pieces: Sequence[Piece], world_size: int, rank: int) -> list[tuple[int, Piece]]:
    """(piece number, piece) for each micro-step of `rank`: pieces rank, rank + W, ...

    Every rank gets ceil(len(pieces) / W) micro-steps, so ZeRO-3's collectives match; a rank
    past the last piece gets an empty one (the trainer runs it as a zero-weight forward).
    Piece k holds the same records at any world size, and seeds its randomness from k.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad world_size={world_size}, rank={rank}")
    steps = math.ceil(len(pieces) / world_size)
    numbers = [step * world_size + rank for step in range(steps)]
    return [(k, pieces[k] if k < len(pieces) else []) for k in numbers]


def collate(records: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad records into input_ids, labels (padded with -100) and attention_mask tensors."""
    if not records:
        raise ValueError("cannot collate an empty micro-batch")
    width = max(len(record["input_ids"]) for record in records)
    batch = {
        "input_ids": torch.full((len(records), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(records), width), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(records), width), dtype=torch.long),
    }
    for row, record in enumerate(records):
        n = len(record["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(record["input_ids"])
        batch["labels"][row, :n] = torch.as_tensor(record["labels"])
        batch["attention_mask"][row, :n] = 1
    return batch


def collate_packed(rows: Sequence[Sequence[dict]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of records laid end to end: input_ids, labels, position_ids for the model (no
    attention_mask: with one, transformers would not look for packed rows), and real_tokens
    (False for padding), all [rows, width].

    position_ids restart at 0 for every record, which is what makes transformers' attention
    block-causal (no token sees another record). Each record's first label is masked: in the
    row it would be the target of the previous record's last token, and unpacked it is never
    a target (`num_label_tokens` counts labels[1:]). A row shorter than the widest is filled
    with pad tokens that form a sequence of their own (positions from 0, no labels), after
    every real token, so no real token sees them.
    """
    if not rows or not all(rows):
        raise ValueError("cannot collate an empty micro-batch or an empty row")
    width = max(sum(len(record["input_ids"]) for record in row) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "real_tokens": torch.zeros((len(rows), width), dtype=torch.bool),
    }
    for r, row in enumerate(rows):
        start = 0
        for record in row:
            n = len(record["input_ids"])
            batch["input_ids"][r, start:start + n] = torch.as_tensor(record["input_ids"])
            batch["labels"][r, start + 1:start + n] = torch.as_tensor(record["labels"][1:], dtype=torch.long)
            batch["position_ids"][r, start:start + n] = torch.arange(n)
            start += n
        batch["real_tokens"][r, :start] = True
        batch["position_ids"][r, start:] = torch.arange(width - start)
    return batch
