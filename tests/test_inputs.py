"""Inputs that used to end in a traceback: each is one line on stderr, status 2, before any
process group or model load (the launcher's entry point, run in this process)."""

import json
import shutil
import sys
import time

import pytest

from helpers import SAMPLE

STAGE1 = [sys.argv[0], "--data", str(SAMPLE / "stage1.jsonl"), "--max_steps", "1", "--global_batch_size", "2",
          "--micro_batch_size", "1", "--max_length", "128"]


def run_stage1(monkeypatch, capsys, *args: str) -> str:
    from medcare_dist.method import stage1
    from medcare_dist.training.recipe import main_for_stage

    monkeypatch.setattr(sys, "argv", STAGE1 + list(args))
    started = time.monotonic()
    status = main_for_stage(1, stage1.stage1_adapters, lambda adapters, cfg: stage1.RouterObjective(adapters),
                            check_base=stage1.check_stage1_base)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert time.monotonic() - started < 30
    return err[0]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_missing_model_dir(monkeypatch, capsys, tmp_path):
    line = run_stage1(monkeypatch, capsys, "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"))
    assert line == f"stage 1: error: model directory not found: {tmp_path / 'nope'}"


def test_model_dir_without_weights_or_config(monkeypatch, capsys, model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    line = run_stage1(monkeypatch, capsys, "--model", str(model_copy), "--output_dir", str(tmp_path / "out"))
    assert line.endswith(f"{model_copy}: no model.safetensors or model.safetensors.index.json")
    (model_copy / "config.json").unlink()
    line = run_stage1(monkeypatch, capsys, "--model", str(model_copy), "--output_dir", str(tmp_path / "out"))
    assert line.endswith(f"{model_copy}: no config.json; not a Hugging Face model directory")


def test_output_dir_that_is_a_file(monkeypatch, capsys, tiny_model_dir, tmp_path):
    (tmp_path / "out").write_text("")
    line = run_stage1(monkeypatch, capsys, "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"))
    assert line.endswith(f"output directory {tmp_path / 'out'} is a file; give a directory path")


def test_hub_name_not_in_the_offline_cache(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    line = run_stage1(monkeypatch, capsys, "--model", "org/absent", "--output_dir", str(tmp_path / "out"))
    assert "model org/absent: not in the Hugging Face cache" in line


def test_tokenizer_without_pad_token_falls_back_to_eos_and_without_either_is_refused(model_copy):
    from transformers import AutoTokenizer

    from medcare_dist.data.chat import pad_token_id
    from medcare_dist.errors import ChatTemplateError

    config = json.loads((model_copy / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (model_copy / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(str(model_copy))
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None and pad_token_id(tokenizer) == tokenizer.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(ChatTemplateError, match="neither a pad nor an eos token; set \"pad_token\""):
        pad_token_id(tokenizer)


def test_upper_case_data_suffix_is_read(tmp_path):
    from medcare_dist.data.dataset import read_records

    shutil.copy(SAMPLE / "stage1.jsonl", tmp_path / "STAGE1.JSONL")
    conversations = read_records(tmp_path / "STAGE1.JSONL")[0]
    assert len(conversations) == sum(1 for line in (SAMPLE / "stage1.jsonl").read_text().splitlines() if line.strip())


def test_a_model_stage1_cannot_adapt_or_a_loss_that_cannot_apply_its_logits_is_refused(monkeypatch, capsys, tmp_path):
    from helpers import write_family_model

    phi3, gemma2 = (write_family_model(tmp_path / name, name) for name in ("phi3", "gemma2"))
    capsys.readouterr()  # their writing's progress bars
    line = run_stage1(monkeypatch, capsys, "--model", str(phi3), "--output_dir", str(tmp_path / "out"))
    assert line.startswith("stage 1: error: Phi3ForCausalLM fuses projections the method adapts one by one: "
                           "model.layers.0.self_attn.qkv_proj (fused q, k, v), model.layers.0.mlp.gate_up_proj")
    line = run_stage1(monkeypatch, capsys, "--model", str(gemma2), "--output_dir", str(tmp_path / "out"), "--lm_loss", "liger")
    assert line == ("stage 1: error: lm_loss 'liger' does not apply the model config's final_logit_softcapping: "
                    "use lm_loss chunked or full")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' own switch (conftest), not a user's
    line = run_stage1(monkeypatch, capsys, "--model", str(gemma2), "--output_dir", str(tmp_path / "out"),
                      "--routed_compute", "fused")
    assert line == "stage 1: error: routed_compute 'fused' runs on CUDA (or under TRITON_INTERPRET=1), not cpu; use dense or auto"


def test_a_deepspeed_config_that_cannot_work_is_one_line_before_data(monkeypatch, capsys, tiny_model_dir, tmp_path):
    stage2 = tmp_path / "zero2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    line = run_stage1(monkeypatch, capsys, "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "a"),
                      "--ds_config", str(stage2))
    assert line == f"stage 1: error: {stage2}: zero_optimization.stage must be 3 (the frozen base is partitioned), got 2"
    fixed = tmp_path / "micro4.json"
    fixed.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    line = run_stage1(monkeypatch, capsys, "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "b"),
                      "--ds_config", str(fixed))
    assert line.startswith(f"stage 1: error: {fixed}: train_micro_batch_size_per_gpu is 4, but --micro_batch_size is 1")
    assert "tokenis" not in capsys.readouterr().out  # refused before the data was read


def test_a_cut_parquet_file_is_one_line_naming_it(monkeypatch, capsys, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (SAMPLE / "stage1.jsonl").read_text().splitlines()[:40]]
    cut = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist(rows), cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    argv = list(STAGE1)
    argv[argv.index("--data") + 1] = str(cut)
    monkeypatch.setattr(sys.modules[__name__], "STAGE1", argv)
    import datasets

    datasets.disable_progress_bars()  # stderr: the error line alone
    try:
        line = run_stage1(monkeypatch, capsys, "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"),
                          "--data_cache", str(tmp_path / "cache"))
    finally:
        datasets.enable_progress_bars()
    assert line.startswith(f"stage 1: error: {cut}: not a readable Parquet file (after 0 records): ")
