"""A full disk at a save, for real: a small tmpfs (mounting needs root)."""

import errno
import os
import subprocess

import pytest
import torch

from medcare_dist.artefacts.checkpoint import TrainState, find_resume_checkpoint, load_checkpoint, save_checkpoint
from medcare_dist.errors import CheckpointError, OutputDirError


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 4 MiB tmpfs (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def save(out, step, floats, optimizer_state=None):
    return save_checkpoint(out, TrainState(step=step), {"w": torch.full((floats,), float(step))}, optimizer_state or {"s": step}, {},
                           {"stage": 1})


def test_a_save_with_no_room_is_refused_before_writing_and_a_full_disk_mid_write_is_named(small_disk):
    save(small_disk, 1, 250_000)  # 1 MB of adapters: fits
    with pytest.raises(OutputDirError, match=rf"^no room for checkpoint-2 in {small_disk}: [\d,]+ bytes free, about [\d,]+ needed "
                                             r"\(disk full\); the previous checkpoint and `latest` are intact$"):
        save(small_disk, 2, 1_000_000)  # 4 MB: refused by the free-space check, nothing written
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint-1", "latest"]
    # state the size estimate cannot see (not tensors) fills the disk during the write: reported the same way
    with pytest.raises(OutputDirError, match=r"needed \(disk full\); the partial save was removed; the previous checkpoint"):
        save(small_disk, 3, 1_000, optimizer_state={"history": [0.5 + i for i in range(1_000_000)]})
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint-1", "latest"]
    chosen = find_resume_checkpoint(small_disk, "auto")
    assert chosen.name == "checkpoint-1" and float(load_checkpoint(chosen)["adapters"]["w"][0]) == 1.0


def test_a_resume_on_a_full_disk_is_one_line(small_disk):
    from medcare_dist.artefacts.checkpoint import require_room
    from medcare_dist.training.metrics import MetricsReporter

    metrics = small_disk / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}}}\n' for s in (1, 2, 3)))
    with open(small_disk / "filler", "wb", buffering=0) as f:  # the disk fills up
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass
    with pytest.raises(OutputDirError, match=rf"^no room for a checkpoint in {small_disk}: [\d,]+ bytes free, about 1,048,588 needed"):
        require_room(small_disk, "a checkpoint", 1_048_588)  # what the trainer checks before its first step
    with pytest.raises(OutputDirError, match=rf"^{metrics}: cannot rewrite it for the resume: No space left on device$"):
        MetricsReporter(small_disk).rewind(1)
    assert metrics.read_text().count("step") == 3  # untouched


@pytest.mark.parametrize("code,error,says", [
    (errno.EDQUOT, OutputDirError, r"no room for checkpoint-2 in .*: over the disk quota; the partial save was removed"),
    (errno.EIO, CheckpointError, r"writing checkpoint-2 failed: Input/output error; the partial save was removed"),
])
def test_a_write_that_fails_at_fsync_is_one_line_and_leaves_no_partial_save(tmp_path, monkeypatch, code, error, says):
    """Network file systems (NFS, Lustre) report a failed write, or a quota, at fsync."""
    save(tmp_path, 1, 10)

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(error, match=says):
        save(tmp_path, 2, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]
