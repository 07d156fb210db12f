"""Resume: exact after a SIGKILL and after a SIGTERM (which saves the step reached), atomic
saves, a different world size; no orphaned ranks; one run per output_dir.

The runs train on 29 records with a global batch of 8: every epoch ends with a short batch of
5, and 12 steps cross two epoch ends, so the world-size claim is tested where it is hardest
(pieces that do not split evenly over the ranks; a rank with no piece in some steps)."""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, SAMPLE, free_port, run_launcher, running, stop, wait_for_step
from medcare_dist.artefacts import checkpoint as ckpt_mod
from medcare_dist.artefacts.checkpoint import TrainState, find_resume_checkpoint, load_checkpoint, save_checkpoint
from medcare_dist.errors import CheckpointError

STEPS = 12
RECORDS = 29
ARGS = ["--max_steps", str(STEPS), "--save_every", "4", "--log_every", "1",
        "--global_batch_size", "8", "--micro_batch_size", "2", "--lr", "2e-3", "--max_length", "128",
        "--num_experts", "4", "--lora_r", "4", "--keep_last", "2"]


def stage1_cmd(model_dir, data, out, ranks, port, *extra):
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), "launch/stage1.py",
            "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / f"stage1_{RECORDS}.jsonl"
    path.write_text("\n".join((SAMPLE / "stage1.jsonl").read_text().splitlines()[:RECORDS]) + "\n")
    return path


def final_adapters(out):
    return load_file(str(out / f"checkpoint-{STEPS}" / "adapters.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, uneven_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_launcher(stage1_cmd(tiny_model_dir, uneven_data, out, 2, free_port()), out.parent / "uninterrupted.log")
    return out


@pytest.mark.distributed
def test_sigkill_then_resume_auto_is_bitwise_equal_to_an_uninterrupted_run(uninterrupted, tiny_model_dir, uneven_data, tmp_path):
    seed = int(os.environ.get("MEDCARE_TEST_SEED", time.time_ns() % 2**32))
    kill_step = random.Random(seed).randint(5, 10)
    print(f"killing at step {kill_step} (seed {seed}; MEDCARE_TEST_SEED={seed} repeats it)")
    out = tmp_path / "killed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(stage1_cmd(tiny_model_dir, uneven_data, out, 2, free_port()), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            wait_for_step(out / "metrics.jsonl", kill_step, proc, time.time() + 300)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-step
            proc.wait()
    assert not (out / f"checkpoint-{STEPS}").exists(), f"killed at step {kill_step} (seed {seed}) too late"
    assert find_resume_checkpoint(out, "auto").name in ("checkpoint-4", "checkpoint-8")
    run_launcher(stage1_cmd(tiny_model_dir, uneven_data, out, 2, free_port(), "--resume", "auto"), tmp_path / "resumed.log")
    assert "resumed from" in (tmp_path / "resumed.log").read_text()
    want, got = final_adapters(uninterrupted), final_adapters(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume (killed at step {kill_step})"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS}", "checkpoint-8"]  # keep_last 2


@pytest.mark.distributed
def test_resume_two_ranks_to_one_then_one_to_two_matches_the_uninterrupted_run(uninterrupted, tiny_model_dir, uneven_data, tmp_path):
    one, two = tmp_path / "one_rank", tmp_path / "two_ranks"
    one.mkdir()
    two.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-8", one / "checkpoint-8")
    cmd = stage1_cmd(tiny_model_dir, uneven_data, one, 1, free_port(), "--resume", "auto")
    cmd[cmd.index("--save_every") + 1] = "2"  # an option is given once
    run_launcher(cmd, tmp_path / "one_rank.log")  # steps 9-12 on one rank; step 12 is the epoch's short batch
    assert "saved by 2 rank(s), now 1" in (tmp_path / "one_rank.log").read_text()
    shutil.copytree(one / "checkpoint-10", two / "checkpoint-10")  # steps 9-10 were trained on one rank
    run_launcher(stage1_cmd(tiny_model_dir, uneven_data, two, 2, free_port(), "--resume", "auto"), tmp_path / "two_ranks.log")
    assert "saved by 1 rank(s), now 2" in (tmp_path / "two_ranks.log").read_text()
    want = final_adapters(uninterrupted)
    for label, out in (("2 -> 1", one), ("2 -> 1 -> 2", two)):
        got = final_adapters(out)
        assert got.keys() == want.keys()
        for name in want:
            err = float((got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-12))
            assert err <= 1e-5, f"{label}: {name}: relative difference {err:.2e}"


def test_a_save_interrupted_part_way_leaves_the_previous_checkpoint_chosen(tmp_path, monkeypatch):
    def save(step):
        return save_checkpoint(tmp_path, TrainState(step=step), {"w": torch.full((3,), float(step))}, {"s": step}, {}, {"stage": 1})

    save(1)

    def crash(*args, **kwargs):
        raise OSError("disk full")  # after the adapters were written, before the rest

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(CheckpointError, match="writing checkpoint-2 failed: disk full; the partial save was removed"):
        save(2)
    monkeypatch.undo()
    assert not (tmp_path / ".checkpoint-2.tmp").exists() and not (tmp_path / "checkpoint-2").exists()  # a failed save cleans up
    (tmp_path / ".checkpoint-2.tmp").mkdir()  # what a kill part way leaves
    (tmp_path / ".checkpoint-2.tmp" / "adapters.safetensors").write_bytes(b"partial")
    chosen = find_resume_checkpoint(tmp_path, "auto")
    assert chosen.name == "checkpoint-1"
    assert float(load_checkpoint(chosen)["adapters"]["w"][0]) == 1.0
    save(3)  # a later save works and is chosen
    assert find_resume_checkpoint(tmp_path, "auto").name == "checkpoint-3"
    (tmp_path / "latest").write_text("checkpoint-9\n")  # latest naming something incomplete is never trusted
    assert find_resume_checkpoint(tmp_path, "auto").name == "checkpoint-3"


@pytest.mark.distributed
def test_resume_from_an_older_step_with_a_changed_lr_keeps_the_newest_saves_and_one_record_per_step(uninterrupted, tiny_model_dir,
                                                                                                  uneven_data, tmp_path):
    """The finished run's dir (checkpoints 8 and 12, metrics of steps 1-12) resumed from
    checkpoint-8 on one rank, with a new lr and length accepted by --resume_override."""
    from transformers import get_cosine_schedule_with_warmup

    out = tmp_path / "older"
    shutil.copytree(uninterrupted, out)
    cmd = stage1_cmd(tiny_model_dir, uneven_data, out, 1, free_port(), "--resume", str(out / "checkpoint-8"), "--resume_override",
                     "lr,max_steps")
    cmd[cmd.index("--lr") + 1], cmd[cmd.index("--max_steps") + 1] = "1e-3", "14"
    run_launcher(cmd, tmp_path / "older.log")
    log = (tmp_path / "older.log").read_text()
    assert "resuming with changed option(s) (resume_override): lr: 0.002 -> 0.001; max_steps: 12 -> 14" in log
    assert "metrics.jsonl: dropped 4 record(s) past step 8" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 15))  # one record per step

    def lrs(lr, steps):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=steps)  # warmup ceil(0.03 x steps)
        values = []
        for _ in range(steps):
            opt.step()
            sched.step()
            values.append(sched.get_last_lr()[0])
        return values

    logged = [r["lr"] for r in records]
    assert logged[:8] == pytest.approx(lrs(2e-3, 12)[:8], rel=1e-12)  # the first run's
    assert logged[8:] == pytest.approx(lrs(1e-3, 14)[8:], rel=1e-12)  # the new lr and length took effect
    # saves at 12 (replacing the abandoned run's) and 14; keep_last 2 by save order
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-14"]
    assert (out / "latest").read_text().strip() == "checkpoint-14"
    replaced = load_file(str(out / "checkpoint-12" / "adapters.safetensors"))
    assert any(not torch.equal(replaced[n], t) for n, t in final_adapters(uninterrupted).items())


def assert_same_final_adapters(want_dir, got_dir, what):
    want, got = final_adapters(want_dir), final_adapters(got_dir)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume ({what})"


def stopped_step(out, log_text):
    """The step a stopped run saved: the last one it logged, named by `latest` and the log."""
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (out / "latest").read_text().strip() == f"checkpoint-{step}"
    assert load_checkpoint(out / f"checkpoint-{step}")["state"].step == step
    return step


@pytest.mark.distributed
def test_sigterm_to_the_process_group_saves_the_step_reached_and_resume_auto_is_bitwise_equal(uninterrupted, tiny_model_dir,
                                                                                              uneven_data, tmp_path):
    """What SLURM does at preemption and at the time limit: SIGTERM to every process of the
    job (the deepspeed runner forwards it to the ranks again: one request, not two)."""
    out = tmp_path / "preempted"
    with running(stage1_cmd(tiny_model_dir, uneven_data, out, 2, free_port()), tmp_path / "preempted.log") as proc:
        wait_for_step(out / "metrics.jsonl", 5, proc, time.time() + 300)
        stop(proc, signal.SIGTERM)
    log = (tmp_path / "preempted.log").read_text()
    step = stopped_step(out, log)
    assert 5 <= step < STEPS, log[-3000:]
    assert f"stopped at step {step}/{STEPS} (SIGTERM): checkpoint-{step} saved; exit status 75" in log, log[-3000:]
    assert "exiting now without saving" not in log
    run_launcher(stage1_cmd(tiny_model_dir, uneven_data, out, 2, free_port(), "--resume", "auto"), tmp_path / "resumed.log")
    assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in (tmp_path / "resumed.log").read_text()
    assert_same_final_adapters(uninterrupted, out, f"SIGTERM at step {step}")


@pytest.mark.distributed
def test_sigterm_to_the_runner_alone_leaves_no_rank_running(tiny_model_dir, uneven_data, tmp_path):
    """The runner killed alone used to leave launch.py and both ranks training as orphans:
    each rank watches its launcher, saves the step reached and exits (status 75)."""
    out = tmp_path / "orphaned"
    cmd = stage1_cmd(tiny_model_dir, uneven_data, out, 2, free_port())
    cmd[cmd.index("--max_steps") + 1] = "500"
    with running(cmd, tmp_path / "orphaned.log") as proc:
        wait_for_step(out / "metrics.jsonl", 3, proc, time.time() + 300)
        left = stop(proc, signal.SIGTERM, whole_group=False)
    assert not left, f"still running 30 s after the runner's SIGTERM: {left}"
    log = (tmp_path / "orphaned.log").read_text()
    step = stopped_step(out, log)
    assert f"stopped at step {step}/500 (launcher process {proc.pid} exited)" in log, log[-3000:]


@pytest.mark.distributed
def test_a_second_run_into_a_running_dir_is_refused_naming_the_first(uninterrupted, tiny_model_dir, uneven_data, tmp_path):
    """Two runs started into one output_dir used to both finish, the second's checkpoints
    replacing the first's and metrics.jsonl interleaving both."""
    import sys

    out = tmp_path / "shared"
    cmd = stage1_cmd(tiny_model_dir, uneven_data, out, 2, free_port())
    cmd[cmd.index("--max_steps") + 1] = "400"  # still running when the second run is refused, then stopped by SIGTERM
    with running(cmd, tmp_path / "first.log") as first:
        wait_for_step(out / "metrics.jsonl", 2, first, time.time() + 300)
        holder = json.loads((out / ".medcare.lock").read_text())
        named = f"output_dir {out} is in use by another run (pid {holder['pid']} on host {holder['host']}, started "
        for label, extra in (("fresh", []), ("resume", ["--resume", "auto"])):  # a fresh start and a resume, through the launcher
            second = subprocess.run(stage1_cmd(tiny_model_dir, uneven_data, out, 2, free_port(), *extra), cwd=REPO, capture_output=True,
                                    text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
            assert second.returncode != 0 and named in second.stdout + second.stderr, (label, (second.stdout + second.stderr)[-3000:])
            assert first.poll() is None, "the first run ended before the second was refused"
        stop(first, signal.SIGTERM)
    step = stopped_step(out, (tmp_path / "first.log").read_text())  # the first run's checkpoints and metrics are its own
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, step + 1))
    assert not (out / ".medcare.lock").exists()

    # --resume of another run's checkpoint into this used dir: refused unless --overwrite
    cmd = [sys.executable, "launch/stage1.py", *stage1_cmd(tiny_model_dir, uneven_data, out, 1, 0, "--resume",
                                                           str(uninterrupted / "checkpoint-8"))[6:]]
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"stage 1: error: --resume {uninterrupted / 'checkpoint-8'} continues another run's checkpoint, but output_dir {out} holds "
        f"a different run ({', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))}): choose a new --output_dir, or pass --overwrite "
        "to delete that run first")
