"""Who died or stopped answering, told to everyone: a liveness channel beside the process group.

Every rank keeps one TCP connection to a small server thread on rank 0. A rank that dies
(killed, crashed, node down) or fails with an exception is noticed at once by rank 0, which
tells every other rank; each survivor prints which rank failed and exits (status 3) if it
has not already failed on its own within a grace period. This names the failed rank and
stops the job when no launcher kills the survivors (one `deepspeed --no_ssh` runner per
node, pdsh), and keeps a NCCL job from hanging until the collective timeout.

A rank that stops answering without dying (SIGSTOP, a hung host, a process frozen outside
Python) keeps its TCP connection open, so both ends also send a heartbeat every few seconds
from a thread of their own: a rank silent for `silence_s` (MEDCARE_UNRESPONSIVE_S, default
half the collective timeout, at most 120 s) is named as unresponsive, well before the
collective timeout would end the job with a raw backend error.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medcare_dist.dist.rank_env import World

EXIT_PEER_FAILED = 3  # status of a rank that stops because another rank failed


def unresponsive_after(collective_timeout_s: float) -> float:
    """Seconds of heartbeat silence after which a rank is named as unresponsive: before the
    collective timeout, so that the liveness channel speaks first."""
    default = min(120.0, collective_timeout_s / 2)
    return float(os.environ.get("MEDCARE_UNRESPONSIVE_S", default))


def keepalive(sock: socket.socket) -> None:
    """Notice a peer whose host vanished (no FIN ever comes) within about a minute."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, val in (("TCP_KEEPIDLE", 20), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 6)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    except OSError:
        pass


def one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


class Liveness:
    """One TCP connection per rank to a server thread on rank 0.

    Clients send `hello RANK`, then `bye` (clean exit) or `fail TEXT` (exception) when they
    leave. A connection that closes without either belongs to a rank that died. Both ends
    send `beat` every `beat_s`; a client silent for `silence_s` is unresponsive, and so is
    rank 0 to a client that hears nothing from it for as long. Rank 0 tells every other rank
    about the first failure with `lost RANK TEXT`; when rank 0 itself dies, its clients see
    their connection close. Every survivor then prints the failed rank and, after `grace_s`,
    exits with EXIT_PEER_FAILED if its main thread has not failed on its own (a gloo
    collective fails at once when a peer dies; nothing fails when a peer only stops).
    """

    def __init__(self, world: World, peers: list[tuple[str, int]], grace_s: float, silence_s: float = 120.0):
        self.world, self.peers, self.grace_s = world, peers, grace_s
        self.silence_s = silence_s
        self.beat_s = max(0.2, min(5.0, silence_s / 4))
        self.closing = threading.Event()  # set by close(): heartbeats stop
        self.send_lock = threading.Lock()  # one writer at a time on a client's socket
        self.last_seen: dict[int, float] = {}  # rank 0: when each client was last heard from
        self.leaving_cleanly = False  # set by close(None): from then on a closed connection is expected
        self.failure: tuple[int, str] | None = None  # the first failed rank, and how
        self.failed = threading.Event()
        self.reported = False  # rank 0: the first failure was sent to the other ranks
        self.lock = threading.Lock()
        self.server: socket.socket | None = None
        self.sock: socket.socket | None = None
        self.clients: dict[socket.socket, int | None] = {}
        self.left: set[int] = set()  # ranks that said bye or fail
        self.all_left = threading.Event()

    @classmethod
    def start(cls, world: World, grace_s: float, gather_objects, silence_s: float = 120.0) -> "Liveness":
        """`gather_objects(obj)`: every rank's obj in rank order (distributed.gather_objects)."""
        server = None
        port = 0
        if world.rank == 0:
            if socket.has_dualstack_ipv6():
                server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
            else:
                server = socket.create_server(("", 0))
            port = server.getsockname()[1]
        table = gather_objects((socket.gethostname(), os.getpid(), port))
        self = cls(world, [(h, p) for h, p, _ in table], grace_s, silence_s)
        if world.rank == 0:
            self.server = server
            self.last_seen = {r: time.monotonic() for r in range(1, world.world_size)}  # a rank that never says hello counts too
            hosts = sorted({h for h, _ in self.peers})
            ranks = ", ".join(f"{r}:{h}/{p}" for r, (h, p) in enumerate(self.peers[:16]))
            more = f", ... ({world.world_size} ranks)" if world.world_size > 16 else ""
            print(f"[medcare_dist] world of {world.world_size} rank(s) on {len(hosts)} host(s); rank:host/pid {ranks}{more}", flush=True)
            threading.Thread(target=self._serve, name="medcare-liveness-server", daemon=True).start()
        else:
            sock = socket.create_connection((os.environ["MASTER_ADDR"], table[0][2]), timeout=60)
            sock.settimeout(None)
            keepalive(sock)
            sock.sendall(f"hello {world.rank}\n".encode())
            self.sock = sock
            threading.Thread(target=self._listen, name="medcare-liveness-client", daemon=True).start()
            threading.Thread(target=self._beat, name="medcare-liveness-heartbeat", daemon=True).start()
        return self

    def describe(self, rank: int) -> str:
        host, pid = self.peers[rank] if 0 <= rank < len(self.peers) else ("?", "?")
        return f"rank {rank} (host {host}, pid {pid})"

    # -- rank 0 ----------------------------------------------------------------------------
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        buffers: dict[socket.socket, bytes] = {}
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._beat_clients()
                self._check_silence(now)
                next_beat = now + self.beat_s
            for key, _ in sel.select(timeout=max(0.0, next_beat - time.monotonic())):
                sock = key.fileobj
                if sock is self.server:
                    try:
                        conn, _ = self.server.accept()
                    except OSError:
                        continue
                    keepalive(conn)
                    with self.lock:
                        self.clients[conn] = None
                    buffers[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(4096)
                    error = None
                except OSError as err:
                    data, error = b"", err
                if data:
                    rank = self.clients.get(sock)
                    if rank is not None:
                        self.last_seen[rank] = time.monotonic()
                    buffers[sock] += data
                    while b"\n" in buffers[sock]:
                        line, buffers[sock] = buffers[sock].split(b"\n", 1)
                        self._on_client_line(sock, line.decode(errors="replace"))
                    continue
                sel.unregister(sock)
                with self.lock:
                    rank = self.clients.pop(sock, None)
                self.last_seen.pop(rank, None)
                sock.close()
                if rank is not None and rank not in self.left:
                    why = f"lost its connection to rank 0 ({error.strerror or error}): its host may be down or unreachable" if error else (
                        "exited without shutting down (killed, crashed, or out of memory)")
                    self._record_failure(rank, why)
                self._check_all_left()

    def _beat_clients(self) -> None:
        with self.lock:
            targets = [s for s, r in self.clients.items() if r is not None]
        for s in targets:
            try:
                s.send(b"beat\n", socket.MSG_DONTWAIT)  # never block on a client that stopped reading
            except OSError:
                pass

    def _check_silence(self, now: float) -> None:
        for rank, seen in list(self.last_seen.items()):
            if rank not in self.left and now - seen > self.silence_s:
                self._record_failure(rank, self._silent_why(now - seen))
                return

    def _silent_why(self, seconds: float) -> str:
        return (f"has not answered for {seconds:.0f} s (heartbeat limit {self.silence_s:.0f} s, MEDCARE_UNRESPONSIVE_S): "
                "stopped (SIGSTOP), frozen, or its host is overloaded or unreachable")

    def _on_client_line(self, sock: socket.socket, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "hello":
            with self.lock:
                self.clients[sock] = int(rest)
            self.last_seen[int(rest)] = time.monotonic()
        elif word == "bye":
            self.left.add(self.clients.get(sock))
            self._check_all_left()
        elif word == "fail":
            rank = self.clients.get(sock)
            self.left.add(rank)
            self._record_failure(rank, f"failed: {rest}")
            self._check_all_left()

    def _check_all_left(self) -> None:
        if len(self.left) >= self.world.world_size - 1:
            self.all_left.set()

    def _record_failure(self, rank: int, why: str) -> None:
        with self.lock:
            if self.reported:
                return
            self.reported = True
            targets = [s for s, r in self.clients.items() if r is not None and r != rank]
        for s in targets:
            try:
                s.sendall(f"lost {rank} {one_line(why)}\n".encode())
            except OSError:
                pass
        self._on_peer_failure(rank, why)

    # -- other ranks -----------------------------------------------------------------------
    def _beat(self) -> None:
        while not self.closing.wait(self.beat_s):
            with self.send_lock:
                if self.closing.is_set():
                    return
                try:
                    self.sock.send(b"beat\n", socket.MSG_DONTWAIT)
                except OSError:
                    pass

    def _listen(self) -> None:
        buffer = b""
        error = None
        heard = time.monotonic()
        while True:
            ready, _, _ = select.select([self.sock], [], [], self.beat_s)
            if not ready:
                silent = time.monotonic() - heard
                if silent > self.silence_s and not self.closing.is_set():
                    self._on_peer_failure(0, self._silent_why(silent))
                    return
                continue
            heard = time.monotonic()
            try:
                data = self.sock.recv(4096)
            except OSError as err:
                data, error = b"", err
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                word, _, rest = line.decode(errors="replace").partition(" ")
                if word == "lost":
                    rank, _, why = rest.partition(" ")
                    self._on_peer_failure(int(rank), why)
                elif word == "fail":
                    self._on_peer_failure(0, f"failed: {rest}")
        if self.leaving_cleanly or self.failure is not None:
            return
        why = f"lost the connection to it ({error.strerror or error}): its host may be down or unreachable" if error else (
            "exited without shutting down (killed, crashed, or out of memory)")
        self._on_peer_failure(0, why)

    # -- every rank ------------------------------------------------------------------------
    def _on_peer_failure(self, rank: int, why: str) -> None:
        with self.lock:
            if self.leaving_cleanly or self.failure is not None:
                return
            self.failure = (rank, why)
        me = self.world.rank
        print(
            f"[medcare_dist] rank {me}: {self.describe(rank)} {why}. The job cannot continue without it: "
            f"rank {me} stops (in at most {self.grace_s:.0f} s).",
            file=sys.stderr, flush=True,
        )
        timer = threading.Timer(self.grace_s, self._exit_now, args=(rank,))
        timer.daemon = True
        timer.start()
        self.failed.set()

    def _exit_now(self, rank: int) -> None:
        print(f"[medcare_dist] rank {self.world.rank}: exiting with status {EXIT_PEER_FAILED} because rank {rank} failed", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_FAILED)

    def close(self, error: BaseException | None) -> None:
        """Say goodbye, or why this rank fails. On failure, first give the liveness threads a
        moment: when a peer died, this rank's collective error is a consequence, and the
        message should name the peer (its connection closes within milliseconds)."""
        if error is not None:
            self.failed.wait(timeout=2.0)
        else:
            with self.lock:
                self.leaving_cleanly = True
        with self.send_lock:
            self.closing.set()
        reason = f"fail {one_line(f'{type(error).__name__}: {error}')}\n" if error is not None else ""
        if self.world.rank == 0:
            if error is None:
                self.all_left.wait(timeout=min(120.0, max(10.0, self.grace_s)))
            elif self.failure is None:
                with self.lock:
                    targets = [s for s, r in self.clients.items() if r is not None]
                for s in targets:
                    try:
                        s.sendall(reason.encode())
                    except OSError:
                        pass
            return  # the server thread is a daemon; its sockets close with the process
        msg = reason or "bye\n"
        try:
            with self.send_lock:
                self.sock.sendall(msg.encode())
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
