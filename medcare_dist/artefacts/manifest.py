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
import os
from pathlib import Path

import torch

from medcare_dist.config import TrainConfig
from medcare_dist.errors import CheckpointError, InputNotFoundError, OutputExistsError
from medcare_dist.artefacts.hub import ModelSource, locate, resolve_model

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
    kind = describe(path)
    if kind == "stage2-base" and recorded_scheme_fingerprint(path, manifest) != manifest["base_fingerprint"]:
        raise CheckpointError(f"{path}: the weights or config changed after prepare-stage2 (fingerprint mismatch)")
    if kind in ("stage1-checkpoint", "stage2-checkpoint"):
        check_base(manifest, path)
    return manifest


# --- file digests: what a manifest records of its artefact's files ----------------------------

DIGEST_CACHE = ".medcare_digests.json"  # beside the files it describes: {name: {size, mtime_ns, sha256}}


def _cache_paths(directory: Path) -> list[Path]:
    """Where a dir's digest cache lives: beside the files, else (read-only dir) under the
    user's cache dir, named after the dir's absolute path."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medcare_dist" / "digests"
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return [directory / DIGEST_CACHE, user / f"{key}.json"]


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed; cached per dir, keyed by (size, mtime_ns): an unchanged
    file is not read again, a rewritten one is."""
    path = Path(path)
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    places = _cache_paths(path.parent)
    for place in places:
        entry = _read_cache(place).get(path.name)
        if entry and {k: entry.get(k) for k in key} == key:
            return entry["sha256"]
    digest = stream_sha256(path)
    for place in places:
        cache = _read_cache(place)
        cache[path.name] = {**key, "sha256": digest}
        tmp = place.with_name(f"{place.name}.{os.getpid()}.tmp")
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, place)
            break
        except OSError:  # read-only: the next place
            tmp.unlink(missing_ok=True)
    return digest


def stream_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (never whole into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
    big = manifest.get("kind") == STAGE2_KIND  # weights: through the digest cache
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

    from medcare_dist import __version__

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
