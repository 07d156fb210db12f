"""The output_dir lock between real processes: held, refused naming the holder, heartbeat,
released at exit, stale locks taken over (a dead pid here; a silent host elsewhere)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO
from medcare_dist.artefacts.run_lock import LOCK_FILE, RunLock
from medcare_dist.errors import OutputDirError, OutputInUseError

HOLD = """
import sys, time
from medcare_dist.artefacts.run_lock import RunLock
RunLock.take(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(out, seconds, **env):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(seconds)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_its_heartbeat_moves_and_its_exit_releases(tmp_path):
    out = tmp_path / "run"
    proc = holder(out, 3, MEDCARE_LOCK_HEARTBEAT_S="0.3")
    first = json.loads((out / LOCK_FILE).read_text())
    assert (first["host"], first["pid"]) == (socket.gethostname(), proc.pid)
    with pytest.raises(OutputInUseError, match=rf"output_dir {out} is in use by another run \(pid {proc.pid} on host "
                                               rf"{socket.gethostname()}, started .*, last heartbeat \d+ s ago; lock "):
        RunLock.take(out)
    time.sleep(1)
    assert json.loads((out / LOCK_FILE).read_text())["heartbeat"] > first["heartbeat"]
    proc.wait(timeout=30)
    assert not (out / LOCK_FILE).exists()  # released at exit
    lock = RunLock.take(out)  # free again
    lock.release()
    assert not (out / LOCK_FILE).exists()


def test_stale_locks_are_taken_over_with_a_message_and_a_silent_remote_holder_only_after_the_limit(tmp_path):
    out = tmp_path / "run"
    proc = holder(out, 0)
    proc.wait(timeout=30)
    out.joinpath(LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid, "started": time.time(),
                                                   "heartbeat": time.time()}))  # as a SIGKILLed run leaves it
    said = []
    RunLock.take(out, log=said.append).release()
    assert said and f"taking over the lock of an earlier run (pid {proc.pid}" in said[0]
    assert said[0].endswith(f"pid {proc.pid} no longer runs on this host")

    remote = {"host": "node-elsewhere", "pid": 1234, "started": time.time() - 7200}
    out.joinpath(LOCK_FILE).write_text(json.dumps({**remote, "heartbeat": time.time() - 30}))
    with pytest.raises(OutputInUseError, match="pid 1234 on host node-elsewhere"):
        RunLock.take(out)
    out.joinpath(LOCK_FILE).write_text(json.dumps({**remote, "heartbeat": time.time() - 3600}))
    said.clear()
    RunLock.take(out, log=said.append).release()
    assert "no heartbeat for 3600 s (limit 600 s)" in said[0]


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match=f"output_dir {tmp_path / 'file' / 'run'} cannot be created: Not a directory"):
        RunLock.take(tmp_path / "file" / "run")


def test_a_requeued_slurm_job_takes_over_its_earlier_attempts_lock_at_once(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    attempt0 = {"host": "node-elsewhere", "pid": 1234, "started": time.time(), "heartbeat": time.time(),
                "slurm_job": "4242", "slurm_attempt": 0}  # its rank 0 was SIGKILLed on another node
    out.joinpath(LOCK_FILE).write_text(json.dumps(attempt0))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(OutputInUseError, match="pid 1234 on host node-elsewhere"):  # another job: live
        RunLock.take(out)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    said = []
    RunLock.take(out, log=said.append).release()
    assert said[0].endswith("taken by attempt 0 of this SLURM job 4242, which SLURM ended before requeueing it")


def test_a_run_whose_lock_was_taken_over_stops_before_saving_and_release_never_brings_it_back(tmp_path, monkeypatch):
    import medcare_dist.artefacts.run_lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    lock = RunLock.take(out)
    try:
        run_lock.require_held()  # held: no error
        taker = {"host": "node-b", "pid": 99, "started": time.time(), "heartbeat": time.time(), "token": "theirs"}
        out.joinpath(LOCK_FILE).write_text(json.dumps(taker))
        time.sleep(0.3)
        assert json.loads(out.joinpath(LOCK_FILE).read_text())["token"] == "theirs"  # the heartbeat stopped, not overwrote
        with pytest.raises(OutputInUseError, match=rf"output_dir {out} was taken over by another run \(pid 99 on host node-b"):
            run_lock.require_held()
    finally:
        lock.release()
    assert json.loads(out.joinpath(LOCK_FILE).read_text())["token"] == "theirs"  # release removes only its own lock

    out.joinpath(LOCK_FILE).unlink()
    for _ in range(20):  # release racing a heartbeat under way: the lock is gone for good
        lock = RunLock.take(out)
        time.sleep(0.05)
        lock.release()
        time.sleep(0.1)
        assert not out.joinpath(LOCK_FILE).exists()


def test_a_lock_file_removed_by_hand_is_written_again_and_the_run_goes_on(tmp_path):
    import medcare_dist.artefacts.run_lock as run_lock

    out = tmp_path / "run"
    lock = RunLock.take(out)
    try:
        out.joinpath(LOCK_FILE).unlink()  # an operator "unsticking" the directory
        run_lock.require_held()  # no error: nobody else took it
        assert json.loads(out.joinpath(LOCK_FILE).read_text())["token"] == lock.record["token"]
    finally:
        lock.release()
    assert not out.joinpath(LOCK_FILE).exists()
