"""Interop: lm-evaluation-harness scores an exported model on a local task file
(data/sample/lm_eval/medcare_sample_exam.yaml), and its per-choice log-likelihoods are the
ones computed here by hand. Needs the optional extra `medcare-dist[lm-eval]`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, SAMPLE, write_stage1_checkpoint, write_stage2_checkpoint

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'medcare-dist[lm-eval]')")

LIMIT = 8


def test_lm_eval_scores_the_exported_model_on_the_local_task(tiny_model_dir, tmp_path):
    from medcare_dist.artefacts.export import export_merged
    from medcare_dist.artefacts.stage2_base import prepare_stage2

    base = prepare_stage2(write_stage1_checkpoint(tiny_model_dir, tmp_path / "stage1"), tmp_path / "stage2-base")
    final = export_merged(write_stage2_checkpoint(base, tmp_path / "stage2"), tmp_path / "final-hf", dtype="fp32",
                          log=lambda *_: None)
    out = tmp_path / "lm-eval"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={final},dtype=float32",
           "--include_path", "data/sample/lm_eval", "--tasks", "medcare_sample_exam", "--device", "cpu",
           "--batch_size", "8", "--limit", str(LIMIT), "--output_path", str(out), "--log_samples"]
    # a plain single-process run: not the launcher variables an in-process eval of another test left behind
    launch_vars = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["medcare_sample_exam"]
    samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    exam = [json.loads(line) for line in (SAMPLE / "exam.jsonl").read_text(encoding="utf-8").splitlines()[:LIMIT]]
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = exam[sample["doc_id"]]
        context = doc["question"] + "".join(f"\n{x}. {doc['options'][x]}" for x in "ABCD") + "\nAnswer:"
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        scores = []
        for letter in "ABCD":  # by hand: log p(" X" | context), one unpadded sequence
            whole = tok(context + " " + letter, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(scores, abs=1e-3), (sample["doc_id"], got, scores)
        correct += "ABCD"[scores.index(max(scores))] == doc["answer"]
    assert len(samples) == LIMIT
    assert results["acc,none"] == pytest.approx(correct / LIMIT)
