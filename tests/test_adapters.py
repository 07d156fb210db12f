"""The adapter layers against plain per-expert reference computations written here."""

import pytest
import torch
import torch.nn.functional as F

from medcare_dist.adapter_set import AdapterSet
from medcare_dist.adapters import LoRA, MoLoRA, load_balancing_loss


def make_molora(seed=0, d_in=12, d_out=10, rank=3, shared_rank=6, num_experts=5, top_k=2):
    torch.manual_seed(seed)
    layer = MoLoRA(d_in, d_out, rank, shared_rank, num_experts, top_k, scale=2.0, dropout=0.0)
    with torch.no_grad():  # B starts at zero; give it values so the test sees every expert
        layer.ka_B.normal_()
        layer.na_B.normal_()
    return layer


def reference_molora(layer: MoLoRA, x: torch.Tensor) -> torch.Tensor:
    """The textbook formula, one token and one expert at a time."""
    r = layer.rank
    out = []
    for token in x:
        y = layer.scale * (layer.ka_B @ (layer.ka_A @ token))
        probs = torch.softmax(layer.router(token), dim=-1)
        top = sorted(range(layer.num_experts), key=lambda e: -float(probs[e].detach()))[: layer.top_k]
        norm = sum(probs[e] for e in top)
        for e in top:
            A = layer.na_A[e * r:(e + 1) * r]
            B = layer.na_B[:, e * r:(e + 1) * r]
            y = y + layer.scale * (probs[e] / norm) * (B @ (A @ token))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_molora_equals_per_expert_loop_outputs_and_gradients(top_k):
    layer = make_molora(top_k=top_k)
    x = torch.randn(2, 7, 12, requires_grad=True)
    fast = layer(x)
    assert fast.shape == (2, 7, 10)
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), [x, *layer.parameters()])

    ref = reference_molora(layer, x.reshape(-1, 12)).reshape(2, 7, 10)
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), [x, *layer.parameters()])

    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for name, g_fast, g_ref in zip(["x"] + [n for n, _ in layer.named_parameters()], grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_shared_expert_has_weight_one_and_routed_weights_renormalise():
    layer = make_molora(top_k=2)
    x = torch.randn(9, 12)
    with torch.no_grad():
        layer.na_B.zero_()  # only the Knowledge Aggregator contributes
        ka_only = layer(x)
        torch.testing.assert_close(ka_only, 2.0 * x @ layer.ka_A.T @ layer.ka_B.T)
        gates, routing = layer.route(x)
    torch.testing.assert_close(gates.sum(-1), torch.ones(9))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.equal(gates.topk(2).indices.sort().values, routing.top_idx.sort().values)


def test_unselected_expert_gets_zero_gradient_not_none():
    layer = make_molora(num_experts=4, top_k=1)
    with torch.no_grad():  # force every token to expert 0
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([10.0, 0, 0, 0]))
    layer(torch.randn(5, 12)).sum().backward()
    r = layer.rank
    assert layer.na_A.grad[:r].abs().sum() > 0
    assert torch.count_nonzero(layer.na_A.grad[r:]) == 0


def test_lora_delta_and_merge_agree():
    torch.manual_seed(0)
    lora = LoRA(8, 6, rank=2, scale=2.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 8)
    torch.testing.assert_close(lora(x), x @ lora.delta_weight().T)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    from medcare_dist.adapters import Routing

    uniform = Routing(probs=torch.full((8, 4), 0.25), top_idx=torch.arange(8).remainder(4).unsqueeze(-1))
    assert float(load_balancing_loss(uniform, 4, None)) == pytest.approx(1.0)
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    collapsed = Routing(probs=probs, top_idx=torch.zeros(8, 1, dtype=torch.long))
    assert float(load_balancing_loss(collapsed, 4, None)) > 3.5


def test_adapter_set_hooks_add_deltas_without_owning_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    adapters = AdapterSet()
    lora = LoRA(8, 4, rank=2, scale=1.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    adapters.add("attn_lora", "2", lora)
    x = torch.randn(3, 8)
    before = model(x)
    adapters.attach(model)
    after = model(x)
    hidden = model[1](model[0](x))
    torch.testing.assert_close(after, before + lora(hidden))
    assert not any(p is lora.lora_A for p in model.parameters())  # DeepSpeed never sees it
    state = adapters.flat_state_dict()
    assert set(state) == {"attn_lora.2.lora_A", "attn_lora.2.lora_B"}
    adapters.detach()
    torch.testing.assert_close(model(x), before)
    with pytest.raises(KeyError, match="missing"):
        adapters.load_flat_state_dict({})
