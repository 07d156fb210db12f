"""The notes a rank prints while it waits in the rendezvous: which ranks have not arrived, and
a note thread that never outlives the join (one still inside a torch store call when the
interpreter exits aborts the process)."""

import socket
import threading
import time

import torch.distributed as dist

from medcare_dist.dist.process_group import _arrival_key, _notes_while_joining


def _join_note_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "medcare-join-note"]


def test_notes_name_the_missing_ranks_and_the_note_thread_ends_with_the_join(monkeypatch, capfd):
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(master.port))
    monkeypatch.setenv("MEDCARE_JOIN_NOTE_S", "0.02")
    master.set(_arrival_key(1), socket.gethostname())
    with _notes_while_joining(timeout_s=60):
        time.sleep(0.5)
    assert _join_note_threads() == []  # asked of the store every 20 ms until the very end: ended, not abandoned
    notes = [line for line in capfd.readouterr().err.splitlines() if "still waiting" in line]
    assert notes and all(line.endswith("ranks not yet arrived: 2 (their nodes' launchers did not start them, or "
                                       "they failed before joining: see their logs)") for line in notes), notes[:3]
