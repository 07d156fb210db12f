"""Stage 1's target projections come from the model's modules: fused or missing ones are
refused in one line naming them, unless partial_targets; what is adapted is said."""

import pytest

from medcare_dist.config import TrainConfig
from medcare_dist.errors import ConfigError
from medcare_dist.method.stage1 import ATTENTION, MOLORA, check_stage1_base, stage1_adapters

from helpers import FAMILIES, write_family_model


def _model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(write_family_model(tmp_path / family, family))


def test_phi3_fused_projections_are_refused_naming_them_or_left_out_with_partial_targets(tmp_path):
    model = _model(tmp_path, "phi3")
    cfg = TrainConfig(model="m", data=["d"])
    with pytest.raises(ConfigError) as err:
        stage1_adapters(model, cfg)
    assert str(err.value) == (
        "Phi3ForCausalLM fuses projections the method adapts one by one: model.layers.0.self_attn.qkv_proj "
        "(fused q, k, v), model.layers.0.mlp.gate_up_proj (fused gate, up); set partial_targets: true to train "
        "the other projections only")
    partial = TrainConfig(model="m", data=["d"], partial_targets=True, num_experts=2, lora_r=2)
    adapters = stage1_adapters(model, partial)
    assert sorted({t.rsplit(".", 1)[-1] for _, t, _ in adapters.items(ATTENTION)}) == ["o_proj"]
    assert sorted({t.rsplit(".", 1)[-1] for _, t, _ in adapters.items(MOLORA)}) == ["down_proj"]
    assert check_stage1_base(model, partial) == (
        "stage 1 adapts: attention LoRA on o_proj (2 Linears); LoRA experts on down_proj (2 Linears); "
        "not adapted: q_proj, k_proj, v_proj, gate_proj, up_proj, qkv_proj (fused), gate_up_proj (fused)")


def test_a_missing_projection_is_refused_unless_partial_targets(tmp_path):
    model = _model(tmp_path, "qwen2")
    cfg = TrainConfig(model="m", data=["d"], ffn_targets=["gate_proj", "up_proj", "down_proj", "w3"])
    with pytest.raises(ConfigError, match=r"^Qwen2ForCausalLM has no w3 \(attn_targets, ffn_targets\): name its"):
        stage1_adapters(model, cfg)
    assert check_stage1_base(model, TrainConfig(model="m", data=["d"])) == (
        "stage 1 adapts: attention LoRA on k_proj, o_proj, q_proj, v_proj (8 Linears); "
        "LoRA experts on down_proj, gate_proj, up_proj (6 Linears)")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3"])
def test_every_supported_family_gets_all_seven_projections(tmp_path, family):
    from medcare_dist.artefacts.hf_model import model_skeleton

    model = model_skeleton(str(write_family_model(tmp_path / family, family)))  # what the launcher checks
    line = check_stage1_base(model, TrainConfig(model="m", data=["d"]))
    assert line.endswith("attention LoRA on k_proj, o_proj, q_proj, v_proj (8 Linears); "
                         "LoRA experts on down_proj, gate_proj, up_proj (6 Linears)")
