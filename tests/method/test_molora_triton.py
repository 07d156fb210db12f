"""The fused routed experts (method/molora_triton.py) against the dense path, on CPU under
Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before any kernel is defined):
forward, input gradient, adapter gradients and router gradient, fp32."""

import pytest
import torch

from medcare_dist.method.molora import MoLoRA, resolve_routed_compute

pytest.importorskip("triton", reason="routed_compute 'fused' needs Triton (pip install triton): its kernels are not testable without it")


def pair(d_in, d_out, rank, num_experts, top_k, seed=0):
    torch.manual_seed(seed)
    dense = MoLoRA(d_in, d_out, rank, 2 * rank, num_experts, top_k, scale=2.0, routed_compute="dense")
    with torch.no_grad():  # B starts at zero; give it values so every gradient is seen
        dense.ka_B.normal_()
        dense.na_B.normal_()
    fused = MoLoRA(d_in, d_out, rank, 2 * rank, num_experts, top_k, scale=2.0, routed_compute="fused")
    fused.load_state_dict(dense.state_dict())
    return dense, fused


def run(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("d_in,d_out,rank,num_experts,top_k,tokens", [
    (48, 40, 16, 8, 2, 37),   # the MedCare rank and expert count, odd feature and token counts
    (33, 70, 3, 5, 3, 20),    # a rank below tl.dot's 16 (padded), k = 3
    (64, 24, 8, 16, 1, 5),    # more experts than tokens: most get none
])
def test_fused_equals_dense_outputs_and_every_gradient(d_in, d_out, rank, num_experts, top_k, tokens):
    dense, fused = pair(d_in, d_out, rank, num_experts, top_k)
    x = torch.randn(2, tokens, d_in)
    want, got = run(dense, x), run(fused, x)
    assert torch.equal(dense.last_routing.top_idx, fused.last_routing.top_idx)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)  # forward
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)  # input gradient
    for name in ("ka_A", "ka_B", "na_A", "na_B", "router.weight", "router.bias"):  # adapter and router gradients
        assert got[2][name] is not None, name
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_an_expert_with_no_token_gets_a_zero_gradient_block():
    dense, fused = pair(16, 16, 16, 4, 1)
    with torch.no_grad():  # the router sends every token to expert 0
        fused.router.weight.zero_()
        fused.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    _, _, grads = run(fused, torch.randn(9, 16))
    assert grads["na_A"][16:].abs().max() == 0 and grads["na_B"][:, 16:].abs().max() == 0
    assert grads["na_A"][:16].abs().max() > 0


def test_auto_is_dense_on_cpu_and_fused_only_on_cuda():
    assert resolve_routed_compute("auto", torch.device("cpu")) == "dense"
    assert resolve_routed_compute("auto", torch.device("cuda")) == "fused"  # Triton is importable here
    assert resolve_routed_compute("sparse", torch.device("cuda")) == "sparse"


def test_fused_on_cpu_without_the_interpreter_is_refused_in_one_line(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="runs on CUDA"):
        resolve_routed_compute("fused", torch.device("cpu"))
