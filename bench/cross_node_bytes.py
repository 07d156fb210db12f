"""Bytes per training step crossing nodes: node-local sharding of the frozen base
(ds_configs/zero3_node_local.json, ZeRO++ hpZ) against plain ZeRO-3 (ds_configs/zero3.json),
on the same simulated nodes, data and seed, in the same run.

    python bench/cross_node_bytes.py [--model DIR] [--nodes 2] [--ranks-per-node 2] [--shipped-buckets]

Each config starts one `deepspeed --no_ssh --node_rank N` runner per simulated node on this
machine and runs stage 1 through tests/probes/node_local_probe.py, which counts the payload of
every collective per process group (the bytes of the result buffer on a rank: the gathered
tensor of an all-gather, the reduced tensor of an all-reduce). "Per step" is the mean over the
optimizer steps after DeepSpeed's first two passes (which also record its module trace).
Default model: the built-in tiny Qwen2, with ZeRO-3 set to gather every submodule at each use
(GATHER_EVERY_USE in the probe), which is what a multi-billion model sees under the shipped
bucket sizes; --shipped-buckets keeps the shipped values instead.
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("node_local_probe", REPO / "tests" / "dist" / "node_local_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)
CONFIGS = {"plain ZeRO-3": REPO / "ds_configs" / "zero3.json", "node-local (hpZ)": REPO / "ds_configs" / "zero3_node_local.json"}


def mib(n: float) -> str:
    return f"{n / 2**20:,.3f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Qwen2 model dir (default: the built-in tiny model)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--shipped-buckets", action="store_true", help="keep the configs' own ZeRO-3 bucket and persistence values")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cross_node_bytes_"))
    model = args.model
    if model is None:
        model = str(tmp / "tiny")
        subprocess.run([sys.executable, "-m", "medcare_dist", "tiny-model", "--out", model], cwd=REPO, check=True, capture_output=True)
    world = args.nodes * args.ranks_per_node
    rows = []
    for name, shipped in CONFIGS.items():
        root = tmp / shipped.stem
        root.mkdir()
        ds = shipped if args.shipped_buckets else probe.gather_every_use(shipped, root / "ds_config.json")
        train = probe.stage1_args(model, ds, root / "run", world)
        reports = probe.run_simulated_nodes(train, root, probe.free_port(), args.nodes, args.ranks_per_node)
        rank0 = reports[0]
        by_pass = probe.traffic(rank0, reports)
        steady = [by_pass[f"step{k}"] for k in range(2, probe.STEPS + 1)]
        rows.append({
            "config": name,
            "cross_step": sum(t["cross_node_bytes"] for t in steady) / len(steady),
            "cross_calls": sum(t["cross_node_calls"] for t in steady) / len(steady),
            "in_step": sum(t["in_node_bytes"] for t in steady) / len(steady),
            "cross_first": by_pass["gradients"]["cross_node_bytes"],
            "grad": rank0["adapter_grad_bytes"],
            "base": rank0["hpz_after_steps"]["primary_bytes"] + rank0["hpz_after_steps"]["secondary_bytes"],
        })
    print(f"{args.nodes} simulated nodes x {args.ranks_per_node} ranks (CPU, gloo), model {model}, "
          f"{'shipped buckets' if args.shipped_buckets else 'gather at every use'}; per rank 0, payload bytes")
    print("| config | crossing nodes per step | calls | inside a node per step | crossing, first pass | adapter grads | base held per rank |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {mib(r['cross_step'])} | {r['cross_calls']:.0f} | {mib(r['in_step'])} | {mib(r['cross_first'])} | {mib(r['grad'])} | {mib(r['base'])} |")


if __name__ == "__main__":
    main()
