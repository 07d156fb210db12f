"""DeepSpeed's CPU all-reduce segments in /dev/shm: named only while the ranks open them.

On CPU with every rank on one host, DeepSpeed's shared-memory comm op gives each rank a
~66 MiB POSIX segment, `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`,
and never unlinks it. /dev/shm is RAM: every run (and every test) left its segments behind
until the host ran out of memory (measured here: 336 segments, 23 GB, the machine swapping
and the test suite killed).

A segment only needs its name until every rank has mapped every peer's: after that, an
unlinked segment lives on in the mappings and is freed when the last rank exits, however it
exits. So each rank unlinks its own right after the join (`release_own_segment`, after a
barrier), and a start removes the segments that no process of this host maps any more
(`clear_stale_segments`: left by ranks killed before that point).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def release_own_segment(rank: int) -> None:
    """Unlink the segment DeepSpeed's op made for `rank` of the job rendezvousing at
    MASTER_ADDR:MASTER_PORT (call once every rank has joined: they have all mapped it)."""
    name = f"{PREFIX}_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    (SHM_DIR / name).unlink(missing_ok=True)  # none when not all ranks are on one host


def mapped_segments() -> set[str]:
    """Names of the /dev/shm segments that some process of this host has mapped."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or another user's process
            continue
        for line in text.splitlines():
            if f"{SHM_DIR}/{PREFIX}" in line:
                names.add(Path(line.split(None, 5)[-1].removesuffix(" (deleted)")).name)
    return names


def clear_stale_segments(started: float, log=None) -> list[Path]:
    """Remove this user's segments that no process maps and that are older than `started`
    (the start time of this process: a younger one is being set up by a rank of this launch).
    Returns the segments removed."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    candidates = []
    for path in SHM_DIR.glob(f"{PREFIX}_{os.getuid()}_*"):
        try:
            if path.stat().st_mtime < started - 1.0:
                candidates.append(path)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    mapped = mapped_segments()
    removed = []
    for path in candidates:
        if path.name in mapped:
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
        log(f"[medcare_dist] removed {path} ({size / 2**20:.0f} MiB of RAM): a DeepSpeed CPU all-reduce segment that no "
            "process maps, left by a run killed while it started")
    return removed
