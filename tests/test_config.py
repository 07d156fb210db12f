"""The training config refuses, at load, every value that cannot work, with the option named."""

import pytest

from medcare_dist.config import ConfigError, TrainConfig, load_config, parse_overrides

BASE = {"model": "m", "data": ["d.jsonl"]}


def load(yaml_text: str | None = None, tmp_path=None, argv: list[str] | None = None, stage: int = 1):
    path = None
    if yaml_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml_text)
    return load_config(str(path) if path else None, {**BASE, **parse_overrides(argv or [])}, stage=stage)


@pytest.mark.parametrize("option, value, wanted", [
    ("log_every", "0", ">= 1"),
    ("lr", "0", "finite and > 0"),
    ("lr", "nan", "finite and > 0"),
    ("lr", "inf", "finite and > 0"),
    ("warmup_ratio", "1.5", r"in \[0, 1\]"),
    ("warmup_ratio", "-0.1", r"in \[0, 1\]"),
    ("epochs", "0", "> 0"),
    ("save_every", "-1", ">= 0"),
    ("save_every_minutes", "-5", r">= 0 \(0: off\)"),
    ("preempt_signals", "SIGTERM,SIGKILL", "a list of SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP"),
    ("keep_last", "-2", ">= 0"),
    ("max_grad_norm", "-1", ">= 0"),
    ("ortho_lambda", "-1", "finite and >= 0"),
    ("max_steps", "0", "-1 .* or >= 1"),
    ("max_length", "1", ">= 2"),
    ("timeout_minutes", "0", "> 0"),
    ("lora_dropout", "1", r"in \[0, 1\)"),
])
def test_out_of_range_values_are_refused_naming_the_option(option, value, wanted):
    with pytest.raises(ConfigError, match=rf"^{option} must be {wanted}.*, got"):
        load(argv=[f"--{option}", value])


def test_good_values_load():
    cfg = load(argv=["--lr", "1e-4", "--warmup_ratio", "1", "--max_grad_norm", "0", "--max_steps", "5"])
    assert (cfg.lr, cfg.warmup_ratio, cfg.max_grad_norm, cfg.max_steps) == (1e-4, 1.0, 0.0, 5)
    cfg = load(argv=["--preempt_signals", "SIGUSR1", "SIGTERM", "--save_every_minutes", "30"])
    assert (cfg.preempt_signals, cfg.save_every_minutes) == (["SIGUSR1", "SIGTERM"], 30.0)
    # --overwrite with --resume of another dir's checkpoint: the run it deletes is not the one it resumes
    load(argv=["--output_dir", "runs/new", "--resume", "runs/old/checkpoint-8", "--overwrite"])


def test_an_empty_yaml_value_is_an_error_not_the_string_none(tmp_path):
    with pytest.raises(ConfigError, match="^output_dir: empty value"):
        load("output_dir:\n", tmp_path)
    with pytest.raises(ConfigError, match="^lr: empty value"):
        load("lr:\n", tmp_path)


def test_unknown_keys_suggest_the_nearest_name(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: unknown option 'lora_rank'; did you mean lora_r\?"):
        load("lora_rank: 8\n", tmp_path)
    with pytest.raises(ConfigError, match=r"^command line: unknown option 'micro_batch'; did you mean micro_batch_size\?"):
        parse_overrides(["--micro-batch", "2"])


def test_a_repeated_flag_is_an_error():
    with pytest.raises(ConfigError, match="--lr is given twice"):
        parse_overrides(["--lr", "1e-4", "--seed", "1", "--lr=2e-4"])


def test_the_yaml_stage_cannot_contradict_the_launcher(tmp_path):
    with pytest.raises(ConfigError, match="the config says stage 2, but this is the stage-1 launcher"):
        load("stage: 2\n", tmp_path, stage=1)
    assert load("stage: 1\n", tmp_path, stage=1).stage == 1


def test_stage2_refuses_options_the_prepared_base_decides(tmp_path):
    with pytest.raises(ConfigError, match="stage 2: lora_r, num_experts cannot be set: the prepared stage-2 base decides"):
        load("num_experts: 4\n", tmp_path, argv=["--lora_r", "8"], stage=2)
    assert load("ortho_lambda: 0.5\n", tmp_path, stage=2).ortho_lambda == 0.5


def test_launchers_print_every_option_with_help_and_exit_0(tmp_path):
    import subprocess
    import sys

    from helpers import REPO

    for stage in (1, 2):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / f"stage{stage}.py"), "--help"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "--lr (default: 0.0002)" in proc.stdout and "--packing {auto|on|off}" in proc.stdout
        assert ("--num_experts" in proc.stdout) == (stage == 1) and ("--ortho_lambda" in proc.stdout) == (stage == 2)


def test_result_neutral_options_may_change_on_resume_and_the_rest_may_not():
    from medcare_dist.config import RUNTIME_OPTIONS, TrainConfig, resume_differences

    saved = TrainConfig(model="m", data=["d"]).to_dict()
    changed = TrainConfig(model="m", data=["d"], packing="off", grad_bucket_mb=5.0, lm_loss="full", lr=1e-3)
    assert {"packing", "pack_tokens", "grad_bucket_mb", "lm_loss"} <= RUNTIME_OPTIONS
    assert resume_differences(saved, changed) == {"lr": (2e-4, 1e-3)}


def test_ds_config_is_a_path_or_a_packaged_name_from_any_directory(tmp_path, monkeypatch):
    from medcare_dist.config import ConfigError
    from medcare_dist.resources import DS_CONFIG_DIR, resolve_ds_config

    monkeypatch.chdir(tmp_path)
    for name in ("zero3", "zero3.json", "ds_configs/zero3.json"):
        assert resolve_ds_config(name) == DS_CONFIG_DIR / "zero3.json"
    own = tmp_path / "ds_configs" / "zero3.json"  # a file of the user's own wins over the packaged one
    own.parent.mkdir()
    own.write_text("{}")
    assert resolve_ds_config("ds_configs/zero3.json") == own
    own.write_text("{not json")
    with pytest.raises(ConfigError, match=r"DeepSpeed config .*zero3.json is not valid JSON"):
        TrainConfig(model="m", data=["d"], ds_config=str(own)).validate()
    with pytest.raises(ConfigError, match="DeepSpeed config not found: nope.json .*zero3, zero3_node_local, zero3_offload"):
        TrainConfig(model="m", data=["d"], ds_config="nope.json").validate()
