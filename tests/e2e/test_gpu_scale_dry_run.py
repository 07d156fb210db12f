"""bench/gpu_scale.sh --dry-run: the GPU benchmark's script, run whole on the CPU (tiny model,
fp32, 1 rank, 3 steps per run) through the real deepspeed launcher. Measures nothing; checks
that the script a GPU session will run works end to end and writes its report."""

import json
import subprocess

import pytest

from helpers import REPO

pytestmark = pytest.mark.distributed


def test_dry_run_writes_the_three_runs_and_their_ratios(tmp_path):
    out = tmp_path / "gpu_scale"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = tmp_path / "gpu_scale.log"
    with open(log, "w") as f:
        proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_scale.sh"), "--dry-run", "--out", str(out)],
                              cwd=elsewhere, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-6000:]

    report = json.loads((out / "gpu_scale.json").read_text())
    assert report["dry_run"] is True and report["packing"] == "off"
    assert set(report["runs"]) == {"lora", "stage1", "stage2"}
    for name, run in report["runs"].items():
        assert run["tokens_per_s"] > 0 and run["records_averaged"] >= 1, name
        assert run["peak_gpu_bytes"] is None, name  # no GPU: not measured, not invented
        assert run["flops_per_token"] > 4 * run["base_matmul_params"] > 0 and run["mfu"] > 0, name
        assert (out / "runs" / name / "metrics.jsonl").exists(), name
    assert report["runs"]["lora"]["plan_peak_bytes"] is None
    assert report["runs"]["stage1"]["plan_peak_bytes"] > 0 and report["runs"]["stage2"]["plan_peak_bytes"] > 0
    runs = report["runs"]
    for stage in ("stage1", "stage2"):
        assert report["ratios"][f"{stage}/lora"] == pytest.approx(runs[stage]["tokens_per_s"] / runs["lora"]["tokens_per_s"])
    text = log.read_text()
    assert all(f"\n{name} " in text for name in ("lora", "stage1", "stage2"))  # the printed table
    assert not (out / "work" / "base").exists()  # the synthetic bases are deleted unless --keep
