"""The pipeline's artefact manifests: the one reader and writer of manifest.json.

Artefacts flow one way: stage-1 checkpoint -> stage-2 base (HF) + knowledge adapter ->
stage-2 checkpoint -> final HF model. Each is a directory; its kind (`artefact_kind`):

    HF_MODEL           no manifest.json: a Hugging Face model dir (or the export's output)
    STAGE1_CHECKPOINT  format "medcare_dist/stage1-checkpoint", with adapters.safetensors (checkpoint.py)
    STAGE2_BASE        format "medcare_dist/stage2-base", with knowledge_adapter.safetensors (stage2_base.py)
    STAGE2_CHECKPOINT  format "medcare_dist/stage2-checkpoint", with adapters.safetensors

Every manifest carries "format" (the kind's id) and "format_version" (FORMAT_VERSION when
written). Manifests written before format ids (medcare_dist 0.1.0 up to December 2026) are
recognised by their fields, as they were then ("kind": "medcare_dist/stage2-base", or "stage":
1 or 2 beside adapters.safetensors), and read as format_version 0: `read_manifest` returns
every manifest with both fields, so no caller looks at which fields happen to exist.
Adapter tensor names are the adapters' own (adapters/adapter_set.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from medcare_dist.config import TrainConfig
from medcare_dist.errors import CheckpointError, InputNotFoundError
from medcare_dist.files import DIGEST_CACHE, file_sha256, stream_sha256
from medcare_dist.artefacts.hub import ModelSource, locate, resolve_model

ADAPTERS_FILE = "adapters.safetensors"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"  # a checkpoint's resolved training config
KNOWLEDGE_FILE = "knowledge_adapter.safetensors"

HF_MODEL = "hf"
STAGE1_CHECKPOINT = "stage1-checkpoint"
STAGE2_BASE = "stage2-base"
STAGE2_CHECKPOINT = "stage2-checkpoint"
FORMAT_VERSION = 1
_FORMAT_PREFIX = "medcare_dist/"
_LEGACY_STAGE2_KIND = "medcare_dist/stage2-base"  # the "kind" field of a version-0 stage-2 base


def checkpoint_kind(stage: int) -> str:
    return {1: STAGE1_CHECKPOINT, 2: STAGE2_CHECKPOINT}[stage]


def new_manifest(kind: str, fields: dict) -> dict:
    """A manifest of `kind` at the current format version (format fields first)."""
    return {"format": _FORMAT_PREFIX + kind, "format_version": FORMAT_VERSION, **fields}


def read_manifest(path: str | Path) -> dict:
    """The manifest of an artefact dir, with "format" and "format_version" always set."""
    root = Path(path)
    f = root / MANIFEST_FILE
    if not f.exists():
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}; not a medcare_dist artefact")
    try:
        manifest = json.loads(f.read_text())
    except ValueError as err:
        raise CheckpointError(f"{f}: not valid JSON ({err}); the artefact is damaged") from None
    if "format" in manifest:
        kind, version = manifest["format"].removeprefix(_FORMAT_PREFIX), manifest.get("format_version")
        if kind not in (STAGE1_CHECKPOINT, STAGE2_BASE, STAGE2_CHECKPOINT) or not isinstance(version, int):
            raise CheckpointError(f"{f}: unknown format {manifest['format']!r} version {version!r}")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{f}: format version {version} is newer than this medcare_dist reads "
                                  f"({FORMAT_VERSION}): upgrade medcare_dist")
        return manifest
    if manifest.get("kind") == _LEGACY_STAGE2_KIND:
        kind = STAGE2_BASE
    elif manifest.get("stage") in (1, 2) and (root / ADAPTERS_FILE).exists():
        kind = checkpoint_kind(manifest["stage"])
    else:
        raise CheckpointError(f"{root}: unrecognised manifest (neither a checkpoint nor a stage-2 base)")
    return {"format": _FORMAT_PREFIX + kind, "format_version": 0, **manifest}


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    (Path(out_dir) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def manifest_kind(manifest: dict) -> str:
    return manifest["format"].removeprefix(_FORMAT_PREFIX)


def artefact_kind(path: str | Path) -> str:
    """HF_MODEL, STAGE1_CHECKPOINT, STAGE2_BASE or STAGE2_CHECKPOINT."""
    if not (Path(path) / MANIFEST_FILE).exists():
        return HF_MODEL
    return manifest_kind(read_manifest(path))


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
    """Identity of an HF model dir by content: its config.json and the sha256 of every weight
    file (model*.safetensors, *.bin). Each file is streamed once; its digest is cached,
    keyed by size and mtime (`file_sha256`), so later checks cost a stat per file."""
    root = Path(model_dir)
    if not root.is_dir():
        raise InputNotFoundError(f"model directory not found: {root}")
    h = hashlib.sha256((root / "config.json").read_bytes() if (root / "config.json").exists() else b"")
    for f in sorted(root.glob("model*.safetensors")) + sorted(root.glob("*.bin")):
        h.update(f"{f.name}:{file_sha256(f)}".encode())
    return h.hexdigest()[:16]


def recorded_scheme_fingerprint(model_dir: str | Path, manifest: dict) -> str:
    """`model_dir`'s fingerprint as `manifest` computed it: by content, or, for an artefact
    written by an earlier medcare_dist (its manifest lists no file digests), by config.json and
    the weight files' names and sizes, so that its stage-1 run is not lost to the upgrade."""
    if "files" in manifest:
        return base_fingerprint(model_dir)
    root = Path(model_dir)
    h = hashlib.sha256((root / "config.json").read_bytes() if (root / "config.json").exists() else b"")
    for f in sorted(root.glob("model*.safetensors")) + sorted(root.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def check_base(manifest: dict, artefact: str | Path) -> Path:
    """The base dir a manifest records, refused if its content changed since `artefact` was
    made (a prepared stage-2 base is also checked against its own manifest's digests)."""
    base = base_model_dir(manifest)
    found = recorded_scheme_fingerprint(base, manifest)
    if found != manifest["base_fingerprint"]:
        raise CheckpointError(f"{artefact}: its base {base} changed since it was made (weights fingerprint {found}, "
                              f"recorded {manifest['base_fingerprint']}): use the base it was made on")
    if (base / MANIFEST_FILE).exists():
        verify_files(base)
    return base


def verify_artefact(path: str | Path) -> dict:
    """Everything a later step checks before it uses an artefact: the digests of its files
    (verify_files); for a prepared stage-2 base, that its weights still have the fingerprint it
    was written with; for a checkpoint, that its base is unchanged (check_base). Returns its
    manifest."""
    manifest = verify_files(path)
    kind = manifest_kind(manifest)
    if kind == STAGE2_BASE and recorded_scheme_fingerprint(path, manifest) != manifest["base_fingerprint"]:
        raise CheckpointError(f"{path}: the weights or config changed after prepare-stage2 (fingerprint mismatch)")
    if kind in (STAGE1_CHECKPOINT, STAGE2_CHECKPOINT):
        check_base(manifest, path)
    return manifest


# --- file digests: what a manifest records of its artefact's files ----------------------------

def record_files(directory: str | Path, cache: bool = False) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of every file of an artefact dir (not the manifest or the
    digest cache): what its manifest records under "files". `cache`: for large weights that
    later steps check again (file_sha256); checkpoints are hashed directly."""
    root = Path(directory)
    files = sorted(f for f in root.iterdir() if f.is_file() and f.name not in (MANIFEST_FILE, DIGEST_CACHE) and not f.name.endswith(".tmp"))
    return {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f) if cache else stream_sha256(f)} for f in files}


def verify_files(directory: str | Path, manifest: dict | None = None) -> dict:
    """Check every file the manifest records: present, the recorded size (else: truncated or
    grown), the recorded sha256 (else: corrupt). Returns the manifest; a CheckpointError
    names the first file at fault. Manifests written before digests were recorded have no
    "files" and pass unchecked."""
    root = Path(directory)
    manifest = read_manifest(root) if manifest is None else manifest
    big = manifest_kind(manifest) == STAGE2_BASE  # weights: through the digest cache
    for name, want in sorted(manifest.get("files", {}).items()):
        f = root / name
        if not f.is_file():
            raise CheckpointError(f"{root}: {name} is missing (incomplete artefact)")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{root}: {name} is {size} bytes, its manifest records {want['size']} (truncated or overwritten)")
        if (file_sha256(f) if big else stream_sha256(f)) != want["sha256"]:
            raise CheckpointError(f"{root}: {name} does not match the sha256 its manifest records (corrupt, or changed since)")
    return manifest


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

    from medcare_dist import package_version

    return {"medcare_dist": package_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
