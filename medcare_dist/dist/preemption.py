"""Stopping cleanly when the cluster asks: stop signals, an orphaned rank, and their agreement.

A scheduler ends a job with SIGTERM (preemption, time limit; SLURM sends SIGKILL after
KillWait, 30 s by default), or warns it ahead with a signal of the user's choice
(`#SBATCH --signal=B:USR1@300`). A signal only raises a flag here; at the next step boundary
every rank calls `agree`, one all-reduce, so that all ranks save the same step and leave
together even when only some of them were signalled. The run then exits with EXIT_PREEMPTED.

- A repeat of the signal more than REPEAT_WINDOW_S after the first ends the process at once,
  unsaved (status 128 + signal). Repeats within the window are the same request: the
  deepspeed launcher forwards the SIGTERM it gets to the ranks that already got it from the
  process group.
- A rank whose launcher died (the `deepspeed` runner, torchrun, srun's step daemon, mpirun's
  daemon) would otherwise train on as an orphan and write beside the next attempt: the
  watcher thread sees the launcher gone, raises the same flag, and ends the process
  unsaved if the save has not finished ORPHAN_GRACE_S later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from medcare_dist.dist import process_group as dist_utils
from medcare_dist.dist.rank_env import started_by_launcher

EXIT_PREEMPTED = 75  # saved on a stop signal (or a lost launcher); `--resume auto` continues (EX_TEMPFAIL)
REPEAT_WINDOW_S = 2.0
ORPHAN_GRACE_S = float(os.environ.get("MEDCARE_ORPHAN_GRACE_S", 60))
WATCH_EVERY_S = 1.0


def _say(text: str) -> None:
    """Unbuffered: a signal handler must not re-enter the stderr buffer that tqdm may be writing."""
    os.write(sys.stderr.fileno(), f"[medcare_dist] rank {os.environ.get('RANK', '0')}: {text}\n".encode())


def launcher_pids() -> list[int]:
    """The processes whose death orphans this rank: its parent, and for the deepspeed runner's
    per-node `launch.py` the runner above it (killing the runner alone leaves launch.py). None
    for a process started without a launcher: its parent is a shell, which `nohup` outlives."""
    import psutil

    if not started_by_launcher():
        return []

    try:
        parent = psutil.Process(os.getppid())
        pids = [parent.pid]
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()) and parent.ppid() > 1:
            pids.append(parent.ppid())
    except psutil.Error:
        return []
    return [p for p in pids if p > 1]


class StopRequests:
    """The stop flag of this process: set by a stop signal or by the launcher's death.

    Made before the run's setup and entered when training starts: the launcher is recorded at
    construction, so that one that dies during the setup (when this rank has already been
    handed to init) is noticed at the first step."""

    def __init__(self, signal_names: list[str]):
        import psutil

        self.signals = [getattr(signal, name) for name in signal_names]
        self.reason: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._watching = threading.Event()
        self._launchers: dict[int, float] = {}  # pid -> its start time: a reused pid is not the launcher
        for pid in launcher_pids():
            with contextlib.suppress(psutil.Error):
                self._launchers[pid] = psutil.Process(pid).create_time()

    def __enter__(self) -> "StopRequests":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if self._launchers:
            self._watching.set()
            threading.Thread(target=self._watch, name="medcare-launcher-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._watching.clear()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.reason is None:
            self.reason, self._first_at = name, now
            _say(f"{name}: saving a checkpoint at the end of this step, then exiting (status {EXIT_PREEMPTED}); "
                 f"a second {name} exits at once without saving")
        elif now - self._first_at > REPEAT_WINDOW_S:
            _say(f"second {name}: exiting now without saving")
            os._exit(128 + signum)

    def _watch(self) -> None:
        while self._watching.is_set():
            gone = [pid for pid, created in self._launchers.items() if not _alive(pid, created)]
            if gone:
                self.reason = self.reason or f"launcher process {gone[0]} exited"
                _say(f"{self.reason}: saving at the end of this step and exiting; ending in {ORPHAN_GRACE_S:.0f} s at the latest")
                time.sleep(ORPHAN_GRACE_S)  # a normal exit ends this daemon thread first
                _say(f"still running {ORPHAN_GRACE_S:.0f} s after the launcher exited: exiting without saving")
                os._exit(EXIT_PREEMPTED)
            time.sleep(WATCH_EVERY_S)


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def agree(*flags: bool) -> list[bool]:
    """Each flag, true on every rank when it is true on any: one small all-reduce, called by
    every rank at the same point (a step boundary)."""
    return [total > 0 for total in dist_utils.all_reduce_sum([float(f) for f in flags])]
