"""The MedCare pipeline on the tiny model: stage 1 (2 ranks) -> prepare-stage2 -> stage 2 (2 ranks)."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import REPO, SAMPLE, free_port, run_launcher

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def stage2_base(stage1_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "stage2-base"
    subprocess.run([sys.executable, "-m", "medcare_dist", "prepare-stage2", "--stage1", str(stage1_run / "checkpoint-20"),
                    "--out", str(out)], check=True, cwd=REPO)
    return out


def run_stage2(stage2_base, out, ortho_lambda, port):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/stage2.py",
           "--model", str(stage2_base), "--data", str(SAMPLE / "stage2.jsonl"), "--output_dir", str(out),
           "--max_steps", "16", "--log_every", "1", "--global_batch_size", "8", "--micro_batch_size", "2",
           "--lr", "3e-3", "--max_length", "256", "--freeze_knowledge", "true", "--ortho_lambda", str(ortho_lambda)]
    run_launcher(cmd, out.parent / f"{out.name}.log")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage2_runs(stage2_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    return {lam: (root / f"lambda{lam}", run_stage2(stage2_base, root / f"lambda{lam}", lam, free_port())) for lam in (1, 0)}


def test_stage2_lm_loss_falls_and_loss_is_logged_in_two_parts(stage2_runs):
    _, metrics = stage2_runs[1]
    assert {"loss_lm", "loss_ortho", "ortho_penalty"} <= set(metrics[0])
    first = sum(m["loss_lm"] for m in metrics[:3]) / 3
    last = sum(m["loss_lm"] for m in metrics[-3:]) / 3
    assert last < first - 0.1, (first, last)


def test_orthogonal_term_ends_at_most_half_of_the_unpenalised_run(stage2_runs):
    with_penalty = stage2_runs[1][1][-1]["ortho_penalty"]
    without = stage2_runs[0][1][-1]["ortho_penalty"]
    assert with_penalty <= 0.5 * without, (with_penalty, without)


def test_frozen_knowledge_adapter_stays_bit_identical(stage2_runs, stage2_base):
    start = load_file(str(stage2_base / "knowledge_adapter.safetensors"))
    for out, _ in stage2_runs.values():
        trained = load_file(str(out / "checkpoint-16" / "adapters.safetensors"))
        for name, tensor in start.items():
            assert trained[f"knowledge.{name}"].equal(tensor), name
        assert any(trained[k].abs().sum() > 0 for k in trained if k.startswith("alignment.") and k.endswith("lora_B"))
    manifest = json.loads((stage2_runs[1][0] / "checkpoint-16" / "manifest.json").read_text())
    assert manifest["format"] == "medcare_dist/stage2-checkpoint" and manifest["stage"] == 2
    assert manifest["stage2_base"]["format"] == "medcare_dist/stage2-base" and manifest["stage2_base"]["format_version"] == 1


def test_the_final_model_exports_and_evaluates_and_the_stage1_checkpoint_finds_its_hub_base(stage2_runs, stage1_run, hub_env, tmp_path):
    """The end of the pipeline that began on the hub name org/tiny: export, then eval of the
    exported model and of the stage-1 checkpoint (its base located from the recorded source)."""
    final = tmp_path / "final"
    subprocess.run([sys.executable, "-m", "medcare_dist", "export", "--checkpoint", str(stage2_runs[1][0] / "checkpoint-16"),
                    "--out", str(final), "--dtype", "fp32"], check=True, cwd=REPO)
    for model in (final, stage1_run / "checkpoint-20"):
        report = tmp_path / f"eval-{model.name}.json"
        subprocess.run([sys.executable, "-m", "medcare_dist", "eval", "--model", str(model), "--data", str(SAMPLE / "exam.jsonl"),
                        "--max-new-tokens", "4", "--out", str(report)], check=True, cwd=REPO, env={**os.environ, **hub_env})
        assert json.loads(report.read_text())["files"], report.read_text()
