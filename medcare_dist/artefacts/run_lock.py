"""One writer per output_dir: a lock file that rank 0 holds for the whole run.

    output_dir/.medcare.lock   {"host", "pid", "pid_started", "started", "heartbeat", "token",
                                "slurm_job", "slurm_attempt"}

Two runs in one directory replace each other's checkpoints, interleave metrics.jsonl, and
every checkpoint still verifies, so nothing later would notice. The lock is created with
O_EXCL before the run writes anything, refreshed every HEARTBEAT_S by a thread, and removed
at exit. A second run, fresh or resuming, is refused naming the holder. A lock whose holder is
gone is taken over with a message: on this host, when its pid no longer runs the process that
took it; from another host, when its heartbeat is older than STALE_AFTER_S (a node that
crashed cannot remove its lock); at once when it was taken by an earlier attempt of the same
SLURM job (a requeued job whose previous attempt was killed before it could release it).
A run whose lock was taken over stops before its next save (`require_held`) rather than write
over the new holder's checkpoints.

Limits: a file system gives no compare-and-swap, so two runs taking over the same stale lock
at the same instant can both succeed, and a heartbeat written in the same instant as a
takeover can overwrite it (each window is one read and one rename; the loser notices at its
next beat). Across hosts, staleness compares the taker's clock with the holder's heartbeat:
clocks skewed by more than STALE_AFTER_S defeat it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import uuid
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


def _slurm_attempt() -> tuple[str | None, int]:
    """This process's SLURM job id and attempt (SLURM_RESTART_COUNT: 0, then 1 after a requeue)."""
    return os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)


def stale_reason(holder: dict) -> str | None:
    """Why the lock's holder is gone, or None while it may still run."""
    job, attempt = _slurm_attempt()
    if job is not None and holder.get("slurm_job") == job and holder.get("slurm_attempt", attempt) < attempt:
        return f"taken by attempt {holder['slurm_attempt']} of this SLURM job {job}, which SLURM ended before requeueing it"
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


def _create(path: Path, record: dict) -> None:
    """Write the lock file only if none exists (FileExistsError otherwise)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        now = time.time()
        job, attempt = _slurm_attempt()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_started(os.getpid()),
                       "started": now, "heartbeat": now, "token": uuid.uuid4().hex, "slurm_job": job, "slurm_attempt": attempt}
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a heartbeat's check-and-write, never across release()
        self.lost_to: dict | None = None  # the run that took the lock over, once noticed

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
                _create(lock.path, lock.record)
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
            threading.Thread(target=lock._beat, name="medcare-run-lock", daemon=True).start()
            if not _held:
                atexit.register(release_held)
            _held.append(lock)
            return lock
        raise OutputInUseError(f"output_dir {output_dir}: could not take its lock {lock.path} (other runs keep taking it)")

    def _mine(self, restore: bool = False) -> bool:
        """Still ours; when not, remember who took it (an unreadable lock is being rewritten:
        ours). With `restore`, a lock file that someone removed is written again, unless another
        run has created its own meanwhile."""
        holder = _read(self.path)
        if holder is None and restore:
            try:
                _create(self.path, self.record)
            except FileExistsError:
                holder = _read(self.path)
            except OSError:  # a full disk: judged again at the next beat
                return True
            else:
                print(f"[medcare_dist] warning: {self.path} had been removed while this run held it; written again",
                      file=sys.stderr, flush=True)
                return True
        if holder == {} or (holder or {}).get("token") == self.record["token"]:
            return True
        self.lost_to = holder or {"host": "?", "pid": "? (the lock file was removed)"}
        return False

    def _beat(self) -> None:
        """Refresh the heartbeat: what another host reads to tell a live run from a dead one."""
        while not self._stop.wait(HEARTBEAT_S):
            with self._writing:
                if self._stop.is_set():
                    return
                if not self._mine(restore=True):
                    print(f"[medcare_dist] warning: {self.path} was taken over by another run ({describe(self.lost_to)}); "
                          "this run stops before its next save", file=sys.stderr, flush=True)
                    return
                self.record["heartbeat"] = time.time()
                tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
                try:
                    tmp.write_text(json.dumps(self.record))
                    os.replace(tmp, self.path)
                except OSError:  # a full disk: the next beat tries again; the save reports the disk
                    tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self in _held:
            _held.remove(self)
        self._stop.set()
        with self._writing:  # a heartbeat under way finishes first, and none follows
            if self._mine():
                self.path.unlink(missing_ok=True)


def require_held() -> None:
    """Raise OutputInUseError when a lock this process took has been taken over by another run:
    checked before every save, so that the run that lost its directory never writes over the
    new holder's checkpoints or `latest`."""
    for lock in _held:
        if lock.lost_to is not None or not lock._mine(restore=True):
            raise OutputInUseError(
                f"output_dir {lock.path.parent} was taken over by another run ({describe(lock.lost_to)}; lock {lock.path}) "
                "while this run held it: this run stops without saving, so as not to write over that run's checkpoints")


def release_held() -> None:
    """Release every lock this process holds: at the end of a run, also one that failed."""
    while _held:
        _held.pop().release()
