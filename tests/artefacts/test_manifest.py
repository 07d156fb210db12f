"""Manifests: every artefact says its format and version; those written before format ids
(medcare_dist 0.1.0 until December 2026) still load and convert."""

import json

import pytest
import torch

from helpers import write_stage1_checkpoint, write_stage2_checkpoint
from medcare_dist.artefacts.export import export_merged
from medcare_dist.artefacts.loading import load_trained_model
from medcare_dist.artefacts.manifest import (FORMAT_VERSION, HF_MODEL, STAGE1_CHECKPOINT, STAGE2_BASE, STAGE2_CHECKPOINT,
                                             artefact_kind, read_manifest)
from medcare_dist.artefacts.stage2_base import check_stage2_base, prepare_stage2
from medcare_dist.errors import CheckpointError


def _as_written_before_format_ids(path):
    """Rewrite a manifest as medcare_dist wrote it before format ids: no format fields, a
    stage-2 base named by "kind", a checkpoint by "stage" (and its never-read scheduler.pt)."""
    f = path / "manifest.json"
    manifest = json.loads(f.read_text())
    kind = manifest.pop("format").removeprefix("medcare_dist/")
    manifest.pop("format_version")
    if kind == STAGE2_BASE:
        manifest = {"kind": "medcare_dist/stage2-base", **manifest}
    f.write_text(json.dumps(manifest, indent=2))
    return path


def test_every_artefact_records_its_format_and_version(tiny_model_dir, tmp_path):
    stage1 = write_stage1_checkpoint(tiny_model_dir, tmp_path / "s1")
    base = prepare_stage2(stage1, tmp_path / "base", log=lambda *_: None)
    stage2 = write_stage2_checkpoint(base, tmp_path / "s2")
    for path, kind in ((stage1, STAGE1_CHECKPOINT), (base, STAGE2_BASE), (stage2, STAGE2_CHECKPOINT)):
        raw = json.loads((path / "manifest.json").read_text())
        assert (raw["format"], raw["format_version"]) == (f"medcare_dist/{kind}", FORMAT_VERSION)
        assert artefact_kind(path) == kind
    assert artefact_kind(tiny_model_dir) == HF_MODEL


def test_artefacts_written_before_format_ids_still_load_and_convert(tiny_model_dir, tmp_path):
    stage1 = _as_written_before_format_ids(write_stage1_checkpoint(tiny_model_dir, tmp_path / "s1"))
    assert artefact_kind(stage1) == STAGE1_CHECKPOINT and read_manifest(stage1)["format_version"] == 0
    base = _as_written_before_format_ids(prepare_stage2(stage1, tmp_path / "base", log=lambda *_: None))
    assert artefact_kind(base) == STAGE2_BASE and read_manifest(base)["format_version"] == 0
    check_stage2_base(base)
    stage2 = _as_written_before_format_ids(write_stage2_checkpoint(base, tmp_path / "s2"))
    model, _, adapters = load_trained_model(stage2)
    assert {group for group, _, _ in adapters.items()} == {"knowledge", "alignment"}
    final = export_merged(stage2, tmp_path / "final", dtype="fp32", log=lambda *_: None)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        exported = load_trained_model(final)[0](input_ids=ids).logits
    torch.testing.assert_close(exported, trained, rtol=1e-5, atol=1e-5)


def test_a_newer_or_unknown_format_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    stage1 = write_stage1_checkpoint(tiny_model_dir, tmp_path / "s1")
    manifest = json.loads((stage1 / "manifest.json").read_text())
    (stage1 / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=r"manifest.json: format version 2 is newer .*upgrade medcare_dist"):
        read_manifest(stage1)
    (stage1 / "manifest.json").write_text(json.dumps({**manifest, "format": "medcare_dist/something"}))
    with pytest.raises(CheckpointError, match="unknown format 'medcare_dist/something'"):
        artefact_kind(stage1)
    (stage1 / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json: not valid JSON"):
        read_manifest(stage1)


def test_cli_version_and_manifests_name_the_installed_package_version():
    import importlib.metadata
    import subprocess
    import sys

    from medcare_dist.artefacts.manifest import versions

    installed = importlib.metadata.version("medcare_dist")
    assert versions()["medcare_dist"] == installed
    out = subprocess.run([sys.executable, "-m", "medcare_dist", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"medcare-dist {installed}"
