"""Model assembly in one process (no DeepSpeed): stage-1 adapters on the tiny Qwen2."""

import torch

from medcare_dist.config import TrainConfig
from medcare_dist.adapters.adapter_set import linear_targets
from medcare_dist.artefacts.hf_model import load_frozen_base
from medcare_dist.training.zero3 import enable_activation_checkpointing
from medcare_dist.method.stage1 import stage1_adapters
from medcare_dist.training.lm_loss import causal_lm_loss_sum

from helpers import stage1_model


def test_adapters_target_every_projection_and_base_is_frozen(tiny_model_dir):
    model, adapters = stage1_model(tiny_model_dir, grad_checkpointing=False)
    n_layers = model.config.num_hidden_layers
    groups = {}
    for group, target, _ in adapters.items():
        groups.setdefault(group, []).append(target)
    assert len(groups["attn_lora"]) == 4 * n_layers
    assert len(groups["molora"]) == 3 * n_layers
    assert all(not p.requires_grad for p in model.parameters())
    assert len(linear_targets(model, ["gate_proj"])) == n_layers


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    input_ids = torch.randint(0, 200, (2, 24))
    labels = input_ids.clone()
    labels[:, :6] = -100
    grads = []
    for ckpt in (False, True):
        model, adapters = stage1_model(tiny_model_dir, grad_checkpointing=ckpt)
        torch.manual_seed(123)  # same dropout masks in both runs
        logits = model(input_ids=input_ids).logits
        causal_lm_loss_sum(logits, labels).backward()
        grads.append({n: p.grad.clone() for n, p in adapters.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert sum(g.abs().sum() for g in grads[0].values()) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
