"""Node-local partitioning of the frozen base (ds_configs/zero3_node_local.json, ZeRO++ hpZ).

Unit tests of the size check, then one distributed scenario: 4 CPU ranks as 2 simulated
nodes x 2 (one `deepspeed --no_ssh --node_rank N` runner per node), trained once with plain
ZeRO-3 and once node-local. The results must agree, and under node-local sharding every
collective whose group spans both nodes must be the adapter gradient all-reduce or a known
handful of scalars.
"""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import PROBES, REPO
from medcare_dist.config import ConfigError
from medcare_dist.dist.node_local import resolve_hpz

_spec = importlib.util.spec_from_file_location("node_local_probe", PROBES / "node_local_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

NODE_LOCAL = REPO / "ds_configs" / "zero3_node_local.json"
PLAIN = REPO / "ds_configs" / "zero3.json"


def hpz(size, nodes):
    return resolve_hpz({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": size}}, nodes, "x.json")["zero_optimization"]["zero_hpz_partition_size"]


def test_auto_size_is_the_ranks_per_node_and_off_on_one_node():
    assert hpz("auto", ["a", "a", "b", "b"]) == 2
    assert hpz("auto", ["a"] * 8 + ["b"] * 8 + ["c"] * 8) == 8
    assert hpz("auto", ["a", "a", "a", "a"]) == 1  # one node: every gather is node-local already
    assert hpz(2, ["a"] * 4 + ["b"] * 4) == 2  # a divisor of the ranks per node: groups inside a node


@pytest.mark.parametrize("size, nodes, words", [
    (4, ["a", "a", "b", "b"], "ranks 0..3 in one group, but they run on different nodes (a, b)"),
    (2, ["a", "a", "a", "b", "b", "b"], "ranks 2..3 in one group"),
    (2, ["a", "b", "a", "b"], "each node's ranks must be consecutive"),
    (3, ["a", "a", "b", "b"], "zero_hpz_partition_size=3 does not divide the world of 4 ranks"),
    ("auto", ["a", "a", "a", "b"], "needs the same number of ranks on every node, got {'a': 3, 'b': 1}"),
    (0, ["a", "b"], "must be \"auto\" or a positive integer, got 0"),
])
def test_a_size_that_splits_a_node_group_across_nodes_is_refused(size, nodes, words):
    with pytest.raises(ConfigError, match="^x.json: zero_optimization.zero_hpz_partition_size") as err:
        hpz(size, nodes)
    assert words in str(err.value)


def test_shipped_config_differs_from_plain_zero3_by_the_hpz_size_only_and_deepspeed_accepts_it():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    node_local, plain = json.loads(NODE_LOCAL.read_text()), json.loads(PLAIN.read_text())
    assert node_local["zero_optimization"].pop("zero_hpz_partition_size") == "auto"
    assert node_local == plain
    resolved = resolve_hpz(json.loads(NODE_LOCAL.read_text()), ["a", "a", "b", "b"], str(NODE_LOCAL))
    assert DeepSpeedZeroConfig(**resolved["zero_optimization"]).zero_hpz_partition_size == 2


# -------------------------------------------------------------------------------------------
# 2 simulated nodes x 2 ranks, plain ZeRO-3 against node-local
# -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Both configs on the same 4 ranks, data and seed; each run returns its reports and
    per-rank adapter tensors."""
    out = {}
    for name, shipped in (("plain", PLAIN), ("node_local", NODE_LOCAL)):
        root = tmp_path_factory.mktemp(name)
        ds = probe.gather_every_use(shipped, root / "ds_config.json")
        reports = probe.run_simulated_nodes(probe.stage1_args(str(tiny_model_dir), ds, root / "run", 4), root, probe.free_port())
        out[name] = reports, [load_file(str(root / f"adapters_rank{r}.safetensors")) for r in range(4)]
    return out


def gathers(report: dict, reports: list[dict], label: str, phase: str, crossing: bool) -> int:
    return sum(r["calls"] for r in report["collectives"] if r["label"] == label and r["phase"] == phase
               and "gather" in r["op"] and probe.cross_node(r, reports) == crossing)


@pytest.mark.distributed
def test_node_local_training_equals_plain_zero3_and_only_adapter_gradients_cross_nodes(runs):
    plain, plain_tensors = runs["plain"]
    local, local_tensors = runs["node_local"]
    steps = [f"step{k}" for k in range(1, probe.STEPS + 1)]
    # The launchers placed ranks 0, 1 on the first simulated node and 2, 3 on the second.
    assert [r["node"] for r in local] == [r["node"] for r in plain]
    assert local[0]["node"] == local[1]["node"] != local[2]["node"] == local[3]["node"]

    # (a) the same training: the summed gradients of one global batch and the adapters after
    # the steps, on every rank, within fp32 tolerance; the same losses.
    for rank in range(4):
        assert plain_tensors[rank].keys() == local_tensors[rank].keys()
        assert any(k.startswith("grad.") for k in local_tensors[rank])
        for name, want in plain_tensors[rank].items():
            torch.testing.assert_close(local_tensors[rank][name], want, rtol=1e-6, atol=1e-8, msg=f"rank {rank} {name}")
        for got, want in zip(local[rank]["losses"], plain[rank]["losses"], strict=True):
            assert got == pytest.approx(want, rel=1e-6)

    # Node-local sharding is really on: every base weight holds a secondary shard over the
    # 2 ranks of its node, from the load on and still after the steps; plain ZeRO-3 has none.
    for report in local:
        for state in (report["hpz_before_steps"], report["hpz_after_steps"]):
            assert state["with_secondary"] == state["params"] > 0 and state["group_size"] == 2, state
    assert all(r["hpz_after_steps"]["with_secondary"] == 0 for r in plain)

    for report in local:
        # The base is gathered in forward and again in backward of every pass, inside the node.
        for label in ["gradients", *steps]:
            assert gathers(report, local, label, "forward", crossing=False) > 0
            assert gathers(report, local, label, "after_forward", crossing=False) > 0
        # (b) what crosses nodes: the adapter gradient all-reduce, once per pass; the loss parts
        # and token count (float64 scalars) once per step; and, while DeepSpeed records its
        # module trace, its check that every rank traced the same order (broadcasts of a few
        # integer ids: PartitionedParameterCoordinator.reset_step). The startup check of the
        # model's logits runs forwards of its own, so the trace settles after a few passes; the
        # last step must be the steady state, with none.
        crossing = [r for r in report["collectives"] if probe.cross_node(r, local)]
        grad_allreduce = [r for r in crossing if r["op"] == "all_reduce" and r["bytes"] == report["adapter_grad_bytes"]]
        assert sorted(r["label"] for r in grad_allreduce) == sorted(["gradients", *steps]), crossing
        assert all(r["calls"] == 1 for r in grad_allreduce)
        for r in crossing:
            if r in grad_allreduce:
                continue
            scalars = r["op"] == "all_reduce" and r["label"] in steps and r["bytes"] <= 8 * 4 and r["calls"] == 1
            trace_check = r["op"] == "broadcast" and r["label"] != steps[-1] and r["phase"] == "forward" and r["bytes"] <= 4096
            assert scalars or trace_check, f"rank {report['rank']}: unexpected collective across nodes {r}"

    # The counter does see the base crossing nodes under plain ZeRO-3, in forward and backward.
    for report in plain:
        for label in steps:
            assert gathers(report, plain, label, "forward", crossing=True) > 0
            assert gathers(report, plain, label, "after_forward", crossing=True) > 0
