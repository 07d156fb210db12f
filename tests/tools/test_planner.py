"""`medcare-dist plan`: parameter counts against real models, the activation estimate against
autograd, the model-state figures against DeepSpeed's own ZeRO-3 estimator, and the fit
decision on the three built-in Qwen1.5 shapes. All arithmetic or tiny models: fast, CPU."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medcare_dist.cli import add_plan_parser
from medcare_dist.resources import read_ds_config
from medcare_dist.tools.memory_model import (
    BUILTIN,
    AdapterLayout,
    ModelShape,
    StepOptions,
    activation_bytes_per_layer_fixed,
    activation_bytes_per_token_layer,
    base_counts,
    load_shape,
)
from medcare_dist.tools.planner import GiB, ZERO3, ZERO3_NODE_LOCAL, ZERO3_OFFLOAD, plan

SHAPES = list(BUILTIN.values())


def qwen2_config(shape: ModelShape):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        tie_word_embeddings=shape.tie_word_embeddings,
    )


def small_qwen2(shape: ModelShape, dtype=torch.float32):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config(shape)).to(dtype)
    model.requires_grad_(False)
    return model


SMALL = ModelShape("small", hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, vocab=1000)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_base_counts_equal_the_hf_model_and_deepspeeds_largest_layer(shape):
    """The planner counts params from shapes alone; the real Qwen2ForCausalLM, built on the
    meta device (no memory), must have exactly that many, and DeepSpeed's `model_to_params`
    must find the same largest layer. (Its total de-duplicates by data_ptr, which is 0 for
    every meta tensor, so the total is summed here over the distinct parameters.)"""
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen2_config(shape))
    counts = base_counts(shape)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["largest_module"] == model_to_params(model)[1]


def test_adapter_counts_equal_the_adapters_the_recipes_build():
    from medcare_dist.config import TrainConfig
    from medcare_dist.method.stage1 import split_for_stage2, stage1_adapters
    from medcare_dist.method.stage2 import Knowledge, stage2_adapters

    model = small_qwen2(SMALL)
    cfg = TrainConfig()
    s1 = stage1_adapters(model, cfg)
    assert sum(p.numel() for p in s1.parameters()) == AdapterLayout(stage=1).counts(SMALL)["total"]

    # stage 2 starts from the Knowledge Aggregator that prepare-stage2 keeps
    _, kept = split_for_stage2(s1.flat_state_dict())
    knowledge = Knowledge(pairs=kept, rank=cfg.lora_r * cfg.num_shared, scale=2.0)
    for freeze, align in [(False, False), (True, False), (False, True)]:
        cfg2 = TrainConfig(stage=2, freeze_knowledge=freeze, align_attention=align)
        s2 = stage2_adapters(model, cfg2, knowledge)
        want = AdapterLayout(stage=2, freeze_knowledge=freeze, align_attention=align).counts(SMALL)
        assert sum(p.numel() for p in s2.parameters() if p.requires_grad) == want["trainable"]
        assert sum(p.numel() for p in s2.parameters()) == want["total"]


def _saved_bytes(layers: int, dropout: float, routed_compute: str, adapter_dtype: torch.dtype,
                 lm_loss: str = "chunked") -> int:
    """Bytes of the tensors autograd keeps in one training forward of a small bf16 Qwen2 with
    the real stage-1 adapters attached, their matmuls in `adapter_dtype`, through the
    trainer's own loss (parameters and buffers excluded)."""
    from dataclasses import replace

    from medcare_dist.config import TrainConfig
    from medcare_dist.method.stage1 import stage1_adapters
    from medcare_dist.training.lm_loss import model_lm_loss_sum

    model = small_qwen2(replace(SMALL, layers=layers), torch.bfloat16)
    adapters = stage1_adapters(model, TrainConfig(lora_dropout=dropout))
    for _, _, adapter in adapters.items("molora"):
        adapter.routed_compute = routed_compute
    adapters.attach(model, adapter_dtype)
    model.train()
    adapters.train()
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *adapters.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, SMALL.vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model_lm_loss_sum(model, {"input_ids": ids}, ids, lm_loss, chunk_tokens=32)
    loss.backward()
    return sum(seen.values())


ADAPTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _combinations():
    """(dropout, routed_compute, adapter_dtype) to measure: every one for dense and sparse;
    fused (its Triton kernels under the CPU interpreter take over a minute per model) once, in
    the combination that exercises the most terms: weight casts, dropout copies and masks."""
    for dropout in (0.0, 0.05):
        for routed in ("dense", "sparse"):
            for adapter_dtype in ADAPTER_DTYPES:
                yield dropout, routed, adapter_dtype
    no_triton = importlib.util.find_spec("triton") is None
    yield pytest.param(0.05, "fused", "bf16", marks=pytest.mark.skipif(no_triton, reason="routed_compute fused needs Triton"))


@pytest.mark.parametrize("dropout,routed_compute,adapter_dtype", list(_combinations()))
def test_activation_estimate_per_layer_matches_what_autograd_saves(dropout, routed_compute, adapter_dtype):
    """One decoder layer's share = saved bytes with 3 layers - with 2 layers (the embedding,
    final norm and loss cancel out), for each adapter matmul dtype on a bf16 base: bf16
    adapters read the base Linear's own input, fp32 ones a cast copy per Linear. CPU's
    dropout keeps a noise tensor where the GPU keeps a bool mask (cpu_dropout)."""
    dtype = ADAPTER_DTYPES[adapter_dtype]
    measured = _saved_bytes(3, dropout, routed_compute, dtype) - _saved_bytes(2, dropout, routed_compute, dtype)
    layout = AdapterLayout(stage=1, lora_dropout=dropout, routed_compute=routed_compute)
    a = StepOptions(adapter_dtype=adapter_dtype).adapter_bytes(2)
    estimate = activation_bytes_per_token_layer(SMALL, layout, 2, a, cpu_dropout=True) * 2 * 64
    estimate += activation_bytes_per_layer_fixed(SMALL, layout, a)
    assert estimate == pytest.approx(measured, rel=0.02)


def test_loss_estimate_matches_what_the_trainers_losses_keep():
    """The same model and batch through the trainer's two losses: what the full loss keeps
    beyond the chunked one (its [tokens, vocab] fp32 log-softmax in place of the hidden rows'
    gradient) is the difference of loss_working_bytes's `kept` figures; and the chunked loss
    on its own keeps exactly its figure."""
    from medcare_dist.training.lm_loss import ChunkedLinearCrossEntropy, loss_working_bytes

    labelled = 2 * 63  # every position but the last of each row predicts a label
    kept = {impl: loss_working_bytes(impl, labelled, SMALL.vocab, SMALL.hidden, 2, 32)["kept"] for impl in ("full", "chunked")}
    full, chunked = (_saved_bytes(2, 0.0, "dense", torch.bfloat16, impl) for impl in ("full", "chunked"))
    assert full - chunked == pytest.approx(kept["full"] - kept["chunked"], rel=0.01)

    hidden = torch.randn(labelled, SMALL.hidden, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(SMALL.vocab, SMALL.hidden, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t, lambda t: t):
        ChunkedLinearCrossEntropy.apply(hidden, weight, torch.randint(0, SMALL.vocab, (labelled,)), 32)
    assert sum(saved) == kept["chunked"]


def test_plan_counts_one_loss_chunk_for_14b_stage1_on_2x8():
    """Issue 20's case: Qwen1.5-14B, stage 1, 2 x 8 GPUs, micro-batch 4 x 3072, checkpointing.
    The chunked loss (the default) holds one [chunk, vocab] block and the hidden rows'
    gradient, under 2 GiB; --lm_loss full counts the full logits (24 GiB)."""
    kw = dict(stage=1, nodes=2, gpus_per_node=8, micro_batch=4, seq_len=3072, grad_ckpt=True, gpu_memory_gib=141)
    chunked = plan("Qwen1.5-14B", **kw)
    full = plan("Qwen1.5-14B", **kw, step=StepOptions(lm_loss="full"))
    assert chunked.gpu_bytes["activations_loss"] < 2 * GiB
    assert full.gpu_bytes["activations_loss"] == 14 * 152064 * 4 * 3072
    assert full.peak_bytes - chunked.peak_bytes == full.gpu_bytes["activations_loss"] - chunked.gpu_bytes["activations_loss"]
    # bf16 adapter matmuls (auto with a bf16 base) keep fewer activation bytes than fp32 ones
    fp32 = plan("Qwen1.5-14B", **kw, step=StepOptions(adapter_dtype="fp32"))
    assert chunked.gpu_bytes["activations_layers"] < fp32.gpu_bytes["activations_layers"]
    # packing: rows of pack_tokens tokens
    packed = plan("Qwen1.5-14B", **kw, step=StepOptions(packing="on", pack_tokens=4096))
    assert packed.tokens_per_micro_batch == 4 * 4096
    assert plan("Qwen1.5-14B", **kw, step=StepOptions(packing="off", pack_tokens=4096)).tokens_per_micro_batch == 4 * 3072


def _ds_estimate(**kw):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return estimate_zero3_model_states_mem_needs(**kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
def test_model_states_agree_with_deepspeeds_zero3_estimator(shape, nodes, gpus):
    """What is compared with DeepSpeed's pure-arithmetic estimator, and why:

    - Base shard. DeepSpeed's estimator is for training every param with mixed-precision
      Adam; with the optimizer offloaded to CPU (cpu_offload=True, cpu_offload_params=False)
      its GPU figure is `4 x largest_layer + 2 x params / GPUs`: the second term is the bf16
      params shard, the only state a frozen param has. Our base shard must equal it.
    - Largest layer. DeepSpeed reserves 4 bytes per param of the largest layer (its bf16
      param and bf16 gradient, gathered); a frozen layer has no gradient, so our gathered
      module is half of that.
    - Params offloaded (cpu_offload_params=True): DeepSpeed's GPU figure is the largest
      layer alone, no shard; ours has no base shard either.
    - Adapters. They are trained in fp32 outside DeepSpeed, unsharded: fp32 param, fp32 grad,
      Adam m and v = 16 bytes per param. DeepSpeed's CPU-offloaded optimizer holds exactly
      these four per param (cpu_mem = 16 x params on one GPU with zero_init and no buffer
      factor), so our adapter states must equal it for the adapter param count.
    """
    world = nodes * gpus
    result = plan(shape.name, stage=1, nodes=nodes, gpus_per_node=gpus, gpu_memory_gib=1e6, ds_config=ZERO3)
    total, largest = result.params["total"], result.params["largest_module"]
    common = dict(total_params=total, largest_layer_params=largest, num_gpus_per_node=gpus, num_nodes=nodes)

    _, gpu_mem, largest_mem = _ds_estimate(**common, cpu_offload=True, cpu_offload_params=False)
    assert result.gpu_bytes["base_shard"] == gpu_mem - largest_mem == 2 * total // world
    assert 2 * largest == largest_mem // 2  # our gathered module (bf16, no grad) vs DeepSpeed's 4 bytes/param

    offloaded = plan(shape.name, stage=1, nodes=nodes, gpus_per_node=gpus, gpu_memory_gib=1e6, ds_config=ZERO3_OFFLOAD)
    _, gpu_mem_off, largest_mem_off = _ds_estimate(**common, cpu_offload=True, cpu_offload_params=True)
    assert offloaded.gpu_bytes["base_shard"] == 0 and gpu_mem_off == largest_mem_off
    assert offloaded.cpu_bytes_per_node == 2 * total // world * gpus  # the shards of this node's ranks

    n_adapters = result.adapter_params["trainable"]
    cpu_mem, _, _ = _ds_estimate(
        total_params=n_adapters, largest_layer_params=0, num_gpus_per_node=1, num_nodes=1,
        cpu_offload=True, cpu_offload_params=False, zero_init=True, additional_buffer_factor=1.0,
    )
    g = result.gpu_bytes
    assert g["adapters"] + g["adapter_grads"] + g["optimizer"] == cpu_mem


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_plan_on_builtin_shapes_is_sane_and_fit_flips_with_gpu_memory(shape):
    p = plan(shape.name, stage=1, nodes=1, gpus_per_node=8, gpu_memory_gib=1e6, micro_batch=1, seq_len=2048)
    g = p.gpu_bytes
    n = shape.hidden
    assert 1.5e9 < p.params["total"] < 16e9
    # stage-1 adapters are a few percent of the base (MedCare: E=8 experts of rank 16 on 3 FFN projections)
    assert 0.01 < p.adapter_params["total"] / p.params["total"] < 0.1
    assert all(v >= 0 for v in g.values())
    assert g["peak"] == sum(v for k, v in g.items() if k != "peak")  # the all-reduce buffer is below activations here
    assert g["optimizer"] == 2 * g["adapter_grads"] == 2 * g["adapters"]
    assert g["activations_loss"] == 2 * 2048 * n + 6 * 1024 * shape.vocab  # chunked: hidden-row gradient, one chunk
    assert g["gathered"] >= 2 * shape.vocab * n  # at least the embedding / LM head, gathered

    # fits / does not fit flips exactly at the peak
    peak_gib = g["peak"] / GiB
    assert plan(shape.name, gpu_memory_gib=peak_gib, micro_batch=1, seq_len=2048, ds_config=ZERO3).fits
    assert not plan(shape.name, gpu_memory_gib=peak_gib * 0.99, micro_batch=1, seq_len=2048, ds_config=ZERO3).fits

    # more ranks: smaller shard; checkpointing: fewer activations; stage 2 has fewer adapters
    wide = plan(shape.name, nodes=4, gpus_per_node=8, gpu_memory_gib=1e6, micro_batch=1, seq_len=2048)
    assert wide.gpu_bytes["base_shard"] * 4 == pytest.approx(g["base_shard"], rel=1e-6)
    ckpt = plan(shape.name, gpu_memory_gib=1e6, micro_batch=1, seq_len=2048, grad_ckpt=True)
    assert ckpt.gpu_bytes["activations_layers"] < g["activations_layers"] / 5
    s2 = plan(shape.name, stage=2, gpu_memory_gib=1e6, micro_batch=1, seq_len=2048)
    assert s2.adapter_params["total"] < p.adapter_params["total"]


def test_config_choice_flips_from_zero3_to_offload_to_no_fit():
    """14B on 2 GPUs, stage 1, sequence 3072, checkpointing: the base shard (13 GiB) decides."""
    kw = dict(stage=1, nodes=1, gpus_per_node=2, micro_batch=1, seq_len=3072, grad_ckpt=True)
    big = plan("Qwen1.5-14B", gpu_memory_gib=80, **kw)
    assert big.fits and big.ds_config == ZERO3
    offload_only = plan("Qwen1.5-14B", gpu_memory_gib=(big.peak_bytes - big.gpu_bytes["base_shard"] + GiB) / GiB, **kw)
    assert offload_only.fits and offload_only.ds_config == ZERO3_OFFLOAD and offload_only.gpu_bytes["base_shard"] == 0
    assert offload_only.cpu_bytes_per_node == 2 * offload_only.params["total"] // 2 * 2
    none = plan("Qwen1.5-14B", gpu_memory_gib=8, **kw)
    assert not none.fits and "does not fit" in none.notes[0]


def test_config_json_alone_and_builtin_names(tmp_path):
    cfg = qwen2_config(BUILTIN["qwen1.5-7b"]).to_dict()
    cfg["model_type"] = "qwen2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from_dir, from_file = load_shape(str(tmp_path)), load_shape(str(tmp_path / "config.json"))
    for shape in (from_dir, from_file):
        assert base_counts(shape) == base_counts(BUILTIN["qwen1.5-7b"])
    for name in ["Qwen1.5-7B", "Qwen/Qwen1.5-7B-Chat", "7b", "qwen1.5-7b"]:
        assert load_shape(name) is BUILTIN["qwen1.5-7b"]
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_shape("Qwen/NoSuchModel")


def test_cli_parser_prints_the_breakdown_and_json(capsys):
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model", "Qwen1.5-1.8B", "--stage", "1", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "24", "--grad_checkpointing"])
    args.run(args)
    out = capsys.readouterr().out
    for word in ["base shard", "adapters", "AdamW", "activations", "gathered", "peak per GPU", "fits", ZERO3]:
        assert word in out
    args = parser.parse_args(["plan", "--model", "14B", "--gpu-memory", "16", "--gpus-per-node", "2", "--max_length", "3072", "--micro_batch_size", "1", "--json"])
    args.run(args)
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["gpu_bytes"]["peak"] > 16 * GiB


def test_offload_config_is_zero3_plus_param_offload_only():
    zero3, offload = read_ds_config(ZERO3), read_ds_config(ZERO3_OFFLOAD)
    z, zo = zero3["zero_optimization"], offload["zero_optimization"]
    assert {k: v for k, v in offload.items() if k != "zero_optimization"} == {k: v for k, v in zero3.items() if k != "zero_optimization"}
    assert {k: v for k, v in zo.items() if k != "offload_param"} == z
    assert zo["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "offload_optimizer" not in zo  # the adapters' optimizer is not DeepSpeed's: nothing to offload


def test_several_nodes_choose_node_local_sharding_and_pay_its_node_shard():
    one = plan("Qwen1.5-7B", nodes=1, gpus_per_node=8, gpu_memory_gib=80, micro_batch=1, seq_len=2048, grad_ckpt=True)
    two = plan("Qwen1.5-7B", nodes=2, gpus_per_node=8, gpu_memory_gib=80, micro_batch=1, seq_len=2048, grad_ckpt=True)
    assert one.ds_config == ZERO3 and one.gpu_bytes["base_node_shard"] == 0
    assert two.ds_config == ZERO3_NODE_LOCAL and "node-local" in two.notes[0]
    assert two.gpu_bytes["base_node_shard"] == 2 * two.params["total"] // 8  # bf16, over the 8 ranks of a node
    assert two.gpu_bytes["base_shard"] == 2 * two.params["total"] // 16
    # When the node shard does not fit, plain ZeRO-3 is chosen and says why.
    tight = (two.peak_bytes - two.gpu_bytes["base_node_shard"] // 2) / GiB
    fallback = plan("Qwen1.5-7B", nodes=2, gpus_per_node=8, gpu_memory_gib=tight, micro_batch=1, seq_len=2048, grad_ckpt=True)
    assert fallback.fits and fallback.ds_config == ZERO3 and ZERO3_NODE_LOCAL in fallback.notes[0]
