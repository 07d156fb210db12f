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
