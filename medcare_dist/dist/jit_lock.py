"""Stale JIT build locks: found at start, cleared, never waited on forever.

torch's JIT extension loader (which DeepSpeed uses for its CPU shared-memory comm op) takes a
`lock` file in the extension's build dir, `<TORCH_EXTENSIONS_DIR>/<py_cu>/<name>/lock`, on
every load, and holds it open while it checks or builds. A process killed in that window
leaves the file behind, and every later load on the machine waits for it to go, forever and
silently (torch.utils.file_baton). A live holder keeps the file open, so a lock that no
process on this host has open, and that is older than this process, is stale: it is removed
(moved aside and its inode checked, so a lock taken meanwhile by a new build is put back) and
the removal is printed. A lock younger than this process belongs to a rank of this launch
(between closing and deleting it) and is left alone. A lock that a live process holds is
reported with its pid: the wait is then a real build.

Scope: processes of this host. An extensions dir shared between hosts (a home dir on NFS)
can hold a lock that a process on another host has open; point TORCH_EXTENSIONS_DIR at a
node-local path there (torch's own advice for that dir).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def extensions_root() -> Path:
    """Where torch builds JIT extensions: TORCH_EXTENSIONS_DIR, else torch's default."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def process_start_time() -> float:
    """When this process started (epoch seconds): files younger than that may be a sibling
    rank's, still being set up."""
    import psutil  # a DeepSpeed dependency

    return psutil.Process(os.getpid()).create_time()


def holders(lock: Path) -> list[int]:
    """Pids of the processes of this host that have `lock` open (those /proc lets us see)."""
    try:
        st = lock.stat()
    except FileNotFoundError:
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                fst = fd.stat()
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                found.append(int(proc.name))
                break
    return found


def _remove_if_same(lock: Path, inode: tuple[int, int]) -> bool:
    """Remove `lock` if it is still the file `inode` names: moved aside first, so that a new
    lock created meanwhile by a live build is put back, not deleted."""
    aside = lock.with_name(f"lock.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False  # another process cleared it
    st = aside.stat()
    if (st.st_dev, st.st_ino) != inode:
        try:
            os.link(aside, lock)  # a live lock after all: back where its holder expects it
        except FileExistsError:
            pass
        aside.unlink()
        return False
    aside.unlink()
    return True


def clear_stale_locks(root: Path | None = None, log=None) -> list[Path]:
    """Remove every JIT build lock under `root` that no process holds and that predates this
    process; print what was found. Returns the locks removed."""
    root = extensions_root() if root is None else Path(root)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = process_start_time()
    removed = []
    for lock in sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock")):
        try:
            st = lock.stat()
        except FileNotFoundError:
            continue
        pids = holders(lock)
        if not pids and st.st_mtime > started - 1.0:
            continue  # taken since this launch began: a sibling rank's, about to be deleted by it
        if pids:
            log(f"[medcare_dist] {lock} is held by pid(s) {', '.join(map(str, pids))} (a JIT build or load in progress): "
                "DeepSpeed waits for it to finish")
        elif _remove_if_same(lock, (st.st_dev, st.st_ino)):
            log(f"[medcare_dist] removed the stale JIT build lock {lock}: no process holds it (left by a process killed "
                "while building or loading the extension); without this, the extension load would wait for it forever")
            removed.append(lock)
    return removed
