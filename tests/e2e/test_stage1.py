"""Stage 1 through the real launcher: `deepspeed --num_gpus 2 launch/stage1.py` on 2 CPU ranks."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import HUB_REPO, HUB_REVISION


pytestmark = pytest.mark.distributed


def test_loss_falls_and_metrics_are_logged(stage1_run):
    records = [json.loads(line) for line in (stage1_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.2, (first, last)
    for key in ("lr", "grad_norm", "tokens_per_s", "router_load", "router_entropy"):
        assert key in records[-1]
    load = records[-1]["router_load"]
    assert len(load) == 3 * 2  # gate/up/down x 2 layers
    assert all(len(v) == 4 and abs(sum(v) - 1) < 1e-3 for v in load.values())


def test_checkpoint_holds_adapters_agreed_by_both_ranks_and_an_untouched_base(stage1_run, tiny_model_dir, hub_env):
    assert (stage1_run / "latest").read_text().strip() == "checkpoint-20"
    for step in (10, 20):
        ckpt = stage1_run / f"checkpoint-{step}"
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapters.safetensors", "optimizer.pt", "trainer_state.json", "config.json", "manifest.json"} <= names
    manifest = json.loads((stage1_run / "checkpoint-20" / "manifest.json").read_text())
    assert manifest["stage"] == 1 and manifest["step"] == 20
    snapshot = HUB_REVISION
    source = manifest["base_source"]
    assert source == {"name": HUB_REPO, "repo_id": HUB_REPO, "revision": snapshot,
                      "path": str(Path(hub_env["HF_HUB_CACHE"]) / "models--org--tiny" / "snapshots" / snapshot)}
    assert manifest["base_model"] == source["path"] and Path(source["path"]).is_absolute()
    assert manifest["ranks_agreeing"] == 2
    assert set(manifest["adapter_layout"]) == {"attn_lora", "molora"}
    assert {"torch", "deepspeed", "transformers", "medcare_dist"} <= set(manifest["versions"])

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    file_sum = sum(float(t.double().sum()) for t in base.values())
    assert manifest["base_checksum"] == pytest.approx(file_sum, rel=1e-9)

    adapters = load_file(str(stage1_run / "checkpoint-20" / "adapters.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapters.values())
    assert adapters["molora.model.layers.0.mlp.up_proj.na_A"].shape == (4 * 8, 64)  # full, not a shard
    assert any(float(t.abs().sum()) > 0 for n, t in adapters.items() if n.endswith("lora_B"))
    total = sum(p.stat().st_size for p in (stage1_run / "checkpoint-20").iterdir())
    assert total < 5 * sum(t.numel() * 4 for t in adapters.values()) + 1_000_000  # no frozen base inside


def test_one_rank_tokenises_and_the_other_memory_maps_the_same_entry(stage1_run):
    lines = (stage1_run / "launcher.log").read_text().splitlines()
    written = [line for line in lines if "data: tokenising into " in line or "data: cache hit, " in line]
    loaded = [line for line in lines if "rank 1: data: loading " in line]
    assert len(written) == 1 and len(loaded) == 1, "\n".join(written + loaded)
    entry = written[0].rsplit(" ", 1)[-1]
    assert f"loading {entry}, tokenised by local rank 0 of this node" in loaded[0]  # both ranks read the same files
