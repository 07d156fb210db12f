import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Qwen2 model, written once per test session by the real CLI."""
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, "-m", "medcare_dist", "tiny-model", "--out", str(out)], check=True, cwd=REPO)
    return out


HUB_REPO, HUB_REVISION = "org/tiny", "0123456789abcdef" * 2 + "01234567"


@pytest.fixture(scope="session")
def hub_env(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny model as the hub model `org/tiny` in an offline Hugging Face cache: the
    environment a run needs to find it (nothing is downloaded)."""
    cache, _ = layout_hub_cache(tiny_model_dir, tmp_path_factory.mktemp("hf") / "hub", HUB_REPO)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def stage1_run(hub_env, tmp_path_factory) -> Path:
    """20 steps of stage 1 on 2 CPU ranks through the deepspeed launcher, on the hub-named
    tiny model (shared by the stage-1 and pipeline tests)."""
    out = tmp_path_factory.mktemp("stage1")
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", "29611", "launch/stage1.py",
        "--model", HUB_REPO, "--data", str(SAMPLE / "stage1.jsonl"),
        "--output_dir", str(out), "--max_steps", "20", "--save_every", "10", "--log_every", "1",
        "--global_batch_size", "8", "--micro_batch_size", "2", "--lr", "2e-3", "--max_length", "256",
        "--num_experts", "4", "--lora_r", "8",
    ]
    run_launcher(cmd, out / "launcher.log", env=hub_env)
    return out


def run_launcher(cmd: list[str], log_path: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command from the repo root, keep its output in `log_path`, and fail the
    test with the tail of that output if it exits non-zero."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        tail = log_path.read_text()[-6000:]
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def write_stage1_checkpoint(model_dir: Path, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A stage-1 checkpoint with random (non-zero) adapter weights, written without training:
    what prepare-stage2 and export read, made in a second instead of a DeepSpeed run."""
    import torch

    from medcare_dist.artefacts.manifest import base_fingerprint, versions
    from medcare_dist.artefacts.checkpoint import TrainState, save_checkpoint
    from medcare_dist.config import TrainConfig
    from medcare_dist.artefacts.hf_model import load_frozen_base
    from medcare_dist.method.stage1 import stage1_adapters

    cfg = TrainConfig(model=str(model_dir), data=["unused"], **{"num_experts": 4, "lora_r": 4, **overrides})
    model = load_frozen_base(str(model_dir), None, torch.float32)
    torch.manual_seed(seed)
    adapters = stage1_adapters(model, cfg)
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            if name.endswith(("lora_B", "ka_B", "na_B")):
                p.normal_(std=0.05)
    manifest = {"stage": 1, "base_model": str(model_dir), "base_fingerprint": base_fingerprint(model_dir),
                "adapter_layout": adapters.layout(), "versions": versions()}
    return save_checkpoint(Path(out_dir), TrainState(step=1), adapters.flat_state_dict(), {}, cfg.to_dict(), manifest)


def write_stage2_checkpoint(stage2_base: Path, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A stage-2 checkpoint with random (non-zero) alignment weights, written without training."""
    import torch

    from medcare_dist.artefacts.manifest import base_fingerprint, versions
    from medcare_dist.artefacts.checkpoint import TrainState, save_checkpoint
    from medcare_dist.config import TrainConfig
    from medcare_dist.artefacts.hf_model import load_frozen_base
    from medcare_dist.artefacts.stage2_base import adapters_on_stage2_base

    cfg = TrainConfig(stage=2, model=str(stage2_base), data=["unused"], **overrides)
    model = load_frozen_base(str(stage2_base), None, torch.float32)
    torch.manual_seed(seed)
    adapters = adapters_on_stage2_base(model, cfg)
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            if "alignment" in name and name.endswith("lora_B"):
                p.normal_(std=0.05)
    manifest = {"stage": 2, "base_model": str(stage2_base), "base_fingerprint": base_fingerprint(stage2_base),
                "adapter_layout": adapters.layout(), "versions": versions()}
    return save_checkpoint(Path(out_dir), TrainState(step=1), adapters.flat_state_dict(), {}, cfg.to_dict(), manifest)


def layout_hub_cache(model_dir: Path, cache: Path, repo_id: str, revision: str = HUB_REVISION) -> tuple[Path, str]:
    """A Hugging Face hub cache holding `model_dir` as `repo_id` at commit `revision`
    (models--org--name/snapshots/REV, refs/main), as a download would leave it."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return cache, revision
