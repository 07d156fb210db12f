"""Between the stages, in one process: prepare-stage2's output and stage 2's input checks."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import write_stage1_checkpoint
from medcare_dist.config import ConfigError, TrainConfig
from medcare_dist.artefacts.hf_model import load_frozen_base
from medcare_dist.method.stage2 import orthogonal_penalty
from medcare_dist.artefacts.manifest import KNOWLEDGE_FILE, read_manifest, record_files, write_manifest
from medcare_dist.artefacts.stage2_base import prepare_stage2
from medcare_dist.method.stage1 import stage1_adapters
from medcare_dist.artefacts.stage2_base import adapters_on_stage2_base, check_stage2_base


@pytest.fixture(scope="module")
def stage1_ckpt(tiny_model_dir, tmp_path_factory):
    return write_stage1_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("s1"))


@pytest.fixture(scope="module")
def stage2_base(stage1_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2base") / "base"
    prepare_stage2(stage1_ckpt, out, max_shard_size="200KB")  # several shards: exercises the index
    return out


def test_prepared_base_is_plain_hf_and_equals_stage1_with_attention_lora_only(tiny_model_dir, stage1_ckpt, stage2_base):
    from transformers import AutoModelForCausalLM

    assert (stage2_base / "model.safetensors.index.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(stage2_base)).eval()

    cfg = TrainConfig(**json.loads((stage1_ckpt / "config.json").read_text()))
    model = load_frozen_base(str(tiny_model_dir), None, torch.float32).eval()
    adapters = stage1_adapters(model, cfg)
    adapters.load_flat_state_dict(load_file(str(stage1_ckpt / "adapters.safetensors")))
    adapters.drop_group("molora")
    adapters.attach(model)
    adapters.eval()

    ids = torch.randint(0, merged.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = load_frozen_base(str(tiny_model_dir), None, torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the merge did change the model

    knowledge = load_file(str(stage2_base / KNOWLEDGE_FILE))
    stage1 = load_file(str(stage1_ckpt / "adapters.safetensors"))
    target = "model.layers.1.mlp.down_proj"
    assert torch.equal(knowledge[f"{target}.lora_A"], stage1[f"molora.{target}.ka_A"])
    assert torch.equal(knowledge[f"{target}.lora_B"], stage1[f"molora.{target}.ka_B"])
    assert not any("na_" in k or "router" in k for k in knowledge)
    manifest = json.loads((stage2_base / "manifest.json").read_text())
    assert manifest["knowledge"]["rank"] == 4 * 2 and manifest["stage1_checkpoint"] == str(stage1_ckpt.resolve())


def test_stage2_adapters_start_from_knowledge_and_a_zero_alignment_delta(stage2_base):
    cfg = TrainConfig(stage=2, model=str(stage2_base), data=["x"], freeze_knowledge=True)
    model = load_frozen_base(str(stage2_base), None, torch.float32)
    adapters = adapters_on_stage2_base(model, cfg)
    know = {t: a for _, t, a in adapters.items("knowledge")}
    align = {t: a for _, t, a in adapters.items("alignment")}
    assert know.keys() == align.keys() and len(know) == 6
    assert all(not p.requires_grad for a in know.values() for p in a.parameters())
    assert all(torch.count_nonzero(a.lora_B) == 0 and a.rank == 8 for a in align.values())
    penalty = orthogonal_penalty(adapters)
    expected = sum((know[t].lora_A @ align[t].lora_A.T).abs().sum() for t in know)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert all(a.lora_A.grad is not None and a.lora_A.grad.abs().sum() > 0 for a in align.values())


def test_stage2_refuses_inputs_that_do_not_fit(tiny_model_dir, stage1_ckpt, stage2_base, tmp_path):
    with pytest.raises(ConfigError, match="stage-1 checkpoint"):
        check_stage2_base(stage1_ckpt)
    with pytest.raises(ConfigError, match="no manifest.json"):
        check_stage2_base(tiny_model_dir)
    with pytest.raises(ConfigError, match="does not exist"):
        check_stage2_base(tmp_path / "nowhere")

    changed = tmp_path / "changed"
    shutil.copytree(stage2_base, changed)
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("64", "65", 1))
    with pytest.raises(ConfigError, match="config.json does not match the sha256 its manifest records"):
        check_stage2_base(changed)

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(stage2_base, wrong_shape)
    know = load_file(str(wrong_shape / KNOWLEDGE_FILE))
    know = {k: (v[:, :-1].contiguous() if k.endswith("up_proj.lora_A") else v) for k, v in know.items()}
    save_file(know, str(wrong_shape / KNOWLEDGE_FILE))
    manifest = read_manifest(wrong_shape)  # a consistent artefact (digests rewritten) whose shapes do not fit
    write_manifest(wrong_shape, {**manifest, "files": record_files(wrong_shape)})
    with pytest.raises(ConfigError, match="knowledge adapter .*up_proj"):
        check_stage2_base(wrong_shape)


def test_prepare_stage2_refuses_a_changed_base_and_a_non_stage1_input(tiny_model_dir, stage2_base, tmp_path):
    from medcare_dist.artefacts.checkpoint import CheckpointError

    other_base = tmp_path / "other_base"
    shutil.copytree(tiny_model_dir, other_base)
    ckpt = write_stage1_checkpoint(other_base, tmp_path / "ckpt")
    (other_base / "config.json").write_text((other_base / "config.json").read_text() + " ")
    with pytest.raises(CheckpointError, match="its base .* changed since it was made"):
        prepare_stage2(ckpt, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no manifest.json|not a stage-1"):
        prepare_stage2(tiny_model_dir, tmp_path / "out2")
