"""The compatibility table of the README, row by row: a tiny model of each family (built from
its config, with the tiny tokenizer) goes stage 1 -> prepare-stage2 -> stage 2 -> export, and
the export, loaded by plain `from_pretrained`, gives the trained model's logits; its model
card names the architecture. What is refused is refused in one line (tests/method/test_targets.py,
tests/test_inputs.py)."""

import json

import pytest
import torch

from helpers import FAMILIES, assert_relative_close, write_family_model, write_stage1_checkpoint, write_stage2_checkpoint
from medcare_dist.artefacts.export import export_merged
from medcare_dist.artefacts.loading import load_trained_model
from medcare_dist.artefacts.stage2_base import prepare_stage2

SUPPORTED = [family for family in FAMILIES if family != "phi3"]  # Phi-3: fused projections, refused


@pytest.mark.parametrize("family", SUPPORTED)
def test_pipeline_export_gives_the_trained_models_logits(family, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = write_family_model(tmp_path / "base", family, tokenizer_dir=tiny_model_dir)
    stage1 = write_stage1_checkpoint(base, tmp_path / "stage1")
    stage2 = write_stage2_checkpoint(prepare_stage2(stage1, tmp_path / "stage2-base"), tmp_path / "stage2",
                                     align_attention=True)
    out = export_merged(stage2, tmp_path / "hf", dtype="fp32")
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    assert f"tags: [medical, medcare, {model_type}]" in (out / "README.md").read_text()

    trained, tokenizer, adapters = load_trained_model(stage2)
    assert adapters is not None
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, exported(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()(input_ids=ids).logits
    assert_relative_close(got, want, 1e-6, "export logits")
    assert float((want - plain).abs().max()) > 1e-4  # the adapters changed the model: the check is not vacuous
