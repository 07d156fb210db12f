"""Session fixtures: the tiny model, it as a hub model, one stage-1 run. Helpers: helpers.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HUB_DATASET, HUB_REPO, REPO, SAMPLE, free_port, layout_hub_cache, run_launcher

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # the tests run Triton kernels (routed_compute fused) on CPU tensors


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """The tokenised-data cache of every run the tests start (launchers inherit the
    environment): the session's own, never the user's Hugging Face datasets cache."""
    path = tmp_path_factory.mktemp("hf-datasets")
    os.environ["HF_DATASETS_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Qwen2 model, written once per test session by the real CLI."""
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, "-m", "medcare_dist", "tiny-model", "--out", str(out)], check=True, cwd=REPO)
    return out


@pytest.fixture(scope="session")
def hub_env(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny model as the hub model `org/tiny` and the stage-1 sample data as the hub
    dataset `org/medical-sft` (its train.jsonl) in an offline Hugging Face cache: the
    environment a run needs to find them (nothing is downloaded)."""
    cache, _ = layout_hub_cache(tiny_model_dir, tmp_path_factory.mktemp("hf") / "hub", HUB_REPO)
    dataset = tmp_path_factory.mktemp("dataset_repo")
    shutil.copyfile(SAMPLE / "stage1.jsonl", dataset / "train.jsonl")
    layout_hub_cache(dataset, cache, HUB_DATASET, repo_type="dataset")
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def stage1_run(hub_env, tmp_path_factory) -> Path:
    """20 steps of stage 1 on 2 CPU ranks through the deepspeed launcher, on the hub-named
    tiny model and hub-named sample data (shared by the stage-1 and pipeline tests). Started
    from a directory outside the checkout with no --ds_config: the packaged config is found
    through the package."""
    out = tmp_path_factory.mktemp("stage1")
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "stage1.py"),
        "--model", HUB_REPO, "--data", HUB_DATASET,
        "--output_dir", str(out), "--max_steps", "20", "--save_every", "10", "--log_every", "1",
        "--global_batch_size", "8", "--micro_batch_size", "2", "--lr", "2e-3", "--max_length", "256",
        "--num_experts", "4", "--lora_r", "8",
    ]
    run_launcher(cmd, out / "launcher.log", env=hub_env, cwd=tmp_path_factory.mktemp("elsewhere"))
    return out
