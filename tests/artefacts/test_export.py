"""Export: a plain HF model and PEFT adapters that give the training-time model's logits."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import write_stage1_checkpoint, write_stage2_checkpoint
from medcare_dist.artefacts.export import export_adapter, export_merged
from medcare_dist.artefacts.stage2_base import prepare_stage2
from medcare_dist.artefacts.loading import load_trained_model

FRESH_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM
assert not any(m.startswith("medcare_dist") for m in sys.modules)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
assert not any(m.startswith("medcare_dist") for m in sys.modules)
"""


@pytest.fixture(scope="module")
def artefacts(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    stage1 = write_stage1_checkpoint(tiny_model_dir, root / "stage1")
    base = prepare_stage2(stage1, root / "stage2-base")
    stage2 = write_stage2_checkpoint(base, root / "stage2", align_attention=True)
    return root, stage1, base, stage2


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_export_loads_in_a_fresh_process_without_medcare_dist(artefacts, tmp_path):
    root, _, _, stage2 = artefacts
    out = export_merged(stage2, tmp_path / "hf", dtype="fp32", max_shard_size="150KB")
    assert (out / "model.safetensors.index.json").exists() and (out / "README.md").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    model, tokenizer, _ = load_trained_model(stage2)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                   check=True, cwd=tmp_path)
    exported = torch.load(tmp_path / "logits.pt", weights_only=True)
    expected = logits_of(model, ids)
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-4)


def test_bf16_export_has_bf16_weights(artefacts, tmp_path):
    from safetensors import safe_open

    out = export_merged(artefacts[3], tmp_path / "hf16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_stage2_peft_adapter_on_the_stage2_base_gives_the_same_logits(artefacts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, base, stage2 = artefacts
    out = export_adapter(stage2, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["rank_pattern"] == {t: 8 for t in ("k_proj", "o_proj", "q_proj", "v_proj")}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out)).eval()
    model, tokenizer, _ = load_trained_model(stage2)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    torch.testing.assert_close(logits_of(peft_model, ids), logits_of(model, ids), rtol=1e-4, atol=1e-4)


def test_stage1_adapter_export_is_peft_attention_lora_plus_molora(artefacts, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, stage1, base, _ = artefacts
    out = export_adapter(stage1, tmp_path / "s1")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out)).eval()
    merged_base = AutoModelForCausalLM.from_pretrained(str(base)).eval()  # stage 1's attention LoRA merged
    ids = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(logits_of(peft_model, ids), logits_of(merged_base, ids), rtol=1e-4, atol=1e-4)
    with safe_open(str(out / "molora.safetensors"), framework="pt") as f:
        assert f.metadata()["num_experts"] == "4"
        assert "model.layers.0.mlp.gate_proj.router.weight" in f.keys()


def test_export_refuses_what_it_cannot_do(artefacts, tiny_model_dir, tmp_path):
    _, stage1, base, stage2 = artefacts
    with pytest.raises(ValueError, match="routed experts cannot be merged"):
        export_merged(stage1, tmp_path / "a")
    with pytest.raises(ValueError, match="stage2-base"):
        export_adapter(base, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match=r"checkpoint-5 does not exist \(a typo, or pruned by the run's keep_last\?\); "
                                                r"a merged export needs a stage2-checkpoint"):
        export_merged(tmp_path / "run" / "checkpoint-5", tmp_path / "c")  # not "is a hf"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError):
        export_merged(stage2, tmp_path / "full")


@pytest.mark.parametrize("command", ["export", "prepare-stage2"])
def test_a_checkpoint_pruned_while_it_is_read_is_named_as_such(command, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A running job with keep_last deletes the checkpoint half way through the read: the
    error says so, instead of naming whichever file went missing first."""
    import shutil

    from medcare_dist import cli
    from medcare_dist.artefacts import export as export_mod, stage2_base

    ckpt = write_stage1_checkpoint(tiny_model_dir, tmp_path / "run")
    module = export_mod if command == "export" else stage2_base
    read_config = module.checkpoint_config

    def pruned_meanwhile(path):
        config = read_config(path)
        shutil.rmtree(ckpt)  # what the job's pruning does
        return config

    monkeypatch.setattr(module, "checkpoint_config", pruned_meanwhile)
    args = ["export", "--checkpoint", str(ckpt), "--adapter-only"] if command == "export" else ["prepare-stage2", "--stage1", str(ckpt)]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"medcare-dist {command}: error: {ckpt} was removed or changed while being read: pruned by "
                                               "a running job (keep_last)? Read a checkpoint the job keeps, or copy it first")
