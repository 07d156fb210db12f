"""GradientBuckets in one process, on a real gloo group of world size 1 (an all-reduce there
is the identity, so the reduced gradients must equal the local ones): bucket assignment, the
launch order during backward, leftover buckets, accumulation outside the armed backward.
(Two ranks through the launcher: tests/e2e/test_stage2.py.)"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.adapters.lora import LoRA
from medcare_dist.dist.grad_buckets import GradientBuckets, assign_buckets

LINEAR_MB = 256 * 257 * 4 / 2**20  # an fp32 nn.Linear(256, 256), weight and bias


@pytest.fixture(scope="module")
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.new_group()
    finally:
        dist.destroy_process_group()


class LaunchLog:
    """Records each all-reduce the buckets launch: its element count, and a copy of every
    param's gradient at that moment (None where there is none yet)."""

    def __init__(self, monkeypatch, params):
        self.launches = []
        real = dist.all_reduce

        def recorded(tensor, *args, **kwargs):
            self.launches.append((tensor.numel(), [None if p.grad is None else p.grad.clone() for p in params]))
            return real(tensor, *args, **kwargs)

        monkeypatch.setattr(dist, "all_reduce", recorded)


def test_assign_buckets_keeps_order_and_gives_a_large_item_its_own():
    assert assign_buckets([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert assign_buckets([4, 20, 4, 4, 1], 8) == [[0], [1], [2, 3], [4]]
    assert assign_buckets([3, 3, 3], 100) == [[0, 1, 2]]


def chain(width=256, depth=3):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def test_buckets_launch_in_order_during_the_armed_backward_and_equal_plain_accumulation(group, monkeypatch):
    model = chain()
    params = list(model.parameters())
    x = torch.randn(4, 256)
    first = torch.autograd.grad(model(x).square().sum(), params)
    expected = [g + h for g, h in zip(first, torch.autograd.grad(model(2 * x).square().sum(), params))]
    named = [(f"{i}", p) for i, p in reversed(list(enumerate(params)))]  # deepest layer first
    buckets = GradientBuckets(named, bucket_mb=LINEAR_MB, group=group)
    assert [[named[i][0] for i in b] for b in buckets.buckets] == [["5", "4"], ["3", "2"], ["1", "0"]]
    log = LaunchLog(monkeypatch, params)
    model(x).square().sum().backward()  # an earlier micro-batch: accumulates, sends nothing
    assert log.launches == []
    buckets.arm()
    model(2 * x).square().sum().backward()
    assert [n for n, _ in log.launches] == [256 * 257] * 3
    # Each bucket went out during backward: its own gradients final, the layers below it
    # still holding only the first micro-batch's.
    for launch, (_, seen) in enumerate(log.launches):
        final = len(params) - 2 * (launch + 1)
        for i, (got, first_only, want) in enumerate(zip(seen, first, expected)):
            torch.testing.assert_close(got, want if i >= final else first_only, msg=f"launch {launch}, param {i}")
    buckets.finish()
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want)


def test_a_param_without_gradient_holds_back_later_buckets_and_gets_zeros(group, monkeypatch):
    model = chain(depth=2)
    unused = nn.Parameter(torch.ones(300, 300))  # larger than a bucket: one of its own
    params = list(model.parameters())
    # The unused param's bucket comes first: the ready buckets behind it must wait for it.
    buckets = GradientBuckets([("unused", unused)] + [(f"{i}", p) for i, p in reversed(list(enumerate(params)))], LINEAR_MB, group)
    assert len(buckets.buckets) == 3
    log = LaunchLog(monkeypatch, params)
    buckets.arm()
    model(torch.randn(4, 256)).sum().backward()
    assert log.launches == []
    buckets.finish()
    assert [n for n, _ in log.launches] == [300 * 300, 256 * 257, 256 * 257]  # then in order
    assert torch.equal(unused.grad, torch.zeros_like(unused))
    assert all(p.grad is not None for p in params)


def test_a_gradient_after_its_bucket_was_sent_is_an_error(group):
    model = chain(depth=1)
    buckets = GradientBuckets(list(model.named_parameters()), 25, group)
    buckets.arm()
    loss = model(torch.randn(2, 256)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"gradient of 0\.(weight|bias) arrived after its bucket was all-reduced"):
        loss.backward()


def test_without_a_group_nothing_is_sent_and_missing_gradients_become_zeros(monkeypatch):
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("all_reduce in a world of one"))
    buckets = GradientBuckets([("used", used), ("unused", unused)], 25, group=None)
    buckets.arm()
    (2 * used).sum().backward()
    buckets.finish()
    assert torch.equal(used.grad, torch.full((3,), 2.0)) and torch.equal(unused.grad, torch.zeros(2))


def test_trainable_by_depth_puts_the_deepest_adapted_module_first_and_skips_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    adapters = AdapterSet()
    for target in ("0", "1"):
        adapters.add("knowledge", target, LoRA(4, 4, 2, 1.0).requires_grad_(False))
    for target in ("0", "1"):
        adapters.add("alignment", target, LoRA(4, 4, 2, 1.0))
    names = [n for n, _ in adapters.trainable_by_depth(model)]
    assert names == ["alignment.1.lora_B", "alignment.1.lora_A", "alignment.0.lora_B", "alignment.0.lora_A"]
