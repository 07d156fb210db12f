"""Checkpoints: what training changes, in a format that does not depend on the world size.

    output_dir/
      checkpoint-STEP/
        adapters.safetensors   every adapter tensor, full (not sharded), fp32
        optimizer.pt           AdamW state (tensors only; loaded with weights_only=True)
        scheduler.pt           LR scheduler state
        trainer_state.json     step, data position, world size at save
        config.json            the resolved training config
        manifest.json          stage, base model path + fingerprint, adapter layout, versions
      latest                   name of the newest complete checkpoint

The frozen base is never written: the manifest names it by path and fingerprint (the
formats, fingerprints and digests: artefacts.py). Every rank
holds the full adapters and identical optimizer state, so rank 0 writes and any number of
ranks can read. A checkpoint is written under a temporary name and renamed when complete,
and `latest` is replaced atomically after that, so a crash mid-save leaves the previous
checkpoint intact and chosen.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .artefacts import ADAPTERS_FILE, MANIFEST_FILE, read_manifest
from .errors import CheckpointError

LATEST_FILE = "latest"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next global batch
    batch_in_epoch: int = 0  # index of the next global batch within its epoch
    world_size: int = 1  # at save time, for information: resuming on another size is supported


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: Path,
    state: TrainState,
    adapter_tensors: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    config: dict,
    manifest: dict,
    keep_last: int = 0,
) -> Path:
    """Write checkpoint-STEP atomically and point `latest` at it. Call on one rank only."""
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".checkpoint-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in adapter_tensors.items()}, str(tmp / ADAPTERS_FILE))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    _write_json(tmp / "trainer_state.json", asdict(state))
    _write_json(tmp / "config.json", config)
    _write_json(tmp / MANIFEST_FILE, {**manifest, "step": state.step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = output_dir / f".{LATEST_FILE}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, output_dir / LATEST_FILE)
    _fsync_dir(output_dir)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs of interrupted saves are ignored)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and (p / MANIFEST_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """`auto`: the checkpoint `latest` names, else the newest complete one; else a path."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / MANIFEST_FILE).exists():
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {MANIFEST_FILE})")
        return path
    latest = output_dir / LATEST_FILE
    if latest.exists():
        named = output_dir / latest.read_text().strip()
        if (named / MANIFEST_FILE).exists():
            return named
    complete = list_checkpoints(output_dir)
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> dict:
    """Everything a resume needs, loaded safely (safetensors; torch.load with weights_only)."""
    path = Path(path)
    return {
        "adapters": load_file(str(path / ADAPTERS_FILE)),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"),
        "state": TrainState(**json.loads((path / "trainer_state.json").read_text())),
        "manifest": read_manifest(path),
    }
