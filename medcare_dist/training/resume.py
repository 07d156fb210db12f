"""Whether and from where a run resumes: rank 0 picks the checkpoint and every rank checks
that it sees the same one; the checkpoint must belong to this run (stage, base, data, and the
training-defining options, except those the user names in `resume_override`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from medcare_dist.dist import process_group as dist_utils
from medcare_dist.artefacts.manifest import CONFIG_FILE, checkpoint_identity, read_manifest
from medcare_dist.artefacts.checkpoint import find_resume_checkpoint
from medcare_dist.config import TrainConfig, resume_differences
from medcare_dist.errors import CheckpointError


def agreed_resume_checkpoint(output_dir: Path, resume: str, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from, picked by rank 0 (find_resume_checkpoint); every rank
    checks that it sees the same one (same manifest, same files), so that ranks on different
    filesystems cannot resume from different states. Call on every rank."""
    choice = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            path = find_resume_checkpoint(Path(output_dir), resume, log=log)
            # a checkpoint in output_dir is named relative to it: each rank looks in its own output_dir
            name = None if path is None else path.name if path.parent == Path(output_dir) else str(path)
            choice = {"path": name, "identity": None if path is None else checkpoint_identity(path)}
        except CheckpointError as err:
            choice = {"error": str(err)}
    choice = dist_utils.gather_objects(choice)[0]
    if "error" in choice:
        raise CheckpointError(choice["error"])
    path = None if choice["path"] is None else Path(output_dir) / choice["path"]  # (an absolute path stays itself)
    seen = dist_utils.gather_objects(None if path is None else checkpoint_identity(path))
    differ = [f"rank {r} sees {v}" for r, v in enumerate(seen) if v != choice["identity"]]
    if differ:
        raise CheckpointError(
            f"rank 0 resumes from {path} (identity {choice['identity']}) but {', '.join(differ)}: every rank must "
            "see the same output_dir (a shared filesystem, or the same copy on every node)"
        )
    return path


def check_resumable(path: Path, saved_config: dict, saved_manifest: dict, cfg: TrainConfig, current: dict,
                    log: Callable[[str], None] = print) -> None:
    """A checkpoint may be resumed by this run: same stage and (where `current` has them)
    base fingerprint, base checksum (the loaded weights' sum) and data fingerprint, and the
    same training-defining options, except those named in cfg.resume_override (logged).
    Otherwise a CheckpointError listing every difference."""
    for key in ("stage", "base_fingerprint"):
        if key in current and saved_manifest.get(key) != current[key]:
            raise CheckpointError(f"cannot resume from {path}: its {key} is {saved_manifest.get(key)!r}, this run's is {current[key]!r}")
    saved_sum, this_sum = saved_manifest.get("base_checksum"), current.get("base_checksum")
    if saved_sum is not None and this_sum is not None and not math.isclose(saved_sum, this_sum, rel_tol=1e-9, abs_tol=1e-6):
        raise CheckpointError(f"cannot resume from {path}: the loaded base's weights sum to {this_sum!r}, the checkpoint's base to "
                              f"{saved_sum!r}: not the base it was trained on")
    diffs = resume_differences(saved_config, cfg)
    if "data_fingerprint" in current and saved_manifest.get("data_fingerprint", current["data_fingerprint"]) != current["data_fingerprint"]:
        diffs["data"] = (f"{saved_manifest.get('num_records')} records, fingerprint {saved_manifest['data_fingerprint']}",
                         f"{current['num_records']} records, fingerprint {current['data_fingerprint']}")
    allowed = {k: v for k, v in diffs.items() if k in cfg.resume_override}
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
        raise CheckpointError(
            f"cannot resume from {path}: training options differ from the checkpoint's ({listed}); resume with the "
            f"checkpoint's values, or accept the change with --resume_override {','.join(sorted(refused))}"
        )
    if allowed:
        log("resuming with changed option(s) (resume_override): " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(allowed.items())))


def check_resume_early(cfg: TrainConfig, base_fingerprint: str) -> None:
    """Before any expensive work: the checkpoint a resume would pick (as this rank sees the
    output dir) fits this config. The trainer checks again, data included, on the checkpoint
    all ranks agree on."""
    if not cfg.resume:
        return
    path = find_resume_checkpoint(Path(cfg.output_dir), cfg.resume, log=lambda *_: None)  # rank 0 says what it skips, later
    if path is not None:
        saved_config = json.loads((path / CONFIG_FILE).read_text())
        check_resumable(path, saved_config, read_manifest(path), cfg, {"stage": cfg.stage, "base_fingerprint": base_fingerprint},
                        log=lambda *_: None)
