"""Faults and bad input around a run: used output dirs, pruning after a resume from an older
step, metrics after a resume, changed options on resume, ranks that disagree on the
checkpoint, fp16 gradients, a rank that stops answering, a stale JIT lock, a rank that never joins.
docs/reliability.md lists each with the test that covers it."""

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, SAMPLE, free_port, write_stage1_checkpoint, write_stage2_checkpoint
from medcare_dist import files
from medcare_dist.artefacts import manifest as artefacts
from medcare_dist.artefacts.manifest import base_fingerprint
from medcare_dist.artefacts.checkpoint import (
    CheckpointError, TrainState, check_output_dir, clear_previous_run, find_resume_checkpoint, list_checkpoints, load_checkpoint,
    read_manifest, save_checkpoint,
)
from medcare_dist.config import ConfigError, TrainConfig, resume_differences
from medcare_dist.dist import shm_segments
from medcare_dist.dist.jit_lock import clear_stale_locks
from medcare_dist.training.metrics import MetricsReporter
from medcare_dist.training.resume import check_resume_early, check_resumable
from medcare_dist.training.trainer import grad_scaler, optimizer_step

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}




def stage1(model_dir, out, *extra, timeout=120):
    """launch/stage1.py as one plain process: for the checks that must fail before any model load."""
    cmd = [sys.executable, "launch/stage1.py", "--model", str(model_dir), "--data", str(SAMPLE / "stage1.jsonl"),
           "--output_dir", str(out), "--num_experts", "4", "--lora_r", "4", *extra]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    return proc, time.monotonic() - start


# --- output dirs -----------------------------------------------------------------------------

def test_a_fresh_run_into_a_used_dir_is_refused_before_any_model_load(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    ckpt = write_stage1_checkpoint(tiny_model_dir, out)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    proc, _ = stage1(tiny_model_dir, out, "--max_steps", "2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("stage 1: error: output_dir") and "checkpoint-1" in error
    for advice in ("--resume auto", "new --output_dir", "--overwrite"):
        assert advice in error
    assert "Loading weights" not in proc.stderr + proc.stdout and "world size" not in proc.stdout  # nothing expensive ran
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing touched
    check_output_dir(out, "auto", False)  # a resume or --overwrite may use it
    check_output_dir(out, "", True)
    check_output_dir(tmp_path / "new", "", False)
    (tmp_path / "logs_only").mkdir()
    (tmp_path / "logs_only" / "launcher.log").write_text("x")  # files a run does not write are no reason to refuse
    check_output_dir(tmp_path / "logs_only", "", False)
    assert clear_previous_run(out) == ["checkpoint-1", "latest", "metrics.jsonl"]
    assert not ckpt.exists()
    with pytest.raises(ConfigError, match="--overwrite deletes the checkpoints"):
        TrainConfig(model="m", data=["d"], overwrite=True, resume="auto").validate()


def _save(out, step, keep_last):
    return save_checkpoint(out, TrainState(step=step), {"w": torch.full((2,), float(step))}, {}, {}, {"stage": 1},
                           keep_last=keep_last)


def test_keep_last_goes_by_save_order_after_a_resume_from_an_older_step(tmp_path):
    for step in (4, 8, 12):  # the first run: saves at 4, 8, 12
        _save(tmp_path, step, keep_last=3)
    # resumed from checkpoint-4 (say with another save_every): the new saves are the newest,
    # although the abandoned run's 8 and 12 have higher step numbers
    assert _save(tmp_path, 5, keep_last=3).name == "checkpoint-5"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-12", "checkpoint-5"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-5"
    assert find_resume_checkpoint(tmp_path, "auto").name == "checkpoint-5"
    _save(tmp_path, 6, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-6"]
    _save(tmp_path, 8, keep_last=1)  # keep_last 1 keeps the one just written
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-8"]
    assert float(load_file(str(tmp_path / "checkpoint-8" / "adapters.safetensors"))["w"][0]) == 8.0
    # the abandoned run's checkpoint of a step the resumed run saves again is replaced, and is the newest
    for step in (10, 12):
        _save(tmp_path, step, keep_last=0)
    (tmp_path / "checkpoint-12").rename(tmp_path / "checkpoint-12.gone")  # `latest` names a missing checkpoint
    assert find_resume_checkpoint(tmp_path, "auto").name == "checkpoint-10"  # newest by save order, not checkpoint-8
    _save(tmp_path, 9, keep_last=0)
    assert find_resume_checkpoint(tmp_path, "auto").name == "checkpoint-9"
    assert read_manifest(tmp_path / "checkpoint-9")["save_order"] > read_manifest(tmp_path / "checkpoint-10")["save_order"]


def test_metrics_keep_one_record_per_step_after_a_resume(tmp_path):
    reporter = MetricsReporter(tmp_path)
    for step in range(1, 8):
        reporter.write({"step": step, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # cut short by a kill
    assert reporter.rewind(4) == 4
    for step in range(5, 10):
        reporter.write({"step": step, "loss": 0.5})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))
    assert MetricsReporter(tmp_path, enabled=False).rewind(0) == 0  # other ranks touch nothing


# --- verified loads ---------------------------------------------------------------------------

def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)


def test_a_corrupt_truncated_or_incomplete_newest_checkpoint_is_skipped_saying_why(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=0)
    _flip_bit(tmp_path / "checkpoint-4" / "adapters.safetensors")  # one flipped bit, same size
    notes = []
    assert find_resume_checkpoint(tmp_path, "auto", log=notes.append).name == "checkpoint-3"
    assert notes == [f"--resume auto: skipped {tmp_path / 'checkpoint-4'}: adapters.safetensors does not match the sha256 "
                     "its manifest records (corrupt, or changed since)"]
    optimizer = tmp_path / "checkpoint-3" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-9])  # truncated
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()  # incomplete
    notes = []
    assert find_resume_checkpoint(tmp_path, "auto", log=notes.append).name == "checkpoint-1"
    assert len(notes) == 3 and "optimizer.pt is" in notes[1] and "(truncated or overwritten)" in notes[1]
    assert "trainer_state.json is missing (incomplete artefact)" in notes[2]
    assert float(load_checkpoint(tmp_path / "checkpoint-1")["adapters"]["w"][0]) == 1.0
    with pytest.raises(CheckpointError, match=r"checkpoint-4: adapters.safetensors does not match .* \(corrupt"):
        load_checkpoint(tmp_path / "checkpoint-4")  # what every rank does with the agreed checkpoint
    (tmp_path / "checkpoint-1" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*checkpoint-1: incomplete \\(no manifest.json\\)"):
        find_resume_checkpoint(tmp_path, "auto")  # nothing intact: refused, not a silent fresh start


def test_resume_from_an_explicit_corrupt_checkpoint_is_a_one_line_error(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    ckpt = write_stage1_checkpoint(tiny_model_dir, out)
    _flip_bit(ckpt / "adapters.safetensors")
    proc, _ = stage1(tiny_model_dir, out, "--resume", str(ckpt))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"stage 1: error: {ckpt}: adapters.safetensors does not match the sha256 its manifest records (corrupt, or changed since)")
    assert "Loading weights" not in proc.stderr + proc.stdout


def test_a_changed_base_at_the_same_path_is_refused_by_every_later_step(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from medcare_dist.artefacts.export import export_merged
    from medcare_dist.artefacts.stage2_base import prepare_stage2
    from medcare_dist.artefacts.loading import load_trained_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    first, other = write_stage1_checkpoint(base, tmp_path / "a", seed=0), write_stage1_checkpoint(base, tmp_path / "b", seed=1)
    stage2_base = tmp_path / "stage2-base"
    prepare_stage2(first, stage2_base, log=lambda *_: None)
    stage2_ckpt = write_stage2_checkpoint(stage2_base, tmp_path / "run2")
    load_trained_model(stage2_ckpt)  # fine while the base is the one it was trained on
    shutil.rmtree(stage2_base)
    prepare_stage2(other, stage2_base, log=lambda *_: None)  # another stage-1 checkpoint, same path, same sizes
    with pytest.raises(CheckpointError, match=f"{stage2_ckpt}: its base {stage2_base} changed since it was made"):
        export_merged(stage2_ckpt, tmp_path / "export", log=lambda *_: None)
    with pytest.raises(CheckpointError, match="changed since it was made"):
        load_trained_model(stage2_ckpt)  # what eval loads
    cfg = TrainConfig(stage=2, model=str(stage2_base), data=["unused"], output_dir=str(tmp_path / "run2"), resume="auto")
    with pytest.raises(CheckpointError, match="cannot resume from .*: its base_fingerprint is"):
        check_resume_early(cfg, base_fingerprint(stage2_base))  # a stage-2 resume
    weights = load_file(str(base / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1.0  # the stage-1 base edited in place: same file size
    size = (base / "model.safetensors").stat().st_size
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert (base / "model.safetensors").stat().st_size == size
    with pytest.raises(CheckpointError, match=f"{first}: its base {base} changed since it was made"):
        prepare_stage2(first, tmp_path / "stage2-again", log=lambda *_: None)
    saved = {"stage": 1, "base_checksum": 1234.5}
    with pytest.raises(CheckpointError, match="the loaded base's weights sum to 1235.5, the checkpoint's base to 1234.5"):
        check_resumable(tmp_path, {}, saved, TrainConfig(), {"stage": 1, "base_checksum": 1235.5})  # a resume compares it too
    check_resumable(tmp_path, {}, saved, TrainConfig(), {"stage": 1, "base_checksum": 1234.5 * (1 + 1e-12)})  # rounding: fine


def test_the_base_fingerprint_streams_each_file_once_and_caches_it_elsewhere_for_a_read_only_dir(tiny_model_dir, tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns(files.DIGEST_CACHE))
    reads = []
    real = files.stream_sha256
    monkeypatch.setattr(files, "stream_sha256", lambda path: reads.append(path.name) or real(path))
    first = base_fingerprint(base)
    assert reads == ["model.safetensors"] and (base / files.DIGEST_CACHE).is_file()
    assert base_fingerprint(base) == first and reads == ["model.safetensors"]  # cached: no second read
    weights = load_file(str(base / "model.safetensors"))
    weights[sorted(weights)[0]].view(-1)[0] += 1.0
    from safetensors.torch import save_file

    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})  # new mtime: read again
    assert base_fingerprint(base) != first and reads == ["model.safetensors"] * 2
    # a dir where the cache cannot be written (a directory in its way stands in for a read-only
    # mount, which root would ignore): the cache goes under XDG_CACHE_HOME
    ro = tmp_path / "read-only"
    shutil.copytree(tiny_model_dir, ro, ignore=shutil.ignore_patterns(files.DIGEST_CACHE))
    (ro / files.DIGEST_CACHE).mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    reads.clear()
    assert base_fingerprint(ro) == base_fingerprint(ro) and reads == ["model.safetensors"]
    assert len(list((tmp_path / "user-cache" / "medcare_dist" / "digests").glob("*.json"))) == 1


# --- changed options on resume -------------------------------------------------------------------

def test_resume_refuses_changed_training_options_listing_each(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    write_stage1_checkpoint(tiny_model_dir, out)  # saved with global_batch_size 16, seed 42, lr 2e-4, top_k 2
    proc, seconds = stage1(tiny_model_dir, out, "--resume", "auto", "--global_batch_size", "8", "--seed", "1",
                           "--lr", "1e-3", "--top_k", "1", "--log_every", "3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    for change in ("global_batch_size: 16 -> 8", "lr: 0.0002 -> 0.001", "seed: 42 -> 1", "top_k: 2 -> 1"):
        assert change in error, error
    assert "log_every" not in error  # runtime options may change
    assert error.endswith("--resume_override global_batch_size,lr,seed,top_k")
    assert "Loading weights" not in proc.stderr + proc.stdout

    saved = json.loads((out / "checkpoint-1" / "config.json").read_text())
    cfg = TrainConfig(**{**saved, "lr": 1e-3, "max_steps": 40, "resume_override": ["lr", "max_steps"], "output_dir": "elsewhere"})
    assert set(resume_differences(saved, cfg)) == {"lr", "max_steps"}
    notes = []
    check_resumable(out / "checkpoint-1", saved, {"stage": 1}, cfg, {"stage": 1}, log=notes.append)
    assert notes == ["resuming with changed option(s) (resume_override): lr: 0.0002 -> 0.001; max_steps: -1 -> 40"]
    del saved["top_k"]  # a checkpoint that predates an option compares as its default
    assert resume_differences(saved, cfg).keys() == {"lr", "max_steps"}
    manifest = {"stage": 1, "data_fingerprint": "aaaa", "num_records": 320}
    with pytest.raises(CheckpointError, match=r"data: '320 records, fingerprint aaaa' -> '300 records, fingerprint bbbb'"):
        check_resumable(out, saved, manifest, cfg, {"stage": 1, "data_fingerprint": "bbbb", "num_records": 300})
    with pytest.raises(ConfigError, match="resume_override: unknown option"):
        TrainConfig(model="m", data=["d"], resume_override=["learning_rate"]).validate()


def test_ranks_that_see_different_checkpoints_refuse_to_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _save(a, 4, 0)
    shutil.copytree(a, b)
    _save(a, 8, 0)  # rank 0's filesystem has a newer checkpoint than rank 1's copy

    def run(dirs):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "tests/probes/resume_agreement_probe.py", *map(str, dirs)], cwd=REPO,
                                  env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
        return [p.communicate(timeout=120)[0] for p in procs]

    agreed = run([a, a])
    assert all("agreed on checkpoint-8" in out for out in agreed), agreed
    differ = run([a, b])
    for out in differ:  # every rank refuses, and says which rank sees what
        assert re.search(r"CheckpointError: rank 0 resumes from .*checkpoint-8 \(identity \w+\) but rank 1 sees missing", out), out


# --- fp16 -------------------------------------------------------------------------------------

def _fp16_setup(tiny_model_dir):
    from medcare_dist.artefacts.hf_model import load_frozen_base
    from medcare_dist.method.stage1 import stage1_adapters

    cfg = TrainConfig(model=str(tiny_model_dir), data=["-"], num_experts=2, top_k=2, lora_r=4, lora_dropout=0.0, dtype="fp16",
                      ds_config=str(REPO / "ds_configs" / "zero3.json"))
    torch.manual_seed(0)
    adapters = stage1_adapters(load_frozen_base(cfg.model, None, torch.float32), cfg)
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            if name.endswith(("lora_B", "ka_B", "na_B")):
                p.normal_(std=0.02)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(1))
    return cfg, adapters, ids


def _with_adapters(cfg, adapters, dtype):
    from medcare_dist.artefacts.hf_model import load_frozen_base

    model = load_frozen_base(cfg.model, None, dtype)
    adapters.attach(model)
    return model


def _backward(model, adapters, ids, scaler):
    """One micro-batch as the trainer does it: summed token loss over the token count of a
    global batch of 128 x 1024 tokens (this micro-batch is a small piece of it)."""
    from medcare_dist.training.lm_loss import causal_lm_loss_sum

    scaler.scale(causal_lm_loss_sum(model(input_ids=ids).logits, ids) / (128 * 1024)).backward()
    return adapters.trainable_parameters()


def test_fp16_gradients_match_fp32_with_dynamic_loss_scaling(tiny_model_dir):
    cfg, adapters, ids = _fp16_setup(tiny_model_dir)
    fp32_cfg = TrainConfig(model=cfg.model, data=["-"], dtype="fp32")

    def gradients(model, own, scaler):
        params = _backward(model, own, ids, scaler)
        scaler.unscale_(torch.optim.SGD(params, lr=0.0))
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        for p in params:
            p.grad = None
        return grads

    ref_adapters, fp16_adapters = copy.deepcopy(adapters), copy.deepcopy(adapters)
    want = gradients(_with_adapters(cfg, ref_adapters, torch.float32), ref_adapters, grad_scaler(fp32_cfg, torch.device("cpu")))
    fp16 = _with_adapters(cfg, fp16_adapters, torch.float16)
    scaled = gradients(fp16, fp16_adapters, grad_scaler(cfg, torch.device("cpu")))
    unscaled = gradients(fp16, fp16_adapters, grad_scaler(fp32_cfg, torch.device("cpu")))  # a disabled scaler: plain backward
    err = float((scaled - want).norm() / want.norm())
    err_unscaled = float((unscaled - want).norm() / want.norm())
    assert err < 1e-2, f"fp16 with loss scaling: {err:.2%} off fp32"
    assert err_unscaled > 0.1, f"positive control: without scaling fp16 gradients underflow ({err_unscaled:.2%} off)"


def test_fp16_overflow_skips_the_step_halves_the_scale_and_grows_back(tiny_model_dir, tmp_path):

    cfg, adapters, ids = _fp16_setup(tiny_model_dir)
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["fp16"] |= {"initial_scale_power": 33, "loss_scale_window": 2}  # 2**33 overflows fp16 in this backward; 2**30 does not
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    scaler = grad_scaler(TrainConfig(**{**cfg.to_dict(), "ds_config": str(tmp_path / "ds.json")}), torch.device("cpu"))
    model = _with_adapters(cfg, adapters, torch.float16)
    optimizer = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-3)
    history = []
    for _ in range(7):  # 2**33, 2**32, 2**31 overflow; 2**30 twice, then 2**31 again
        before = [p.detach().clone() for p in adapters.parameters()]
        scale = scaler.get_scale()
        _, skipped = optimizer_step(_backward(model, adapters, ids, scaler), optimizer, scaler, 1.0)
        changed = any(not torch.equal(a, b) for a, b in zip(before, adapters.parameters()))
        history.append({"scale": scale, "after": scaler.get_scale(), "skipped": skipped, "changed": changed})
    scales = [(h["scale"], h["skipped"]) for h in history]
    assert history[0]["skipped"] and history[0]["after"] == 2.0 ** 32, scales
    assert all(h["changed"] != h["skipped"] for h in history), scales  # a skipped step leaves the adapters as they were
    assert all(h["after"] == h["scale"] / 2 for h in history if h["skipped"]), scales
    good = [i for i, h in enumerate(history) if not h["skipped"]]
    assert any(i - 1 in good and history[i]["after"] == 2 * history[i]["scale"] for i in good), scales  # grows back
    state = scaler.state_dict()  # what Trainer.save puts in trainer_state.json
    assert state["scale"] == history[-1]["after"] and json.loads(json.dumps(state)) == state


def test_fp16_on_cpu_is_refused_in_one_line_before_loading(tiny_model_dir, tmp_path):
    proc, _ = stage1(tiny_model_dir, tmp_path / "fp16", "--dtype", "fp16")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "stage 1: error: dtype fp16 needs a CUDA GPU: DeepSpeed does not run fp16 on the CPU accelerator; use bf16 or fp32")


# --- no silent waits ------------------------------------------------------------------------------

@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_is_named_within_the_heartbeat_limit(stopped):
    port = free_port()
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MEDCARE_UNRESPONSIVE_S": "3"}
    procs = [subprocess.Popen([sys.executable, "tests/probes/liveness_probe.py", str(stopped)], cwd=REPO, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    survivor, victim = procs[1 - stopped], procs[stopped]
    try:
        out, _ = survivor.communicate(timeout=120)
    finally:
        victim.kill()
        victim.wait()
    assert survivor.returncode == 3, out  # EXIT_PEER_FAILED, long before the 10-minute collective timeout
    waited = float(re.search(r"waiting in a barrier since ([\d.]+)", out).group(1))
    line = next(line for line in out.splitlines() if "has not answered" in line)
    assert f"rank {stopped} (host {socket.gethostname()}, pid {victim.pid}) has not answered for" in line
    assert "SIGSTOP" in line
    named_after = float(re.search(r"has not answered for (\d+) s", line).group(1))
    assert 3 <= named_after <= 10
    assert "the barrier returned" not in out
    assert waited > 0


def _hold(path):
    """A live process holding `path` open, as torch's FileBaton does during a build."""
    return subprocess.Popen([sys.executable, "-c", f"import os,time; fd=os.open({str(path)!r}, os.O_RDONLY); print('held', flush=True); time.sleep(600)"],
                            stdout=subprocess.PIPE, text=True)


def test_a_stale_jit_lock_is_cleared_and_a_held_one_is_reported(tmp_path):
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    held = tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (stale, held):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
        past = time.time() - 3600  # left by a process killed an hour ago
        os.utime(lock, (past, past))
    holder = _hold(held)
    try:
        assert holder.stdout.readline().strip() == "held"
        notes = []
        assert clear_stale_locks(tmp_path, log=notes.append) == [stale]
        assert not stale.exists() and held.exists()
        assert any(f"{held} is held by pid(s) {holder.pid}" in n for n in notes), notes
        assert any(f"removed the stale JIT build lock {stale}" in n and "no process holds it" in n for n in notes), notes
    finally:
        holder.kill()
        holder.wait()
    young = tmp_path / "py311_cpu" / "young" / "lock"  # taken after this process started: a sibling rank's
    young.parent.mkdir()
    young.write_text("")
    # the holder was killed holding its lock: that one is stale now; the young one is left alone
    assert clear_stale_locks(tmp_path, log=notes.append) == [held] and young.exists()


def _stale_segment(name: str, mapped: bool):
    """A DeepSpeed all-reduce segment in /dev/shm from an hour ago; `mapped`: a live process maps it."""
    path = shm_segments.SHM_DIR / f"{shm_segments.PREFIX}_{os.getuid()}_test-{os.getpid()}_{name}_0"
    path.write_bytes(b"\0" * 4096)
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    if not mapped:
        return path, None
    code = f"import mmap,time; f=open({str(path)!r},'r+b'); m=mmap.mmap(f.fileno(), 4096); print('mapped', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "mapped"
    return path, holder


def test_a_shm_segment_no_process_maps_is_removed_and_a_mapped_or_young_one_kept():
    stale, _ = _stale_segment("stale", mapped=False)
    in_use, holder = _stale_segment("in-use", mapped=True)
    try:
        notes = []
        removed = shm_segments.clear_stale_segments(time.time(), log=notes.append)
        assert stale in removed and in_use not in removed and in_use.exists() and not stale.exists()
        assert any(f"removed {stale} (0 MiB of RAM)" in n for n in notes), notes
        assert shm_segments.clear_stale_segments(time.time() - 7200) == []  # both younger than that start: a sibling's
    finally:
        holder.kill()
        holder.wait()
        in_use.unlink()


@pytest.mark.distributed
def test_through_the_launcher_a_stale_jit_lock_is_cleared_and_a_stopped_rank_is_named(tiny_model_dir, tmp_path):
    """deepspeed --num_gpus 2: the shared-memory comm op's build dir holds a lock left by a killed
    process (without the fix every rank waits on it forever); then rank 1 is SIGSTOPped mid-run.
    Killed at the end, the run leaves no all-reduce segment in /dev/shm (RAM) behind, and its
    start removed one that an earlier killed run left."""
    from medcare_dist.dist.jit_lock import extensions_root

    ext = tmp_path / "torch_extensions"
    if extensions_root().is_dir():  # the op already built: copied, so that no rebuild is needed
        shutil.copytree(extensions_root(), ext, symlinks=True, ignore=shutil.ignore_patterns("lock"))
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    os.utime(lock, (time.time() - 600, time.time() - 600))
    out, log_path = tmp_path / "run", tmp_path / "run.log"
    left_behind, _ = _stale_segment("killed-run", mapped=False)
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/stage1.py", "--model", str(tiny_model_dir),
           "--data", str(SAMPLE / "stage1.jsonl"), "--output_dir", str(out), "--max_steps", "500", "--log_every", "1",
           "--global_batch_size", "4", "--micro_batch_size", "2", "--max_length", "64", "--num_experts", "2", "--lora_r", "2",
           "--timeout_minutes", "10"]
    env = {**ENV, "TORCH_EXTENSIONS_DIR": str(ext), "MEDCARE_UNRESPONSIVE_S": "10"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 400
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
        text = log_path.read_text()
        assert f"removed the stale JIT build lock {lock}" in text and not lock.exists()
        assert f"removed {left_behind}" in text and not left_behind.exists()
        pids = dict(re.findall(r"(\d+):[^/,\s]+/(\d+)", re.search(r"rank:host/pid (.*)", text).group(1)))
        victim = int(pids["1"])
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.time()
        wanted = f"rank 1 (host {socket.gethostname()}, pid {victim}) has not answered for"
        while wanted not in log_path.read_text():
            assert time.time() < stopped_at + 120, log_path.read_text()[-4000:]
            time.sleep(0.5)
        named_after = time.time() - stopped_at
        while "exiting with status 3 because rank 1 failed" not in log_path.read_text():  # rank 0, after its grace
            assert time.time() < stopped_at + 180, log_path.read_text()[-4000:]
            time.sleep(0.5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left (nothing, when the launcher ended the job)
        except ProcessLookupError:
            pass
        proc.wait()
    assert not list(shm_segments.SHM_DIR.glob(f"{shm_segments.PREFIX}_*_{port}_*"))  # each rank unlinked its own after the join
    assert named_after < 10 + 60, named_after  # the limit plus slack for these 2 busy cores; the collective timeout is 600 s
    print(f"rank 1 named {named_after:.1f} s after SIGSTOP")


def test_an_artefact_of_an_earlier_version_is_checked_by_its_own_fingerprint_scheme(tiny_model_dir, tmp_path):
    """A stage-1 checkpoint written before manifests listed file digests (fingerprint over
    config, weight names and sizes) still passes on its unchanged base, and fails on a changed one."""
    import hashlib

    from helpers import write_stage1_checkpoint
    from medcare_dist.artefacts.manifest import MANIFEST_FILE, check_base

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    ckpt = write_stage1_checkpoint(base, tmp_path / "stage1")
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    old = hashlib.sha256((base / "config.json").read_bytes())
    old.update(f"model.safetensors:{(base / 'model.safetensors').stat().st_size}".encode())
    manifest = {k: v for k, v in manifest.items() if k != "files"} | {"base_fingerprint": old.hexdigest()[:16]}
    assert check_base(manifest, ckpt) == base
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(CheckpointError, match="changed since it was made"):
        check_base(manifest, ckpt)


def test_ranks_waiting_for_a_rank_that_never_starts_name_it_until_the_timeout(tiny_model_dir, tmp_path):
    """Ranks 0 and 1 of a world of 3 whose rank 2 never starts: each notes at every interval
    that rank 2 has not arrived (rank 1, which did, is not named), then one line at the
    collective timeout (not 30 silent minutes)."""
    port = str(free_port())
    cmd = [sys.executable, "launch/stage1.py", "--model", str(tiny_model_dir), "--data", str(SAMPLE / "stage1.jsonl"),
           "--output_dir", str(tmp_path / "out"), "--num_experts", "4", "--lora_r", "4", "--timeout_minutes", "0.15",
           "--global_batch_size", "3", "--micro_batch_size", "1"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "MEDCARE_JOIN_NOTE_S": "2"})
             for rank in (0, 1)]
    for rank, proc in enumerate(procs):
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 2, stderr[-3000:]
        notes = re.findall(rf"rank {rank} on host {socket.gethostname()}: still waiting for all 3 ranks to join at 127.0.0.1:\d+ "
                           r"\((\d+) s of the 9 s timeout\): ranks not yet arrived: (\S+) ", stderr)
        assert len(notes) >= 2 and all(missing == "2" for _, missing in notes), stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith(f"stage 1: error: rank {rank} of 3 on host"), stderr[-3000:]