"""Checkpoints: what training changes, in a format that does not depend on the world size.

    output_dir/
      checkpoint-STEP/
        adapters.safetensors   every adapter tensor, full (not sharded), fp32
        optimizer.pt           AdamW state (tensors only; loaded with weights_only=True)
        trainer_state.json     step, data position, world size at save, fp16 loss-scale state
        config.json            the resolved training config
        manifest.json          format id and version, stage, base model path + fingerprint, adapter layout, versions, save order,
                               size and sha256 of every other file (checked before any load)
      latest                   name of the newest complete checkpoint
      metrics.jsonl            one record per logged step (training/metrics.py)

The frozen base is never written: the manifest names it by path and fingerprint (the
formats, fingerprints and digests: manifest.py). Every rank
holds the full adapters and identical optimizer state, so rank 0 writes and any number of
ranks can read. A checkpoint is written under a temporary name and renamed when complete,
and `latest` is replaced atomically after that, so a crash mid-save leaves the previous
checkpoint intact and chosen.

Save order, not step number, says which checkpoint is newest: each manifest records
`save_order` (one more than any other in the dir). After a resume from an older step the new
checkpoints are the newest even where the abandoned run's have higher step numbers; pruning
(`keep_last`) and `--resume auto`'s fallback both go by it, and pruning never removes the
checkpoint just written, which `latest` names.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medcare_dist.artefacts.manifest import ADAPTERS_FILE, checkpoint_kind, new_manifest, CONFIG_FILE, MANIFEST_FILE, read_manifest, record_files, verify_files, write_manifest
from medcare_dist.errors import CheckpointError, OutputDirError, OutputExistsError

LATEST_FILE = "latest"


RUN_OUTPUTS = ("checkpoint-*", LATEST_FILE, "metrics.jsonl", "tensorboard")  # what a training run leaves in output_dir


def previous_run_outputs(output_dir: Path) -> list[Path]:
    """What an earlier run left in `output_dir` (checkpoints, `latest`, metrics), sorted."""
    return sorted(p for pattern in RUN_OUTPUTS for p in Path(output_dir).glob(pattern))


def resumes_from_elsewhere(output_dir: Path, resume: str) -> bool:
    """--resume PATH of a checkpoint that is not in output_dir (another run's)."""
    return bool(resume) and resume != "auto" and Path(resume).resolve().parent != Path(output_dir).resolve()


def check_output_dir(output_dir: Path, resume: str, overwrite: bool) -> None:
    """A fresh run (no --resume), or a resume of another dir's checkpoint, into a dir holding
    another run's checkpoints or metrics would mix or destroy them: refuse, before any
    expensive work, unless --overwrite."""
    if overwrite or resume and not resumes_from_elsewhere(output_dir, resume):
        return
    found = previous_run_outputs(output_dir)
    if found:
        listed = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        if resume:
            raise OutputExistsError(
                f"--resume {resume} continues another run's checkpoint, but output_dir {output_dir} holds a different run "
                f"({listed}): choose a new --output_dir, or pass --overwrite to delete that run first"
            )
        raise OutputExistsError(
            f"output_dir {output_dir} holds an earlier run ({listed}): pass --resume auto to continue it, "
            "choose a new --output_dir, or pass --overwrite to delete it and start again"
        )


def clear_previous_run(output_dir: Path) -> list[str]:
    """--overwrite: delete what an earlier run left (call on one rank, after the inputs were checked)."""
    removed = []
    for p in previous_run_outputs(output_dir):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p.name)
    return removed


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next global batch
    batch_in_epoch: int = 0  # index of the next global batch within its epoch
    world_size: int = 1  # at save time, for information: resuming on another size is supported
    grad_scaler: dict = field(default_factory=dict)  # fp16 dynamic loss scale (torch GradScaler state); {} otherwise


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
    config: dict,
    manifest: dict,
    keep_last: int = 0,
) -> Path:
    """Write checkpoint-STEP atomically and point `latest` at it; then keep the `keep_last`
    newest by save order (0: all). Call on one rank only."""
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".checkpoint-{state.step}.tmp"
    save_order = 1 + max((_save_order(p) for p in list_checkpoints(output_dir)), default=0)
    shutil.rmtree(tmp, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    needed = checkpoint_bytes(adapter_tensors, optimizer_state)
    require_room(output_dir, final.name, needed)
    try:
        tmp.mkdir()
        save_file({k: v.detach().float().cpu().contiguous() for k, v in adapter_tensors.items()}, str(tmp / ADAPTERS_FILE))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        _write_json(tmp / "trainer_state.json", asdict(state))
        _write_json(tmp / CONFIG_FILE, config)
        write_manifest(tmp, {**new_manifest(checkpoint_kind(manifest["stage"]), manifest), "step": state.step, "save_order": save_order,
                             "files": record_files(tmp), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        for f in tmp.iterdir():  # network file systems (NFS, Lustre) report a failed write here, at the latest
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except Exception as err:  # torch.save reports a full disk as a RuntimeError ("unexpected pos ..."), safetensors as its own
        free = shutil.disk_usage(output_dir).free
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < min(needed, 1 << 20):
            raise _no_room(output_dir, final.name, free, needed, "; the partial save was removed",
                           quota=getattr(err, "errno", None) == errno.EDQUOT) from None
        if isinstance(err, OSError):
            raise CheckpointError(f"{output_dir}: writing {final.name} failed: {err.strerror or err}; the partial save "
                                  "was removed, the previous checkpoint and 'latest' are intact") from None
        raise
    replaced = None
    if final.exists():  # an abandoned run's checkpoint of the same step (resumed from an older one)
        replaced = output_dir / f".checkpoint-{state.step}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    latest_tmp = output_dir / f".{LATEST_FILE}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, output_dir / LATEST_FILE)
    _fsync_dir(output_dir)
    if replaced is not None:
        shutil.rmtree(replaced)
    if keep_last > 0:
        older = [p for p in list_checkpoints(output_dir) if p != final]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old)
    return final


def checkpoint_bytes(adapter_tensors: dict[str, torch.Tensor], optimizer_state: dict) -> int:
    """About what a checkpoint takes on disk: its tensors (adapters in fp32), plus 10% and 1 MiB
    for headers, pickling and the small files."""
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    size = sum(t.numel() * 4 for t in adapter_tensors.values()) + sum(t.numel() * t.element_size() for t in tensors(optimizer_state))
    return int(size * 1.1) + (1 << 20)


def require_room(output_dir: Path, name: str, needed: int) -> None:
    """A one-line OutputDirError, before anything is written, when `output_dir` has less free
    space than `needed` bytes."""
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise _no_room(output_dir, name, free, needed, "")


def _no_room(output_dir: Path, name: str, free: int, needed: int, note: str, quota: bool = False) -> OutputDirError:
    why = "over the disk quota" if quota else f"{free:,} bytes free, about {needed:,} needed (disk full)"
    return OutputDirError(f"no room for {name} in {output_dir}: {why}{note}; the previous checkpoint and `latest` are intact")


def _save_order(path: Path) -> int:
    """Position of a checkpoint in its dir's save history (0 for checkpoints that predate it)."""
    try:
        return int(read_manifest(path).get("save_order", 0))
    except (OSError, ValueError):
        return 0


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first by save order (then step, for checkpoints written
    before save order was recorded); temporary dirs of interrupted saves are ignored."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if p.name[len("checkpoint-"):].isdigit() and p.is_dir() and (p / MANIFEST_FILE).exists()]
    return sorted(found, key=lambda p: (_save_order(p), int(p.name.split("-")[1])))


def find_resume_checkpoint(output_dir: Path, resume: str, log=print) -> Path | None:
    """`auto`: the newest intact checkpoint (the one `latest` names, else by save order); a
    corrupt or incomplete one is skipped, and `log` says which and why; None when there is
    none at all, an error when every one is damaged. A path: that checkpoint, which must be
    intact (a one-line CheckpointError otherwise)."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / MANIFEST_FILE).exists():
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {MANIFEST_FILE})")
        verify_files(path)
        return path
    output_dir = Path(output_dir)
    candidates = list_checkpoints(output_dir)[::-1]
    latest = output_dir / LATEST_FILE
    named = output_dir / latest.read_text().strip() if latest.exists() else None
    if named in candidates:
        candidates.insert(0, candidates.pop(candidates.index(named)))
    skipped = [f"{p}: incomplete (no {MANIFEST_FILE})" for p in sorted(output_dir.glob("checkpoint-*"))
               if p.name[len("checkpoint-"):].isdigit() and p.is_dir() and not (p / MANIFEST_FILE).exists()]
    for path in candidates:
        try:
            verify_files(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        for note in skipped:
            log(f"--resume auto: skipped {note}")
        return path
    if skipped:
        raise CheckpointError(f"--resume auto: no intact checkpoint in {output_dir} (" + "; ".join(skipped) + ")")
    return None


def load_checkpoint(path: Path) -> dict:
    """Everything a resume needs, checked against its manifest's digests (this rank's copy),
    loaded safely (safetensors; torch.load with weights_only)."""
    path = Path(path)
    verify_files(path)
    return {
        "adapters": load_file(str(path / ADAPTERS_FILE)),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "state": TrainState(**json.loads((path / "trainer_state.json").read_text())),
        "config": json.loads((path / CONFIG_FILE).read_text()),
        "manifest": read_manifest(path),
    }
