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
