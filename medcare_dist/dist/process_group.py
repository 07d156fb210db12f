"""Process-group setup, failure detection, and the few collectives the trainer needs.

Works under every launcher we support: rank_env.py turns what each launcher sets (deepspeed
runner, torchrun, SLURM, mpirun, none) into RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; nothing here or elsewhere reads launcher-specific variables.

Before joining, every rank checks what it can check alone, so that launch mistakes end in
seconds with a message instead of a hang: the rank variables, MASTER_ADDR resolving, the
master reachable from non-zero ranks (`MEDCARE_CONNECT_TIMEOUT` seconds, default 60, for a
host that does not answer; "connection refused" is waited for up to the collective timeout,
since rank 0 may simply not be up yet), and on CUDA a LOCAL_RANK below the GPU count.

After joining, a liveness channel (`medcare_dist/dist/liveness.py`) tells every rank which rank
died, failed or stopped answering, so that the job ends with a message naming it, instead of
hanging until the collective timeout. `MEDCARE_LIVENESS=0` turns it off.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

from medcare_dist.errors import ConfigError, DistributedSetupError
from medcare_dist.dist.rank_env import World, env_from_launcher, free_port, launch_world_size, world_size_origin
from medcare_dist.dist.liveness import Liveness, one_line, unresponsive_after

DEFAULT_CONNECT_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------
# Checks before joining
# ---------------------------------------------------------------------------------------

def check_launch(cfg) -> None:
    """What can be checked right at the start, before any data loading or rendezvous: the
    global batch splits evenly over the ranks the launcher started, and (non-zero ranks) the
    master address resolves and its host answers. A host that answers "connection refused"
    is fine here: rank 0 opens the port only when it joins, which init_distributed waits for."""
    env_from_launcher()
    world_size = launch_world_size()
    if world_size is None:
        return
    try:
        cfg.grad_accum_steps(world_size)
    except ConfigError as err:
        raise ConfigError(f"{err}; the world size {world_size} is set by {world_size_origin()}") from None
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if os.environ.get("RANK", "0") != "0" and addr and port.isdigit():
        connect_timeout = float(os.environ.get("MEDCARE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S))
        _check_master_reachable(addr, int(port), int(os.environ["RANK"]), wait_refused_s=None, connect_timeout_s=connect_timeout)


def _int_env(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.lstrip("-").isdigit():
        raise DistributedSetupError(f"{name}={value!r} is not set to an integer by the launcher")
    return int(value)


def _check_master_reachable(addr: str, port: int, rank: int, wait_refused_s: float | None, connect_timeout_s: float) -> None:
    """From a non-zero rank: can we open a TCP connection to the master (rank 0's store)?

    "Connection refused" means the host answers but rank 0 is not listening yet: wait for it
    (up to `wait_refused_s`; None: the host answered, that is enough). No answer at all
    (timeout, no route) means a wrong address, a host that is down or a firewall: give up
    after `connect_timeout_s`.
    """
    where = f"rank {rank} on host {socket.gethostname()}"
    hint = (
        "MASTER_ADDR must be an address of the host that runs rank 0, on a network every node "
        "can reach (deepspeed: --master_addr; SLURM: the first node of the job; mpirun: "
        "-x MASTER_ADDR=...), and MASTER_PORT must be open between the nodes"
    )
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise DistributedSetupError(f"{where}: master address MASTER_ADDR={addr!r} does not resolve ({err}). {hint}") from None
    start = time.monotonic()
    last_note = start
    while True:
        elapsed = time.monotonic() - start
        try:
            with socket.create_connection((addr, port), timeout=min(10.0, max(1.0, connect_timeout_s))):
                return
        except ConnectionRefusedError:
            if wait_refused_s is None:
                return
            if elapsed > wait_refused_s:
                raise DistributedSetupError(
                    f"{where}: nothing listens on the master {addr}:{port} after {elapsed:.0f} s (connection refused): "
                    f"rank 0 did not start, failed before joining, or uses another MASTER_PORT. {hint}"
                ) from None
            if time.monotonic() - last_note > 60:
                print(f"[medcare_dist] {where}: waiting for rank 0 to listen on {addr}:{port} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
                last_note = time.monotonic()
        except OSError as err:  # timeout, no route to host, network unreachable
            if elapsed > connect_timeout_s:
                why = "no answer" if isinstance(err, socket.timeout) else (err.strerror or str(err))
                raise DistributedSetupError(
                    f"{where}: cannot reach the master {addr}:{port} ({why}) within {connect_timeout_s:.0f} s. {hint}"
                ) from None
        time.sleep(0.5)


def _preflight(timeout_s: float) -> None:
    rank, world_size, local_rank = _int_env("RANK"), _int_env("WORLD_SIZE"), _int_env("LOCAL_RANK")
    if not 0 <= rank < world_size:
        raise DistributedSetupError(f"RANK={rank} is outside the world of WORLD_SIZE={world_size}")
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not (port or "").isdigit():
        raise DistributedSetupError(f"MASTER_ADDR={addr!r} / MASTER_PORT={port!r} are not set by the launcher")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n and n != 1:
            raise DistributedSetupError(
                f"rank {rank} has LOCAL_RANK={local_rank} but host {socket.gethostname()} shows {n} GPU(s): "
                "more ranks were placed on this node than it has GPUs (hostfile slots=, --num_gpus, "
                "--ntasks-per-node or mpirun's placement)"
            )
    if rank == 0:
        try:
            socket.getaddrinfo(addr, int(port))
        except socket.gaierror as err:
            raise DistributedSetupError(f"rank 0: MASTER_ADDR={addr!r} does not resolve ({err})") from None
        return
    connect_timeout = float(os.environ.get("MEDCARE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S))
    _check_master_reachable(addr, int(port), rank, wait_refused_s=timeout_s, connect_timeout_s=connect_timeout)
    _announce_arrival(rank)


# The rendezvous store counts the ranks that joined but does not say which: each non-zero rank
# leaves its own key in rank 0's store (a side client that does not take part in the count), so
# that the notes while joining can name the ranks that never arrived.
def _arrival_key(rank: int) -> str:
    return f"medcare_dist/arrived/{rank}"


_STORE_TIMEOUT_S = 10.0  # a side client of rank 0's rendezvous store: only notes depend on it


def _store_client() -> "dist.TCPStore | None":
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=_STORE_TIMEOUT_S), wait_for_workers=False)
    except Exception:  # only a note depends on it: never fail or delay the join over it
        return None


def _announce_arrival(rank: int) -> None:
    store = _store_client()
    if store is not None:
        try:
            store.set(_arrival_key(rank), socket.gethostname())
        except Exception:
            pass


def _not_arrived(store: "dist.TCPStore", world_size: int, joined: threading.Event) -> list[int] | None:
    """Ranks other than 0 with no arrival key (None when the store cannot be asked, or the
    join completed meanwhile: one store call at most is under way when it does)."""
    missing = []
    try:
        for r in range(1, world_size):
            if joined.is_set():
                return None
            if not store.check([_arrival_key(r)]):
                missing.append(r)
    except Exception:
        return None
    return missing


def _rank_ranges(ranks: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# ---------------------------------------------------------------------------------------
# Joining and leaving
# ---------------------------------------------------------------------------------------

_liveness: "Liveness | None" = None


def init_distributed(timeout_minutes: float = 30.0) -> World:
    """Join (or create) the process group; gloo on CPU, nccl on CUDA.

    `timeout_minutes` bounds the rendezvous and every collective: a rank that waits longer
    for the others raises instead of hanging.
    """
    global _liveness
    timeout_s = timeout_minutes * 60
    alone = not env_from_launcher() and "RANK" not in os.environ
    if alone:  # a plain `python launch/stage1.py`: a world of one. No RANK in our environment,
        # which subprocesses (mpirun, srun) would inherit; DeepSpeed's engine wants LOCAL_RANK.
        os.environ.setdefault("LOCAL_RANK", "0")
    else:
        _preflight(timeout_s)

    import deepspeed

    from medcare_dist.dist import shm_segments
    from medcare_dist.dist.jit_lock import clear_stale_locks, process_start_time

    clear_stale_locks()  # a lock left by a killed process would make DeepSpeed's comm-op load below wait forever
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        shm_segments.clear_stale_segments(process_start_time())
    try:
        with _notes_while_joining(timeout_s, enabled=not alone):
            deepspeed.init_distributed(
                dist_backend="nccl" if use_cuda else "gloo",
                auto_mpi_discovery=False,
                timeout=datetime.timedelta(seconds=timeout_s),
                verbose=False,
                **(dict(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1) if alone else {}),
            )
    except (dist.DistStoreError, dist.DistNetworkError) as err:
        raise DistributedSetupError(
            f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} on host {socket.gethostname()}: the ranks did not all "
            f"join at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within the timeout ({timeout_s:.0f} s): "
            f"{one_line(str(err))}. A rank that failed before joining says why in its own log; otherwise check that "
            "every node was started with the same hostfile/world size, MASTER_ADDR and MASTER_PORT"
        ) from None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not use_cuda and world_size > 1:
        dist.barrier()  # every rank has mapped every peer's all-reduce segment: their names can go
        shm_segments.release_own_segment(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if torch.cuda.device_count() == 1:  # one GPU per task (srun --gpus-per-task=1): it is device 0
            local_rank_device = 0
        else:
            local_rank_device = local_rank
        torch.cuda.set_device(local_rank_device)
        device = torch.device("cuda", local_rank_device)
    else:
        device = torch.device("cpu")
    world = World(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    if world_size > 1 and os.environ.get("MEDCARE_LIVENESS", "1") != "0":
        _liveness = Liveness.start(world, grace_s=min(30.0, timeout_s), gather_objects=gather_objects,
                                   silence_s=unresponsive_after(timeout_s))
    return world


@contextlib.contextmanager
def _notes_while_joining(timeout_s: float, enabled: bool = True):
    """The rendezvous itself says nothing until its timeout (30 minutes by default): while the
    block runs, say every MEDCARE_JOIN_NOTE_S seconds (default 60) that this rank still waits,
    for what, and which ranks have not arrived.

    The note thread is ended before the block's caller goes on: a daemon thread still inside a
    torch store call when the interpreter exits aborts the process ("terminate called without
    an active exception", seen under mpirun), so it must never outlive the join."""
    if not enabled:
        yield
        return
    joined = threading.Event()
    note = threading.Thread(target=_note_until, args=(joined, timeout_s), name="medcare-join-note", daemon=True)
    note.start()
    try:
        yield
    finally:
        joined.set()
        note.join(timeout=2 * _STORE_TIMEOUT_S)


def _note_until(joined: threading.Event, timeout_s: float) -> None:
    every_s = float(os.environ.get("MEDCARE_JOIN_NOTE_S", 60))
    start, store = time.monotonic(), None
    world_size = int(os.environ["WORLD_SIZE"])
    while not joined.wait(every_s):
        store = store or _store_client()
        missing = _not_arrived(store, world_size, joined) if store is not None else None
        if joined.is_set():
            break
        if missing:
            who = f"ranks not yet arrived: {_rank_ranges(missing)} (their nodes' launchers did not start them, or they failed before joining: see their logs)"
        elif missing == []:
            who = "every rank has arrived; the rendezvous is completing"
        else:
            who = "a rank that failed says why in its own log; a node whose launcher never started shows nothing"
        print(f"[medcare_dist] rank {os.environ['RANK']} on host {socket.gethostname()}: still waiting for all "
              f"{world_size} ranks to join at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
              f"({time.monotonic() - start:.0f} s of the {timeout_s:.0f} s timeout): {who}", file=sys.stderr, flush=True)


def shutdown() -> None:
    """Leave cleanly: tell rank 0's liveness server (a clean exit, or the exception being
    raised), then destroy the process group so that MPI and gloo exit cleanly."""
    global _liveness
    error = sys.exc_info()[1]
    if _liveness is not None:
        _liveness.close(error)
        _liveness = None
    if not (dist.is_available() and dist.is_initialized()):
        return
    if error is None:
        dist.destroy_process_group()
        return
    # On the way out of a failure a peer may be gone: never let the cleanup hang the exit.
    t = threading.Thread(target=_destroy_quietly, daemon=True)
    t.start()
    t.join(timeout=30)


def _destroy_quietly() -> None:
    try:
        dist.destroy_process_group()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------

def _collective_on_flat(tensors: list[torch.Tensor], collective) -> None:
    """Run one collective over all `tensors` packed into one buffer, then unpack in place."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        collective(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def gradient_group(timeout_minutes: float):
    """A process group of every rank for the adapter gradient all-reduce (grad_buckets.py), so
    that its asynchronous collectives never share a group with ZeRO-3's. A collective: every
    rank calls it at setup. None in a world of one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(timeout=datetime.timedelta(minutes=timeout_minutes))


def broadcast_params(params: list[torch.Tensor], src: int = 0) -> None:
    """Make every rank start from rank `src`'s adapter weights."""
    _collective_on_flat(list(params), lambda flat: dist.broadcast(flat, src=src))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over ranks (for logging)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
