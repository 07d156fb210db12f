"""Cluster launch paths, for real, on one machine with 2 CPU ranks each:

- two simulated nodes: one `deepspeed --no_ssh --node_rank N` runner per "node" (what a
  scheduler does), one world of 2, one checkpoint;
- plain `mpirun -np 2 python launch/stage1.py` (rank discovery through mpi4py);
- a real one-node SLURM (munge, slurmctld, slurmd started here) running the sbatch template;
- a rank killed mid-training: the whole job ends, non-zero, and the survivors name it;
- launch mistakes that must fail fast and say what is wrong.

Every DeepSpeed start costs tens of seconds on 2 cores, so each test runs a whole scenario.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers import REPO, SAMPLE, free_port, running, stop, wait_for_step

TIMEOUT_MINUTES = 1.0  # the collective timeout the kill tests run under
MARGIN_S = 30  # what "within the timeout" may add for process teardown


@pytest.fixture(scope="module")
def deepspeed_ops_built():
    """DeepSpeed JIT-builds its CPU shared-memory comm op at the first start on a machine
    (about a minute, under a lock): do it once here, so no scenario's rendezvous waits for it."""
    code = ("from medcare_dist.dist.jit_lock import clear_stale_locks; clear_stale_locks(); "
            "from deepspeed.comm.torch import build_shm_op; build_shm_op()")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=launch_env(), check=True, capture_output=True, timeout=600)


def distributed(test):
    """A test that starts real launchers."""
    return pytest.mark.distributed(pytest.mark.usefixtures("deepspeed_ops_built")(test))


def train_args(out: Path, model: Path, steps: int = 4, timeout_minutes: float = 5.0) -> list[str]:
    return [
        "--model", str(model), "--data", str(SAMPLE / "stage1.jsonl"), "--output_dir", str(out),
        "--max_steps", str(steps), "--global_batch_size", "8", "--micro_batch_size", "2",
        "--max_length", "256", "--num_experts", "4", "--lora_r", "8", "--log_every", "1",
        "--timeout_minutes", str(timeout_minutes),
    ]


def launch_env(**extra) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}




def start(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    """Start a launcher from the repo root in its own process group, output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=launch_env(**env), start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def node_cmd(hostfile: Path, node_rank: int, port: int, args: list[str], master: str = "127.0.0.1") -> list[str]:
    return ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", master, "--master_port", str(port), "launch/stage1.py", *args]


def two_node_hostfile(tmp: Path) -> Path:
    hostfile = tmp / "hostfile"
    hostfile.write_text("# two simulated nodes of one slot each\nnode-a slots=1\nnode-b slots=1\n")
    return hostfile


def wait_for_text(log: Path, text: str, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {log}:\n{log.read_text(errors='replace')[-4000:]}")


def rank_pid(rank: int, rank_var: str = "RANK", under: int | None = None, **env_match: str) -> int:
    """PID of our launch/stage1.py process with `rank_var`=rank, found in /proc: among the
    descendants of process `under`, or anywhere with the given environment values."""
    candidates = psutil.Process(under).children(recursive=True) if under else psutil.process_iter()
    for proc in candidates:
        try:
            cmdline = proc.cmdline()
            if not cmdline or "python" not in Path(cmdline[0]).name or "launch/stage1.py" not in cmdline[1:3]:
                continue  # not a rank (a launcher, srun, the batch script)
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get(rank_var) == str(rank) and all(env.get(k) == v for k, v in env_match.items()):
            return proc.pid
    raise AssertionError(f"no launch/stage1.py process with {rank_var}={rank} {env_match}")


def check_checkpoint(out: Path, steps: int = 4) -> None:
    assert (out / "latest").read_text().strip() == f"checkpoint-{steps}"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{steps}"]
    manifest = json.loads((out / f"checkpoint-{steps}" / "manifest.json").read_text())
    assert manifest["stage"] == 1 and manifest["step"] == steps
    assert manifest["ranks_agreeing"] == 2  # both ranks held identical adapters at the save
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))


# -------------------------------------------------------------------------------------------
# deepspeed runner: two simulated nodes
# -------------------------------------------------------------------------------------------

@distributed
def test_two_simulated_nodes_train_one_checkpoint(tiny_model_dir, tmp_path):
    """One runner per node, as a scheduler starts them; node 1 starts first and waits for
    the master (connection refused is waited for, not an error)."""
    hostfile, port, out = two_node_hostfile(tmp_path), free_port(), tmp_path / "out"
    args = train_args(out, tiny_model_dir)
    node1 = start(node_cmd(hostfile, 1, port, args), tmp_path / "node1.log")
    time.sleep(2)
    node0 = start(node_cmd(hostfile, 0, port, args), tmp_path / "node0.log")
    rc0, rc1 = finish(node0, 300), finish(node1, 60)
    log0 = (tmp_path / "node0.log").read_text()
    assert (rc0, rc1) == (0, 0), log0[-4000:] + (tmp_path / "node1.log").read_text()[-3000:]
    assert "world of 2 rank(s)" in log0 and "world size 2," in log0
    check_checkpoint(out)


@distributed
def test_killing_one_rank_ends_the_job_naming_it(tiny_model_dir, tmp_path):
    """Two simulated nodes; rank 1 (node 1) is SIGKILLed mid-training. No launcher kills rank
    0 (it is on another node): it must notice, name rank 1, and exit non-zero in time."""
    hostfile, port, out = two_node_hostfile(tmp_path), free_port(), tmp_path / "out"
    args = train_args(out, tiny_model_dir, steps=2000, timeout_minutes=TIMEOUT_MINUTES)
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [start(node_cmd(hostfile, n, port, args), logs[n]) for n in (0, 1)]
    wait_for_text(logs[0], "step 3/", procs)
    victim = rank_pid(1, under=procs[1].pid)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    limit = TIMEOUT_MINUTES * 60 + MARGIN_S
    rcs = [finish(p, limit) for p in procs]
    took = time.monotonic() - killed_at
    log0 = logs[0].read_text(errors="replace")
    assert took < limit, took
    assert all(rc != 0 for rc in rcs), (rcs, log0[-3000:])
    assert f"rank 0: rank 1 (host {socket.gethostname()}, pid {victim}) exited without shutting down" in log0, log0[-4000:]
    assert "step 2000/" not in log0


# -------------------------------------------------------------------------------------------
# MPI
# -------------------------------------------------------------------------------------------

def mpirun_or_skip() -> str:
    """`mpirun` by name, as users type it: Open MPI started by its absolute path (/usr/bin/mpirun)
    puts its prefix's bin/ first on the ranks' PATH, where the system ninja then rebuilds
    DeepSpeed's JIT op that the venv's ninja built (about a minute each time, measured)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not installed (Debian: apt-get install openmpi-bin libopenmpi-dev; tests/run.sh does)")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install -e '.[mpi]'; tests/run.sh does)")
    return "mpirun"


def mpirun_cmd(np: int) -> list[str]:
    cmd = [mpirun_or_skip(), "-np", str(np), "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


@distributed
def test_mpirun_trains_and_exits_cleanly(tiny_model_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "mpirun.log"
    cmd = mpirun_cmd(2) + [sys.executable, "launch/stage1.py", *train_args(out, tiny_model_dir)]
    proc = start(cmd, log)
    rc = finish(proc, 300)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-5000:]
    assert "world of 2 rank(s)" in text
    assert "MPI_ABORT" not in text and "exited on signal" not in text  # the group was left cleanly
    check_checkpoint(out)


@distributed
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_ranks_whose_launcher_is_killed_outright_end(launcher, tiny_model_dir, tmp_path):
    """SIGKILL to torchrun or mpirun, which then forwards nothing: nothing of the run is left
    30 s later. Under torchrun each rank sees its launcher gone, saves the step reached and
    exits; under mpirun, Open MPI ends the ranks itself when mpirun dies (they cannot save:
    the last checkpoint stands, here none)."""
    out, log = tmp_path / "out", tmp_path / f"{launcher}.log"
    start_ranks = (["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port())] if launcher == "torchrun"
                   else mpirun_cmd(2) + [sys.executable])
    with running([*start_ranks, "launch/stage1.py", *train_args(out, tiny_model_dir, steps=500)], log,
                 TOKENIZERS_PARALLELISM="false") as proc:
        wait_for_step(out / "metrics.jsonl", 2, proc, time.time() + 300)
        left = stop(proc, signal.SIGKILL, whole_group=False)
    assert not left, f"still running 30 s after {launcher} was killed: {left}"
    if launcher == "torchrun":
        text = log.read_text(errors="replace")
        step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        assert (out / "latest").read_text().strip() == f"checkpoint-{step}", text[-3000:]
        assert f"stopped at step {step}/500 (launcher process {proc.pid} exited)" in text, text[-3000:]


@distributed
def test_deepspeed_env_file_reaches_every_rank_through_the_openmpi_runner(tmp_path):
    """`deepspeed --launcher openmpi` exports `.deepspeed_env` (here via DS_ENV_FILE) to
    every rank with `mpirun -x`. Checked with `printenv` as the program: no training."""
    mpirun_cmd(2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text("MEDCARE_PROBE=from-deepspeed-env\n")
    launcher_args = "--oversubscribe --mca btl_tcp_if_include lo" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--launcher", "openmpi", "--launcher_args", launcher_args,
           "--force_multi", "--no_ssh_check", "--master_addr", "127.0.0.1", "--no_python", "printenv", "MEDCARE_PROBE"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(DS_ENV_FILE=str(env_file)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines().count("from-deepspeed-env") == 2, proc.stdout + proc.stderr


# -------------------------------------------------------------------------------------------
# SLURM: a real one-node cluster, started here
# -------------------------------------------------------------------------------------------

SLURM_CONF = """\
ClusterName=medcare-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=2
MailProg=/bin/true
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd as root, everything under a temp dir; torn down after.
    Yields the environment for the client commands (SLURM_CONF)."""
    for binary in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} not installed (Debian: apt-get install munge slurmctld slurmd slurm-client; tests/run.sh does)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs munged, slurmctld and slurmd as root")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=d, ctld_port=free_port(), slurmd_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []

    def daemon(cmd, name):
        log = open(d / f"{name}.out", "w")
        daemons.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(d.glob("*.out")) + sorted(d.glob("*.log")))

    try:
        daemon(["munged", "-F", "--force", f"--socket={d}/munge.sock", f"--key-file={key}", f"--pid-file={d}/munged.pid",
                f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"], "munged")
        deadline = time.monotonic() + 20
        while not (d / "munge.sock").exists():
            assert time.monotonic() < deadline and daemons[0].poll() is None, "munged did not start\n" + logs()
            time.sleep(0.1)
        daemon(["slurmctld", "-D", "-c", "-f", str(conf)], "slurmctld")
        daemon(["slurmd", "-D", "-f", str(conf), "-N", host], "slurmd")
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            assert time.monotonic() < deadline and all(p.poll() is None for p in daemons), f"SLURM node not idle ({state!r})\n" + logs()
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        deadline = time.monotonic() + 15  # let slurmd end the jobs' step daemons before it goes
        while time.monotonic() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
            time.sleep(0.5)
        for p in reversed(daemons):  # a throwaway cluster: no need for a graceful stop
            p.kill()
            p.wait()


def sbatch_stage1(slurm_env: dict, tmp: Path, out: Path, args: list[str]) -> subprocess.Popen:
    """`sbatch --wait` of the stage-1 template, sized for 2 CPU tasks on this node; the
    template's settings come from the environment, as they would from a user's shell: the
    options the template sets itself (output dir, timeout) as its variables, the rest as
    EXTRA_ARGS (an option given twice is refused)."""
    options = dict(zip(args[::2], args[1::2]))
    assert options.pop("--output_dir") == str(out)
    env = {**slurm_env, "CONFIG": "", "OUTPUT_DIR": str(out), "REPO": str(REPO),
           "TIMEOUT_MINUTES": options.pop("--timeout_minutes"), "EXTRA_ARGS": " ".join(f"{k} {v}" for k, v in options.items())}
    cmd = ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           f"--output={tmp}/job-%j.out", str(REPO / "launch/slurm/stage1.sbatch")]
    with open(tmp / "sbatch.log", "w") as f:
        return subprocess.Popen(cmd, cwd=tmp, stdout=f, stderr=subprocess.STDOUT, env=launch_env(**env), start_new_session=True)


def job_log(tmp: Path) -> tuple[Path, str]:
    logs = list(tmp.glob("job-*.out"))
    assert len(logs) == 1, list(tmp.iterdir())
    return logs[0], logs[0].read_text(errors="replace")


@distributed
def test_slurm_sbatch_stage1_template_trains(slurm, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    rc = finish(sbatch_stage1(slurm, tmp_path, out, train_args(out, tiny_model_dir)), 300)
    _, text = job_log(tmp_path)
    assert rc == 0, (tmp_path / "sbatch.log").read_text() + text[-5000:]
    assert "2 ranks, master 127.0.0.1:" in text and "world of 2 rank(s)" in text
    check_checkpoint(out)


@distributed
def test_slurm_job_ends_when_rank_0_is_killed(slurm, tiny_model_dir, tmp_path):
    """srun --kill-on-bad-exit stops the step and names the task that died. (Rank 1 usually
    prints its own line naming rank 0 too, but srun may terminate it first: that message is
    checked where no launcher stops the survivors, in test_killing_one_rank_...)"""
    out = tmp_path / "out"
    proc = sbatch_stage1(slurm, tmp_path, out, train_args(out, tiny_model_dir, steps=2000, timeout_minutes=TIMEOUT_MINUTES))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("job-*.out")):
        assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "sbatch.log").read_text()
        time.sleep(0.2)
    log, _ = job_log(tmp_path)
    wait_for_text(log, "step 3/", [proc])
    job_id = log.stem.split("-")[1]
    victim = rank_pid(0, "SLURM_PROCID", SLURM_JOB_ID=job_id, SLURM_CONF=slurm["SLURM_CONF"])
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    rc = finish(proc, TIMEOUT_MINUTES * 60 + MARGIN_S)
    took = time.monotonic() - killed_at
    text = log.read_text(errors="replace")
    assert rc != 0 and took < TIMEOUT_MINUTES * 60 + MARGIN_S, (rc, took)
    assert "task 0: Killed" in text, text[-3000:]  # srun's own report
    assert "step 2000/" not in text


@distributed
def test_slurm_job_warned_before_its_time_limit_is_requeued_and_ends_as_an_uninterrupted_run(slurm, tiny_model_dir, tmp_path):
    """The template's time-limit warning (B:USR1) sent by hand mid-run: the batch shell
    forwards it, the ranks save the step reached and exit 75, the job requeues itself, and the
    second attempt (same job id, same log) resumes to the very adapters of an uninterrupted job."""
    from safetensors.torch import load_file

    steps, runs = 30, {}
    for name in ("plain", "warned"):
        (tmp_path / name).mkdir()
        out = runs[name] = tmp_path / name / "out"
        proc = sbatch_stage1(slurm, tmp_path / name, out, train_args(out, tiny_model_dir, steps=steps))
        if name == "plain":
            assert finish(proc, 300) == 0, job_log(tmp_path / name)[1][-4000:]
            continue
        deadline = time.monotonic() + 120
        while not list((tmp_path / name).glob("job-*.out")):
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / name / "sbatch.log").read_text()
            time.sleep(0.2)
        log, _ = job_log(tmp_path / name)
        wait_for_text(log, "step 3/", [proc])
        job_id = log.stem.split("-")[1]
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True)
        deadline = time.monotonic() + 400  # both attempts end: the job leaves the queue
        while queued := subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], env=slurm, capture_output=True,
                                       text=True).stdout.strip():
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            if queued == "PENDING BeginTime":  # SLURM holds a requeued job about 2 minutes: the harness does not wait
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm, check=True)
            time.sleep(1)
        finish(proc, 60)
    _, text = job_log(tmp_path / "warned")
    assert f"stage 1: job {job_id} (attempt 2)" in text, text[-4000:]
    stopped = re.search(rf"stopped at step (\d+)/{steps} \(SIGUSR1\): checkpoint-\d+ saved; exit status 75", text)
    assert stopped and f"requeueing job {job_id}" in text, text[-4000:]
    step = int(stopped.group(1))
    assert 3 <= step < steps and f"resumed from {runs['warned'] / f'checkpoint-{step}'} at step {step}" in text, text[-4000:]
    want, got = (load_file(str(runs[n] / f"checkpoint-{steps}" / "adapters.safetensors")) for n in ("plain", "warned"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), "the requeued job's adapters differ"


@distributed
def test_slurm_pipeline_runs_all_four_jobs(slurm, tiny_model_dir, tmp_path):
    """pipeline.sh for real: stage 1 -> prepare-stage2 -> stage 2 -> export, chained with
    --dependency=afterok, WAIT=1 blocking on the export job."""
    run = tmp_path / "run"
    common = "--max_steps 2 --global_batch_size 4 --micro_batch_size 2 --max_length 256 --log_every 1"
    env = launch_env(**slurm, WAIT="1", TIMEOUT_MINUTES="5", NODES="1", GPUS_PER_NODE="0", TASKS_PER_NODE="2", CPUS_PER_TASK="1",
                     PREP_CPUS="1", PREP_MEM="500M", STAGE1_CONFIG="", STAGE2_CONFIG="", RUN_DIR=str(run),
                     STAGE1_ARGS=f"--model {tiny_model_dir} --data {SAMPLE / 'stage1.jsonl'} --num_experts 4 --lora_r 8 {common}",
                     STAGE2_ARGS=f"--data {SAMPLE / 'stage2.jsonl'} {common}")
    proc = subprocess.run(["bash", "launch/slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted((run / "logs").glob("*.out")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "pipeline finished" in proc.stdout
    assert sorted(p.name.split("-")[1] for p in (run / "logs").glob("*.out")) == ["export", "prepare", "stage1", "stage2"]
    for stage in ("stage1", "stage2"):
        assert (run / stage / "latest").read_text().strip() == "checkpoint-2"
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and (run / "final" / "model.safetensors").exists()


def test_pipeline_dry_run_chains_the_jobs(tmp_path):
    """pipeline.sh submits 4 jobs, each depending on the one before (DRY_RUN prints them)."""
    proc = subprocess.run(["bash", "launch/slurm/pipeline.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "RUN_DIR": str(tmp_path / "run"), "NODES": "3", "GPUS_PER_NODE": "4"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "sbatch " in line]
    assert len(lines) == 4
    assert "launch/slurm/stage1.sbatch" in lines[0] and "--nodes=3 --ntasks-per-node=4 --gpus-per-node=4" in lines[0]
    assert "--dependency=afterok:dry-medcare-stage1 --kill-on-invalid-dep=yes" in lines[1]
    assert "--dependency=afterok:dry-medcare-prepare" in lines[2] and "launch/slurm/stage2.sbatch" in lines[2]
    assert f"MODEL={tmp_path}/run/stage2-base" in lines[2]
    assert "--dependency=afterok:dry-medcare-stage2" in lines[3]
    assert "medcare-dist prepare-stage2 --stage1" in proc.stderr and "medcare-dist export --checkpoint" in proc.stderr
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------------
# Launch mistakes: fail fast, say what is wrong
# -------------------------------------------------------------------------------------------

@distributed
def test_launch_errors_are_fast_and_clear(tiny_model_dir, tmp_path):
    args = train_args(tmp_path / "out", tiny_model_dir)

    # a hostfile with a bad line: the deepspeed runner refuses it, naming the line
    bad = tmp_path / "bad_hostfile"
    bad.write_text("node-a slots=1\nnode-b slot=1\n")
    proc = subprocess.run(node_cmd(bad, 0, free_port(), args), cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Hostfile contains a bad entry: node-b slot=1" in proc.stderr + proc.stdout

    # the rest start Python ranks: run them side by side
    three = tmp_path / "three_slots"
    three.write_text("localhost slots=3\n")
    cases = {
        # 3 slots cannot split a global batch of 8 in micro-batches of 2
        "slots": (node_cmd(three, 0, free_port(), args), {},
                  "global_batch_size (8) must be a multiple of micro_batch_size x world size (2 x 3 = 6); "
                  "the world size 3 is set by the deepspeed runner: the sum of the hostfile's slots"),
        # a master address that does not resolve: rank 1 stops at once
        "unresolvable": (node_cmd(two_node_hostfile(tmp_path), 1, free_port(), args, master="no-such-host.invalid"), {},
                         "rank 1 on host %s: master address MASTER_ADDR='no-such-host.invalid' does not resolve" % socket.gethostname()),
        # an address nothing answers on: rank 1 gives up after MEDCARE_CONNECT_TIMEOUT
        "unreachable": (node_cmd(two_node_hostfile(tmp_path), 1, 29555, args, master="192.0.2.254"), {"MEDCARE_CONNECT_TIMEOUT": "3"},
                        "cannot reach the master 192.0.2.254:29555"),
    }
    started = time.monotonic()
    procs = {name: start(cmd, tmp_path / f"{name}.log", **env) for name, (cmd, env, _) in cases.items()}
    for name, proc in procs.items():
        rc = finish(proc, 120)
        text = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert rc != 0, (name, text[-3000:])
        assert cases[name][2] in text, (name, text[-3000:])
        assert "Traceback" not in text, (name, text[-3000:])  # one line, not a stack
    assert time.monotonic() - started < 100


# -------------------------------------------------------------------------------------------
# The same checks in one process, without launchers (fast)
# -------------------------------------------------------------------------------------------

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEDCARE_LAUNCHED_BY", "SLURM_PROCID",
             "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
             "SLURM_STEP_NODELIST", "SLURM_NODELIST", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMIX_RANK",
             "PMI_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "CROSS_SIZE", "LOCAL_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever the code under test sets in os.environ (which
    monkeypatch does not see) is undone afterwards, so later tests' launchers do not inherit it."""
    saved = dict(os.environ)
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_slurm_variables_become_rank_variables(clean_env):
    from medcare_dist.dist import process_group as d
    from medcare_dist.config import TrainConfig

    cfg = TrainConfig(model="m", data=["x"], global_batch_size=8, micro_batch_size=2)
    for var, value in dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu[03-05,07],cpu1").items():
        clean_env.setenv(var, value)
    with pytest.raises(d.ConfigError, match="SLURM job of 4 tasks but not under srun"):
        d.check_launch(cfg)  # python run directly by a multi-task batch script
    for var, value in dict(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="4", SLURM_LOCALID="0").items():
        clean_env.setenv(var, value)
    d.check_launch(cfg)
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == dict(
        RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="gpu03", MASTER_PORT="20077")
    cfg.global_batch_size = 12
    with pytest.raises(d.ConfigError, match=r"\(2 x 4 = 8\); the world size 4 is set by SLURM tasks"):
        d.check_launch(cfg)


def test_first_slurm_host():
    from medcare_dist.dist.rank_env import _first_slurm_host

    assert _first_slurm_host("gpu[03-05,07],cpu1") == "gpu03"
    assert _first_slurm_host("node7,node8") == "node7"
    assert _first_slurm_host("a[001-004]") == "a001"


def test_master_checks_fail_fast_with_reasons():
    from medcare_dist.dist.process_group import DistributedSetupError, _check_master_reachable

    with pytest.raises(DistributedSetupError, match="does not resolve"):
        _check_master_reachable("no-such-host.invalid", 29500, rank=1, wait_refused_s=None, connect_timeout_s=1)
    closed = free_port()  # nothing listens there: the host answers "connection refused"
    _check_master_reachable("127.0.0.1", closed, rank=1, wait_refused_s=None, connect_timeout_s=1)  # host is up: fine
    started = time.monotonic()
    with pytest.raises(DistributedSetupError, match="nothing listens on the master 127.0.0.1:%d" % closed):
        _check_master_reachable("127.0.0.1", closed, rank=1, wait_refused_s=1.0, connect_timeout_s=1)
    assert time.monotonic() - started < 5
    with socket.create_server(("127.0.0.1", 0)) as server:
        _check_master_reachable("127.0.0.1", server.getsockname()[1], rank=1, wait_refused_s=1.0, connect_timeout_s=1)
