"""Stop requests in a real process: the first signal raises the flag, the launcher's echo of
it is the same request, a later repeat ends the process at once."""

import os
import signal
import subprocess
import sys

from helpers import REPO

SCRIPT = """
import os, signal, sys, time
from medcare_dist.dist.preemption import StopRequests, agree
with StopRequests(["SIGUSR1", "SIGTERM"]) as stop:
    assert stop.reason is None and agree(False, False) == [False, False]
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)  # the deepspeed launcher forwarding the same signal: one request
    time.sleep(0.1)
    print("reason", stop.reason, agree(stop.reason is not None, False), flush=True)
    time.sleep(2.5)
    os.kill(os.getpid(), signal.SIGUSR1)  # asked again: at once, unsaved
    time.sleep(5)
print("not reached", flush=True)
"""


def test_a_stop_signal_raises_the_flag_once_and_a_later_repeat_exits_at_once():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stdout + proc.stderr[-2000:]
    assert "reason SIGUSR1 [True, False]" in proc.stdout and "not reached" not in proc.stdout
    notes = [line for line in proc.stderr.splitlines() if line.startswith("[medcare_dist] rank 0:")]
    assert notes == ["[medcare_dist] rank 0: SIGUSR1: saving a checkpoint at the end of this step, then exiting (status 75); "
                     "a second SIGUSR1 exits at once without saving",
                     "[medcare_dist] rank 0: second SIGUSR1: exiting now without saving"], proc.stderr[-2000:]


ORPHAN = """
import os, sys, time
from medcare_dist.dist.preemption import StopRequests
stop = StopRequests(["SIGUSR1"])  # made before the setup, as main_for_stage does
print("made", flush=True)
time.sleep(3)  # the setup, during which the launcher dies (this rank is handed to init)
with stop:
    deadline = time.monotonic() + 10
    while stop.reason is None and time.monotonic() < deadline:
        time.sleep(0.1)
    print("reason", stop.reason, flush=True)
"""

LAUNCHER = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={**os.environ, "RANK": "0"})
time.sleep(60)
"""


def test_a_launcher_that_dies_during_the_setup_is_noticed_when_training_starts():
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "MEDCARE_ORPHAN_GRACE_S": "30"}
    env.pop("RANK", None)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, ORPHAN], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "made"
        launcher.kill()
        launcher.wait(timeout=30)
        assert launcher.stdout.readline().strip() == f"reason launcher process {launcher.pid} exited"
    finally:
        launcher.kill()
