"""What the tests share: paths, ports, launcher runs, artefacts written without training.

Fixtures live in conftest.py; everything else a test file needs from another is here, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
PROBES = REPO / "tests" / "probes"  # scripts the distributed tests start through a launcher
HUB_REPO, HUB_REVISION = "org/tiny", "0123456789abcdef" * 2 + "01234567"
HUB_DATASET = "org/medical-sft"  # the stage-1 sample data as a hub dataset (conftest.hub_env)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fever_record(i: int) -> dict:
    """A short chat record numbered i (the numbers tell records apart after tokenising)."""
    return {"messages": [{"role": "user", "content": f"Question {i} about fever?"},
                         {"role": "assistant", "content": f"Answer {i}: rest and fluids."}]}


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def assert_relative_close(got, want, tol: float, what: str) -> None:
    """Whole-tensor relative difference (sums in another order: elementwise tolerances trip on
    near-zero entries)."""
    err = float((got - want).norm() / want.norm().clamp(min=1e-30))
    assert err <= tol, f"{what}: relative difference {err:.2e} > {tol:.0e}"


def adapter_grads(adapters) -> dict:
    """{name: a copy of its gradient} of every adapter parameter that has one."""
    return {n: p.grad.clone() for n, p in adapters.named_parameters() if p.grad is not None}


def assert_same_loss_and_gradients(results, adapters, loss_rtol: float, grad_rtol: float) -> None:
    """results: [(loss, {name: grad}), (loss, {name: grad})] of two ways to compute the same thing."""
    (want, want_grads), (got, got_grads) = results
    import torch

    torch.testing.assert_close(got, want, rtol=loss_rtol, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == len(list(adapters.parameters()))
    for name, grad in want_grads.items():
        assert_relative_close(got_grads[name], grad, grad_rtol, name)


def stage1_model(model_dir, grad_checkpointing: bool):
    """The tiny model with stage-1 adapters attached (B randomised), in one process, training mode."""
    import torch

    from medcare_dist.artefacts.hf_model import load_frozen_base
    from medcare_dist.config import TrainConfig
    from medcare_dist.method.stage1 import stage1_adapters
    from medcare_dist.training.zero3 import enable_activation_checkpointing

    cfg = TrainConfig(model=str(model_dir), data=["x"], num_experts=4, top_k=2, lora_r=4, lora_dropout=0.1)
    model = load_frozen_base(str(model_dir), None, torch.float32)
    if grad_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    torch.manual_seed(0)
    adapters = stage1_adapters(model, cfg)
    with torch.no_grad():  # B=0 at init would make most gradients trivially equal
        for name, p in adapters.named_parameters():
            if name.endswith(("lora_B", "ka_B", "na_B")):
                p.normal_(std=0.02)
    adapters.attach(model)
    adapters.train()
    return model, adapters


def run_launcher(cmd: list[str], log_path: Path, timeout: float = 600, env: dict | None = None,
                 cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a launcher command (from the repo root unless `cwd` says otherwise), keep its output
    in `log_path`, and fail the test with the tail of that output if it exits non-zero."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        tail = log_path.read_text()[-6000:]
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def _write_checkpoint(stage: int, model_dir: Path, out_dir: Path, seed: int, randomise, **overrides) -> Path:
    """A checkpoint of `stage` on `model_dir` whose adapters are built as the launcher builds
    them and then randomised where `randomise(name)` says: what later steps read, made in a
    second instead of a DeepSpeed run."""
    import torch

    from medcare_dist.artefacts.checkpoint import TrainState, save_checkpoint
    from medcare_dist.artefacts.hf_model import load_frozen_base
    from medcare_dist.artefacts.manifest import base_fingerprint, versions
    from medcare_dist.artefacts.stage2_base import adapters_on_stage2_base
    from medcare_dist.config import TrainConfig
    from medcare_dist.method.stage1 import stage1_adapters

    cfg = TrainConfig(stage=stage, model=str(model_dir), data=["unused"], **overrides)
    model = load_frozen_base(str(model_dir), None, torch.float32)
    torch.manual_seed(seed)
    adapters = (stage1_adapters if stage == 1 else adapters_on_stage2_base)(model, cfg)
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            if randomise(name):
                p.normal_(std=0.05)
    manifest = {"stage": stage, "base_model": str(model_dir), "base_fingerprint": base_fingerprint(model_dir),
                "adapter_layout": adapters.layout(), "versions": versions()}
    return save_checkpoint(Path(out_dir), TrainState(step=1), adapters.flat_state_dict(), {}, cfg.to_dict(), manifest)


def write_stage1_checkpoint(model_dir: Path, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A stage-1 checkpoint with random (non-zero) adapter weights, written without training."""
    return _write_checkpoint(1, model_dir, out_dir, seed, lambda name: name.endswith(("lora_B", "ka_B", "na_B")),
                             **{"num_experts": 4, "lora_r": 4, **overrides})


def write_stage2_checkpoint(stage2_base: Path, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A stage-2 checkpoint with random (non-zero) alignment weights, written without training."""
    return _write_checkpoint(2, stage2_base, out_dir, seed, lambda name: "alignment" in name and name.endswith("lora_B"),
                             **overrides)


def layout_hub_cache(model_dir: Path, cache: Path, repo_id: str, revision: str = HUB_REVISION,
                     repo_type: str = "model") -> tuple[Path, str]:
    """A Hugging Face hub cache holding `model_dir` as `repo_id` at commit `revision`
    (models--org--name/snapshots/REV, refs/main; datasets--... for a dataset), as a download
    would leave it."""
    import shutil

    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return cache, revision


# Tiny models of the families users bring, built from their configs (nothing downloaded):
# {name: (config class, what sets it apart)}. The shapes are shared (`write_family_model`).
FAMILIES = {
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "llama-bias": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 0.3, "query_pre_attn_scalar": 16}),
    "cohere": ("CohereConfig", {"logit_scale": 4.0}),
    "phi3": ("Phi3Config", {}),
}


def write_family_model(out: Path, family: str, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 model of `family` (FAMILIES) with random weights, saved to `out`
    (with the tokenizer of `tokenizer_dir`, whose vocabulary size it takes; else 128 tokens)."""
    import shutil

    import torch
    import transformers

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"] if tokenizer_dir else 128
    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    if tokenizer_dir:
        for path in tokenizer_dir.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy(path, out / path.name)
    return out


# ---------------------------------------------------------------- runs stopped mid-way

def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, deadline: float) -> None:
    """Until metrics.jsonl logs `step` (an AssertionError if the run ends first or `deadline` passes)."""
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before step {step}")
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in time")


def session_processes(leader: int) -> list:
    """The live processes of the session that `leader` started (start_new_session=True)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _descendants(proc: subprocess.Popen) -> list:
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(processes) -> list:
    import psutil

    found = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


@contextlib.contextmanager
def running(cmd, log_path, **env):
    """The launcher started from the repo root in a session of its own (extra environment
    `env`); whatever of the run is still alive when the block ends is killed: its session, and
    the launcher's descendants (torchrun starts each rank in a session of its own)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.descendants = []  # filled by stop(): the launcher's processes seen before it was signalled
    try:
        yield proc
    finally:
        for p in _alive(session_processes(proc.pid) + _descendants(proc) + proc.descendants):
            p.kill()


def stop(proc, sig, whole_group: bool = True) -> list[str]:
    """`sig` to the run's process group (or to the launcher alone); wait for the launcher,
    then up to 30 s for the rest of the run (its session and the launcher's descendants). The
    command lines of what is still running."""
    proc.descendants = _descendants(proc)
    (os.killpg if whole_group else os.kill)(proc.pid, sig)
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while _alive(session_processes(proc.pid) + proc.descendants) and time.time() < deadline:
        time.sleep(0.5)
    return [" ".join(p.cmdline()[:4]) for p in _alive(session_processes(proc.pid) + proc.descendants)]
