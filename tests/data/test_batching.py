"""Micro-batches: world-size independent pieces, token-budget packing, packed == padded."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medcare_dist.data.batching import collate, collate_packed, pack_by_tokens, pieces_for_rank, split_global_batch
from medcare_dist.training.lm_loss import model_lm_loss_sum
from medcare_dist.training.trainer import packing_is_exact
from helpers import adapter_grads, assert_same_loss_and_gradients, stage1_model


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 60), world_size=st.integers(1, 8), micro_batch_size=st.integers(1, 6),
       pack=st.booleans(), seed=st.integers(0, 1000))
def test_pieces_do_not_depend_on_the_world_size_and_every_rank_runs_as_many(size, world_size, micro_batch_size, pack, seed):
    lengths = [(i * 7919 + seed) % 50 + 1 for i in range(200)]
    global_batch = [(3 * i + seed) % 200 for i in range(size)]
    global_batch = list(dict.fromkeys(global_batch))
    pieces = split_global_batch(global_batch, lengths, micro_batch_size, 64 if pack else 0)
    flat = [i for piece in pieces for row in piece for i in row]
    assert sorted(flat) == sorted(global_batch)  # complete, no duplicates
    assert all(piece and len(piece) <= micro_batch_size and all(piece) for piece in pieces)
    if pack:
        assert all(sum(lengths[i] for i in row) <= 64 for piece in pieces for row in piece)
    else:
        assert flat == global_batch and all(len(row) == 1 for piece in pieces for row in piece)
    per_rank = [pieces_for_rank(pieces, world_size, r) for r in range(world_size)]
    steps = math.ceil(len(pieces) / world_size)
    assert all(len(micro) == steps for micro in per_rank)
    by_number = {k: indices for micro in per_rank for k, indices in micro}
    assert [by_number[k] for k in range(len(pieces))] == pieces  # piece k is the same piece at every world size
    assert all(not by_number[k] for k in range(len(pieces), steps * world_size))  # the rest are empty


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=80), budget=st.integers(100, 400))
def test_packs_stay_within_the_budget_and_hold_every_record_once(lengths, budget):
    indices = list(range(len(lengths)))
    packs = pack_by_tokens(indices, lengths, budget)
    assert packs == pack_by_tokens(indices, lengths, budget)
    assert sorted(i for pack in packs for i in pack) == indices
    assert all(sum(lengths[i] for i in pack) <= budget for pack in packs)
    assert sum(2 * sum(lengths[i] for i in pack) <= budget for pack in packs) <= 1  # first fit: at most one half-empty pack


def test_a_record_longer_than_the_budget_is_an_error_naming_it():
    with pytest.raises(ValueError, match="record 1 has 30 tokens, more than the packing budget of 20"):
        pack_by_tokens([0, 1], [5, 30], 20)


def test_collate_packed_restarts_positions_masks_each_first_label_and_pads_rows_apart():
    first, second = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}
    third = {"input_ids": [3, 4], "labels": [3, 4]}
    batch = collate_packed([[first, second], [third]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]  # the padding is a sequence of its own
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    assert batch["real_tokens"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert "attention_mask" not in batch


def records_of_varied_length(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        prompt = n // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_packed_loss_and_every_adapter_gradient_equal_the_padded_ones(tiny_model_dir):
    model, adapters = stage1_model(tiny_model_dir, grad_checkpointing=False)
    adapters.eval()  # dropout masks depend on the tensor layout; exactness is about everything else
    records = records_of_varied_length(model.config.vocab_size, [23, 5, 17, 9, 2, 30])
    rows = [records[:4], records[4:]]  # 54 and 32 tokens: the second row is padded
    results = []
    for batch in (collate(records, pad_token_id=0), collate_packed(rows, pad_token_id=0)):
        adapters.zero_grad(set_to_none=True)
        labels = batch.pop("labels")
        batch.pop("real_tokens", None)
        loss = model_lm_loss_sum(model, batch, labels)
        loss.backward()
        results.append((loss.detach(), adapter_grads(adapters)))
    assert_same_loss_and_gradients(results, adapters, loss_rtol=1e-5, grad_rtol=1e-4)


class _DropsPositionIds(torch.nn.Module):
    """A causal LM whose forward ignores position_ids: packed records would see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None):
        return self.inner(input_ids=input_ids)


def test_the_packing_probe_accepts_sdpa_and_rejects_a_model_that_ignores_positions(tiny_model_dir):
    model, adapters = stage1_model(tiny_model_dir, grad_checkpointing=False)
    assert model.config._attn_implementation == "sdpa"
    assert packing_is_exact(model, adapters)
    assert model.training and adapters.training  # restored after the probe
    assert not packing_is_exact(_DropsPositionIds(model), adapters)
