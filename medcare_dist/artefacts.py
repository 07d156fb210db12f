"""The pipeline's on-disk formats, in one place: the only reader and writer of manifests.

Artefacts flow one way: stage-1 checkpoint -> stage-2 base (HF) + knowledge adapter ->
stage-2 checkpoint -> final HF model. Each is a directory, recognised by `describe`:

    "hf"                 no manifest.json: a Hugging Face model dir (or the export's output)
    "stage1-checkpoint"  manifest.json with "stage": 1, and adapters.safetensors
    "stage2-base"        manifest.json with "kind": STAGE2_KIND, and knowledge_adapter.safetensors
    "stage2-checkpoint"  manifest.json with "stage": 2, and adapters.safetensors

A checkpoint's other files are described in checkpoint.py, a stage-2 base's in convert.py.
Adapter tensors are named "{group}.{target}.{param}" in a checkpoint (group: attn_lora,
molora, knowledge, alignment; target: the dotted path of the base Linear; param: lora_A,
lora_B, ka_A, ...) and "{target}.{param}" in a stage-2 base's knowledge adapter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import CheckpointError, OutputExistsError
from .hub import ModelSource, locate, resolve_model

ADAPTERS_FILE = "adapters.safetensors"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"  # a checkpoint's resolved training config
KNOWLEDGE_FILE = "knowledge_adapter.safetensors"
STAGE2_KIND = "medcare_dist/stage2-base"


# --- manifests ---------------------------------------------------------------------------

def read_manifest(path: str | Path) -> dict:
    f = Path(path) / MANIFEST_FILE
    if not f.exists():
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}; not a medcare_dist artefact")
    return json.loads(f.read_text())


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    (Path(out_dir) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def describe(path: str | Path) -> str:
    """"hf", "stage2-base", "stage1-checkpoint" or "stage2-checkpoint"."""
    root = Path(path)
    if not (root / MANIFEST_FILE).exists():
        return "hf"
    manifest = read_manifest(root)
    if manifest.get("kind") == STAGE2_KIND:
        return "stage2-base"
    if manifest.get("stage") in (1, 2) and (root / ADAPTERS_FILE).exists():
        return f"stage{manifest['stage']}-checkpoint"
    raise CheckpointError(f"{root}: unrecognised manifest (neither a checkpoint nor a stage-2 base)")


def checkpoint_config(checkpoint: str | Path) -> TrainConfig:
    """The resolved training config a checkpoint was made with."""
    return TrainConfig(**json.loads((Path(checkpoint) / CONFIG_FILE).read_text()))


def base_record(source: ModelSource) -> dict:
    """What a checkpoint's manifest says about its base: the absolute local dir, where it
    came from (hub repository and commit, for a hub model) and its fingerprint."""
    return {"base_model": source.path, "base_source": source.to_dict(), "base_fingerprint": base_fingerprint(source.path)}


def base_model_dir(manifest: dict) -> Path:
    """The local dir of the base a manifest records (`hub.locate`: the recorded path, else the
    same hub commit). Manifests written before sources were recorded name only `base_model`."""
    if "base_source" in manifest:
        return locate(manifest["base_source"])
    return Path(resolve_model(manifest["base_model"]).path)


# --- identities: fingerprints, digests, versions --------------------------------------------

def base_fingerprint(model_dir: str | Path) -> str:
    """Cheap identity of an HF model dir: its config plus the names and sizes of its weight
    files (hashing a 28 GB checkpoint on every save would cost minutes)."""
    root = Path(model_dir)
    if not root.is_dir():
        return f"hub:{model_dir}"
    h = hashlib.sha256((root / "config.json").read_bytes() if (root / "config.json").exists() else b"")
    for f in sorted(root.glob("model*.safetensors")) + sorted(root.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def checkpoint_identity(path: str | Path) -> str:
    """What every rank must see alike of the checkpoint it resumes from: the bytes of its
    manifest (step, save order, adapter digest) and the names and sizes of its files;
    "missing" where it has no manifest."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return "missing"
    h = hashlib.sha256((path / MANIFEST_FILE).read_bytes())
    for f in sorted(path.iterdir()):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def data_fingerprint(lengths, label_tokens) -> str:
    """Identity of the training data as the batch plan and the loss see it: the number of
    records and each record's token and label-token count (what a resume must find unchanged;
    cheap, unlike hashing every token)."""
    return hashlib.sha256(json.dumps([list(lengths), list(label_tokens)]).encode()).hexdigest()[:16]


def adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import deepspeed
    import transformers

    from . import __version__

    return {"medcare_dist": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}


# --- adapter tensor names --------------------------------------------------------------------

def adapter_tensor_name(group: str | None, target: str, param: str) -> str:
    """"{group}.{target}.{param}" (a checkpoint), "{target}.{param}" when group is None (a
    stage-2 base's knowledge adapter)."""
    return f"{group}.{target}.{param}" if group else f"{target}.{param}"


def adapter_group(name: str) -> str:
    """The group of a checkpoint's adapter tensor name."""
    return name.split(".", 1)[0]


def lora_pairs(tensors: dict[str, torch.Tensor], group: str, a_name: str = "lora_A", b_name: str = "lora_B") -> dict[str, tuple]:
    """{target: (A, B)} for one adapter group of a checkpoint's flat tensors (a MoLoRA's
    Knowledge Aggregator: a_name="ka_A", b_name="ka_B")."""
    prefix, suffix = f"{group}.", f".{a_name}"
    return {
        name[len(prefix):-len(suffix)]: (t, tensors[name[: -len(suffix)] + f".{b_name}"])
        for name, t in tensors.items()
        if name.startswith(prefix) and name.endswith(suffix)
    }


# --- outputs ---------------------------------------------------------------------------------

def require_output_dir(out_dir: str | Path) -> Path:
    """An output directory path must be a directory or not exist yet (not a file)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output directory {out} is a file; give a directory path")
    return out


def require_empty_dir(out_dir: str | Path) -> Path:
    """Outputs are never written over: the directory must be new or empty."""
    out = require_output_dir(out_dir)
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"output directory {out} exists and is not empty")
    return out
