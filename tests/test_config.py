"""The training config refuses, at load, every value that cannot work, with the option named."""

import pytest

from medcare_dist.config import ConfigError, load_config, parse_overrides

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
