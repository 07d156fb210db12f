"""The compatibility table of the README, row by row: a tiny model of each family (built from
its config, with the tiny tokenizer) goes through the real launchers (stage 1, prepare-stage2,
stage 2, export; one CPU rank, ZeRO-3), and the export, loaded by plain `from_pretrained`,
gives the trained model's logits; its model card names the architecture. What is refused is
refused in one line (tests/method/test_targets.py, tests/test_inputs.py)."""

import json
import sys

import pytest
import torch

from helpers import FAMILIES, REPO, SAMPLE, assert_relative_close, run_launcher, write_family_model
from medcare_dist.artefacts.export import export_merged
from medcare_dist.artefacts.loading import load_trained_model
from medcare_dist.artefacts.stage2_base import prepare_stage2

SUPPORTED = [family for family in FAMILIES if family != "phi3"]  # Phi-3: fused projections, refused
SHORT_RUN = ["--max_steps", "2", "--global_batch_size", "2", "--micro_batch_size", "1", "--max_length", "128",
             "--lr", "1e-2", "--warmup_ratio", "0"]


def train(stage: int, model, out, *extra: str) -> str:
    """A short run of launch/stage{stage}.py as a world of one; its log."""
    cmd = [sys.executable, str(REPO / "launch" / f"stage{stage}.py"), "--model", str(model),
           "--data", str(SAMPLE / f"stage{stage}.jsonl"), "--output_dir", str(out), *SHORT_RUN, *extra]
    run_launcher(cmd, out.parent / f"stage{stage}.log")
    return (out.parent / f"stage{stage}.log").read_text()


@pytest.mark.parametrize("family", SUPPORTED)
def test_pipeline_export_gives_the_trained_models_logits(family, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = write_family_model(tmp_path / "base", family, tokenizer_dir=tiny_model_dir)
    log = train(1, base, tmp_path / "stage1", "--num_experts", "2", "--lora_r", "4")
    assert ("stage 1 adapts: attention LoRA on k_proj, o_proj, q_proj, v_proj (8 Linears); "
            "LoRA experts on down_proj, gate_proj, up_proj (6 Linears)\n") in log
    stage2_base = prepare_stage2(tmp_path / "stage1" / "checkpoint-2", tmp_path / "stage2-base")
    train(2, stage2_base, tmp_path / "stage2", "--align_attention")
    out = export_merged(tmp_path / "stage2" / "checkpoint-2", tmp_path / "hf", dtype="fp32")
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    assert f"tags: [medical, medcare, {model_type}]" in (out / "README.md").read_text()

    trained, tokenizer, adapters = load_trained_model(tmp_path / "stage2" / "checkpoint-2")
    assert adapters is not None
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, exported(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()(input_ids=ids).logits
    assert_relative_close(got, want, 1e-6, "export logits")
    assert float((want - plain).abs().max()) > 1e-4  # training changed the model: the check is not vacuous
