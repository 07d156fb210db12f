"""bf16 adapter matmuls with fp32 master weights track the fp32 run (CPU bf16)."""

import pytest
import torch
from transformers import AutoTokenizer

from helpers import SAMPLE
from medcare_dist.adapters.adapter_set import adapter_compute_dtype
from medcare_dist.config import TrainConfig
from medcare_dist.data.batching import collate
from medcare_dist.data.dataset import build_dataset
from medcare_dist.training.lm_loss import model_lm_loss_sum
from medcare_dist.artefacts.hf_model import load_frozen_base
from medcare_dist.method.stage1 import stage1_adapters

STEPS = 8
TOLERANCE = 0.01  # relative, per step: stated in docs/benchmarks.md


def short_run(model_dir, batch, compute_dtype):
    cfg = TrainConfig(model=str(model_dir), data=["x"], num_experts=4, top_k=2, lora_r=4, lora_dropout=0.0)
    model = load_frozen_base(str(model_dir), None, torch.float32)
    torch.manual_seed(0)
    adapters = stage1_adapters(model, cfg)
    adapters.attach(model, compute_dtype)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=5e-3)
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    n_labels = int((labels[:, 1:] != -100).sum())
    losses = []
    for _ in range(STEPS):
        loss = model_lm_loss_sum(model, inputs, labels) / n_labels
        loss.backward()
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in adapters.parameters())  # fp32 masters and grads
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())  # fp32 optimizer state
    return losses


def test_bf16_adapter_compute_tracks_the_fp32_run(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    dataset, _ = build_dataset(SAMPLE / "stage1.jsonl", tokenizer, max_length=96)
    batch = collate([dataset[i] for i in range(8)], tokenizer.pad_token_id)
    fp32 = short_run(tiny_model_dir, batch, torch.float32)
    bf16 = short_run(tiny_model_dir, batch, torch.bfloat16)
    assert fp32[-1] < fp32[0] - 0.05, f"the fp32 run did not learn: {fp32}"
    for step, (want, got) in enumerate(zip(fp32, bf16)):
        assert abs(got - want) <= TOLERANCE * want, f"step {step}: bf16 loss {got:.4f} vs fp32 {want:.4f}"
    assert bf16 != fp32  # the bf16 run did compute in bf16


def test_the_bf16_hook_keeps_activations_in_bf16_and_weights_fp32(tiny_model_dir):
    cfg = TrainConfig(model=str(tiny_model_dir), data=["x"], num_experts=4, top_k=2, lora_r=4)
    model = load_frozen_base(str(tiny_model_dir), None, torch.bfloat16)
    adapters = stage1_adapters(model, cfg)
    seen = []
    for _, _, adapter in adapters.items():
        adapter.register_forward_hook(lambda _m, args, out: seen.append((args[0].dtype, out.dtype)))
    adapters.attach(model, adapter_compute_dtype("auto", torch.bfloat16))
    model(input_ids=torch.randint(0, 100, (1, 8)))
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert all(p.dtype == torch.float32 for p in adapters.parameters())


@pytest.mark.parametrize("name, base, want", [("auto", torch.bfloat16, torch.bfloat16), ("auto", torch.float32, torch.float32),
                                              ("auto", torch.float16, torch.float32), ("bf16", torch.float32, torch.bfloat16),
                                              ("fp32", torch.bfloat16, torch.float32)])
def test_adapter_dtype_option(name, base, want):
    assert adapter_compute_dtype(name, base) == want
