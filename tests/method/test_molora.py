"""The adapter layers against plain per-expert reference computations written here."""

import pytest
import torch

from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.adapters.lora import LoRA
from medcare_dist.method.molora import MoLoRA, load_balancing_loss


ROUTED = ["sparse", "dense"]


def make_molora(seed=0, d_in=12, d_out=10, rank=3, shared_rank=6, num_experts=5, top_k=2, routed_compute="sparse"):
    torch.manual_seed(seed)
    layer = MoLoRA(d_in, d_out, rank, shared_rank, num_experts, top_k, scale=2.0, dropout=0.0, routed_compute=routed_compute)
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


@pytest.mark.parametrize("routed_compute", ROUTED)
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_molora_equals_per_expert_loop_outputs_and_gradients(top_k, routed_compute):
    layer = make_molora(top_k=top_k, routed_compute=routed_compute)
    x = torch.randn(2, 7, 12, requires_grad=True)
    fast = layer(x)
    assert fast.shape == (2, 7, 10)
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), [x, *layer.parameters()])

    ref = reference_molora(layer, x.reshape(-1, 12)).reshape(2, 7, 10)
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), [x, *layer.parameters()])

    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for name, g_fast, g_ref in zip(["x"] + [n for n, _ in layer.named_parameters()], grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("routed_compute", ROUTED)
def test_shared_expert_has_weight_one_and_routed_weights_renormalise(routed_compute):
    layer = make_molora(top_k=2, routed_compute=routed_compute)
    x = torch.randn(9, 12)
    with torch.no_grad():
        layer.na_B.zero_()  # only the Knowledge Aggregator contributes
        ka_only = layer(x)
        torch.testing.assert_close(ka_only, 2.0 * x @ layer.ka_A.T @ layer.ka_B.T)
        gates, routing = layer.route(x)
    torch.testing.assert_close(gates.sum(-1), torch.ones(9))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.equal(gates.topk(2).indices.sort().values, routing.top_idx.sort().values)


@pytest.mark.parametrize("routed_compute", ROUTED)
def test_unselected_expert_gets_zero_gradient_not_none(routed_compute):
    layer = make_molora(num_experts=4, top_k=1, routed_compute=routed_compute)
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
    from medcare_dist.method.molora import Routing

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


# --- the sparse routed path against the dense one -------------------------------------------


def grads_of(layer, x, out):
    return torch.autograd.grad(out.pow(2).sum(), [x, *layer.parameters()], allow_unused=False)


@pytest.mark.parametrize("num_experts,top_k,tokens", [(8, 2, 64), (5, 3, 17), (4, 4, 9), (8, 1, 33)])
def test_sparse_equals_dense_outputs_gradients_and_routing(num_experts, top_k, tokens):
    sparse = make_molora(d_in=24, d_out=20, rank=4, shared_rank=8, num_experts=num_experts, top_k=top_k)
    dense = make_molora(d_in=24, d_out=20, rank=4, shared_rank=8, num_experts=num_experts, top_k=top_k, routed_compute="dense")
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(tokens, 24, dtype=torch.float64, requires_grad=True)
    sparse.double(), dense.double()
    out_s, out_d = sparse(x), dense(x)
    torch.testing.assert_close(out_s, out_d)
    for name, gs, gd in zip(["x"] + [n for n, _ in sparse.named_parameters()], grads_of(sparse, x, out_s), grads_of(dense, x, out_d)):
        torch.testing.assert_close(gs, gd, msg=f"gradient of {name}")
    assert torch.equal(sparse.last_routing.top_idx, dense.last_routing.top_idx)
    torch.testing.assert_close(sparse.last_routing.probs, dense.last_routing.probs)


@pytest.mark.parametrize("routed_compute", ROUTED)
def test_experts_that_get_no_token_have_zero_gradients_not_none(routed_compute):
    """Every token routed to experts 0 and 1: experts 2..5 run on no token, yet each param
    has a full gradient tensor (zeros where idle), as the gradient all-reduce expects."""
    layer = make_molora(num_experts=6, top_k=2, routed_compute=routed_compute)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([5.0, 4.0, 0, 0, 0, 0]))
    x = torch.randn(7, 12, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert torch.bincount(layer.last_routing.top_idx.reshape(-1), minlength=6).tolist() == [7, 7, 0, 0, 0, 0]
    r = layer.rank
    for p in layer.parameters():
        assert p.grad is not None and p.grad.shape == p.shape
    assert layer.na_A.grad[: 2 * r].abs().sum() > 0 and layer.na_B.grad[:, : 2 * r].abs().sum() > 0
    assert torch.count_nonzero(layer.na_A.grad[2 * r:]) == 0
    assert torch.count_nonzero(layer.na_B.grad[:, 2 * r:]) == 0


@pytest.mark.parametrize("routed_compute", ROUTED)
def test_empty_batch_gives_empty_output_and_zero_gradients(routed_compute):
    """A rank whose micro-batch has no token at this layer must still produce a gradient for
    every param (zeros), not fail."""
    layer = make_molora(routed_compute=routed_compute)
    x = torch.randn(0, 12, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 10)
    (out.sum() + 0.0 * x.sum()).backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.count_nonzero(p.grad) == 0


def test_sparse_is_deterministic_and_checkpoint_recompute_matches():
    """Same input twice: bit-identical output, routing and gradients; under non-reentrant
    gradient checkpointing the recompute selects the same experts and gives the same gradients."""
    from torch.utils.checkpoint import checkpoint

    layer = make_molora(d_in=32, d_out=24, rank=4, shared_rank=8, num_experts=8, top_k=2)
    x = torch.randn(3, 50, 32, requires_grad=True)
    runs = []
    for use_ckpt in (False, False, True):
        out = checkpoint(layer, x, use_reentrant=False) if use_ckpt else layer(x)
        grads = grads_of(layer, x, out)
        runs.append((out.detach(), layer.last_routing.top_idx.clone(), grads))
    (o0, i0, g0), (o1, i1, g1), (o2, i2, g2) = runs
    assert torch.equal(o0, o1) and torch.equal(i0, i1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert torch.equal(o0, o2) and torch.equal(i0, i2) and all(torch.equal(a, b) for a, b in zip(g0, g2))


def test_sparse_with_dropout_and_leading_dims_matches_dense_under_the_same_mask():
    sparse = make_molora()
    dense = make_molora(routed_compute="dense")
    for layer in (sparse, dense):
        layer.dropout = torch.nn.Dropout(0.3)
        layer.train()
    x = torch.randn(2, 3, 5, 12)
    torch.manual_seed(7)
    out_s = sparse(x)
    torch.manual_seed(7)
    out_d = dense(x)
    assert out_s.shape == (2, 3, 5, 10)
    torch.testing.assert_close(out_s, out_d)


def test_routed_compute_is_checked():
    with pytest.raises(ValueError, match="routed_compute"):
        make_molora(routed_compute="grouped")
