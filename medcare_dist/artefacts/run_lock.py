"""One writer per output_dir: a lock file that rank 0 holds for the whole run.

    output_dir/.medcare.lock   {"host", "pid", "pid_started", "started", "heartbeat"}

Two runs in one directory replace each other's checkpoints, interleave metrics.jsonl, and
every checkpoint still verifies, so nothing later would notice. The lock is created with
O_EXCL before the run writes anything, refreshed every HEARTBEAT_S by a thread, and removed
at exit. A second run, fresh or resuming, is refused naming the holder. A lock whose holder is
gone is taken over with a message: on this host, when its pid no longer runs the process that
took it; from another host, when its heartbeat is older than STALE_AFTER_S (a node that
crashed cannot remove its lock).

Limit: two runs taking over the same stale lock at the same instant can both succeed (the
window is one unlink and one create).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from medcare_dist.errors import OutputDirError, OutputInUseError

LOCK_FILE = ".medcare.lock"
_held: list["RunLock"] = []  # this process's locks, released by release_held (the launcher's exit, or atexit)
HEARTBEAT_S = float(os.environ.get("MEDCARE_LOCK_HEARTBEAT_S", 30))
STALE_AFTER_S = float(os.environ.get("MEDCARE_LOCK_STALE_S", 600))


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe(holder: dict) -> str:
    age = time.time() - holder.get("heartbeat", 0)
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {_when(holder.get('started', 0))}, "
            f"last heartbeat {age:.0f} s ago")


def stale_reason(holder: dict) -> str | None:
    """Why the lock's holder is gone, or None while it may still run."""
    if holder.get("host") == socket.gethostname():
        started = _process_started(int(holder.get("pid", 0)))
        if started is None or abs(started - holder.get("pid_started", started)) > 1:
            return f"pid {holder.get('pid')} no longer runs on this host"
        return None
    age = time.time() - holder.get("heartbeat", 0)
    return f"no heartbeat for {age:.0f} s (limit {STALE_AFTER_S:.0f} s)" if age > STALE_AFTER_S else None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: judged by its age below


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_started(os.getpid()),
                       "started": now, "heartbeat": now}
        self._stop = threading.Event()

    @classmethod
    def take(cls, output_dir: str | Path, log=print) -> "RunLock":
        """Create output_dir if needed (a one-line error if it cannot be) and lock it for this
        process, taking over a stale lock; refused naming the holder of a live one."""
        output_dir = Path(output_dir)
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputDirError(f"output_dir {output_dir} cannot be created: {err.strerror or err}") from None
        lock = cls(output_dir)
        for _ in range(20):
            try:
                fd = os.open(lock.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(lock.path)
                if holder is None:
                    continue  # removed meanwhile: try again
                if not holder:
                    age = time.time() - lock.path.stat().st_mtime if lock.path.exists() else 0
                    if age < 5:
                        time.sleep(0.2)
                        continue
                why = stale_reason(holder) if holder else "unreadable lock file"
                if why is None:
                    raise OutputInUseError(
                        f"output_dir {output_dir} is in use by another run ({describe(holder)}; lock {lock.path}): wait for "
                        "it to end, stop it, or choose another --output_dir") from None
                log(f"{lock.path}: taking over the lock of an earlier run ({describe(holder) if holder else 'no record'}): {why}")
                lock.path.unlink(missing_ok=True)
                continue
            except OSError as err:
                raise OutputDirError(f"output_dir {output_dir}: cannot write its lock file: {err.strerror or err}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(lock.record, f)
            threading.Thread(target=lock._beat, name="medcare-run-lock", daemon=True).start()
            if not _held:
                atexit.register(release_held)
            _held.append(lock)
            return lock
        raise OutputInUseError(f"output_dir {output_dir}: could not take its lock {lock.path} (other runs keep taking it)")

    def _mine(self) -> bool:
        holder = _read(self.path) or {}
        return (holder.get("host"), holder.get("pid")) == (self.record["host"], self.record["pid"])

    def _beat(self) -> None:
        """Refresh the heartbeat: what another host reads to tell a live run from a dead one."""
        while not self._stop.wait(HEARTBEAT_S):
            if not self._mine():
                print(f"[medcare_dist] warning: {self.path} was taken over by another run; this run no longer holds it",
                      file=sys.stderr, flush=True)
                return
            self.record["heartbeat"] = time.time()
            tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(self.record))
                os.replace(tmp, self.path)
            except OSError:  # a full disk: the next beat tries again; the save reports the disk
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self._mine():
            self.path.unlink(missing_ok=True)


def release_held() -> None:
    """Release every lock this process holds: at the end of a run, also one that failed."""
    while _held:
        _held.pop().release()
