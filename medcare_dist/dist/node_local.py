"""Node-local partitioning of the frozen base: shard within a node, replicate across nodes.

Plain ZeRO-3 partitions every base weight over the whole world, so each forward and backward
all-gathers the base across the nodes. The base is frozen and the adapters are replicated,
so nothing forces that: with DeepSpeed's ZeRO++ hierarchical partitioning (hpZ,
`zero_optimization.zero_hpz_partition_size` = s) each weight also keeps a *secondary* shard
over the s consecutive ranks of its group, and every gather is served from that shard inside
the group. DeepSpeed drops the secondary shard only after its own optimizer step or a
checkpoint of its own; neither happens to the frozen base here, so after `zero.Init` built
it (transformers' `from_pretrained` under `HfDeepSpeedConfig`) every gather of every step
stays inside the group. With s = ranks per node, the only per-step traffic between nodes is
then the adapter gradient all-reduce (and a few logging scalars). Cost: each rank holds
1/world (primary) + 1/s (secondary) of the base instead of 1/world.

MiCS (`mics_shard_size`), the other mechanism for this, is removed in DeepSpeed 0.19.8:
its config key raises DeepSpeedConfigError (deepspeed/runtime/config.py).

DeepSpeed forms the groups as consecutive global ranks ([0..s-1], [s..2s-1], ...): this
module checks, from where every rank says it runs, that each group lies inside one node.
"""

from __future__ import annotations

import os
import socket

from medcare_dist.config import ConfigError

HPZ_KEY = "zero_hpz_partition_size"
# Which node a rank runs on, as the launcher numbers nodes (deepspeed runner, torchrun,
# SLURM); the host name alone also tells, except for nodes simulated on one host.
_NODE_VARS = ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID")


def node_id() -> str:
    """This rank's node: host name plus the launcher's node number where it sets one."""
    launcher_node = next((f"{v}={os.environ[v]}" for v in _NODE_VARS if v in os.environ), "")
    return f"{socket.gethostname()}/{launcher_node}" if launcher_node else socket.gethostname()


def configure(ds_config: dict, source: str) -> dict:
    """`ds_config` with its hpZ size filled and checked against where the ranks run (a
    collective: every rank calls it, after the process group exists, before the model load)."""
    if HPZ_KEY not in ds_config.get("zero_optimization", {}):
        return ds_config
    from medcare_dist.dist.process_group import gather_objects

    return resolve_hpz(ds_config, gather_objects(node_id()), source)


def resolve_hpz(ds_config: dict, nodes: list[str], source: str) -> dict:
    """Fill and check `zero_hpz_partition_size`, given every rank's node (`nodes[rank]`).

    "auto": the ranks per node when the world spans several nodes, else 1 (off: on one node
    every gather is node-local already, and the secondary shard would only cost memory).
    An explicit size must split the world into groups that each lie inside one node.
    """
    zero = ds_config.get("zero_optimization", {})
    size = zero.get(HPZ_KEY, 1)
    world = len(nodes)
    per_node = {n: nodes.count(n) for n in nodes}
    if size == "auto":
        counts = set(per_node.values())
        if len(per_node) == 1:
            size = 1
        elif len(counts) == 1:
            size = counts.pop()
        else:
            raise ConfigError(f"{source}: zero_optimization.{HPZ_KEY} \"auto\" needs the same number of ranks on every node, got {per_node}")
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"{source}: zero_optimization.{HPZ_KEY} must be \"auto\" or a positive integer, got {size!r}")
    if size > 1:
        if world % size:
            raise ConfigError(f"{source}: zero_optimization.{HPZ_KEY}={size} does not divide the world of {world} ranks")
        for start in range(0, world, size):
            group = nodes[start:start + size]
            if len(set(group)) > 1:
                raise ConfigError(
                    f"{source}: zero_optimization.{HPZ_KEY}={size} puts ranks {start}..{start + size - 1} in one group, but they run "
                    f"on different nodes ({', '.join(sorted(set(group)))}): the size must divide the ranks per node "
                    f"({per_node}), and each node's ranks must be consecutive"
                )
    return {**ds_config, "zero_optimization": {**zero, HPZ_KEY: size}}
