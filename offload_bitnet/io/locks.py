"""Exclusive file locks that name their holder: a run folder's ``run.lock`` and a store's ``lock``.

While held, the file reads ``pid N on HOST``; it is emptied on release, so that ``offload-bitnet status`` does not
take a finished process for a live holder. This module is the one place that writes and parses that record.
"""
from __future__ import annotations

import fcntl
import os
import socket


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` says who (``pid N on HOST``, or "another process")."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is in use by {holder}")
        self.path = path
        self.holder = holder


def holder_record() -> str:
    """What a lock file says while this process holds it."""
    return f"pid {os.getpid()} on {os.uname().nodename}"


def parse_holder(text: str) -> tuple[int, str] | None:
    """(pid, host) of a lock file's record, or None when it holds none (released, empty or foreign text)."""
    parts = text.split()
    if len(parts) != 4 or parts[0] != "pid" or not parts[1].isdigit() or parts[2] != "on":
        return None
    return int(parts[1]), parts[3]


class HolderLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if missing) that records its holder; raises
    ``LockHeld`` when another process has it."""

    def __init__(self, path: str):
        self.path = path
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LockHeld(path, holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(holder_record())
        handle.flush()
        self.handle = handle

    def release(self):
        """Empty the record and unlock (a no-op when already released)."""
        if self.handle is None:
            return
        self.handle.truncate(0)  # `offload-bitnet status` must not take a live process that ran it for its holder
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


def lock_holder(path: str) -> str | None:
    """Who holds the lock file ``path`` ("pid N on HOST"), if that process is alive; None otherwise.

    Liveness is checked with signal 0 rather than by taking the lock (which could make a starting run fail)."""
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    parsed = parse_holder(text)
    if parsed is None:
        return None
    pid, host = parsed
    if host != socket.gethostname() and host != os.uname().nodename:
        return f"{text} (another host: cannot tell whether it still runs)"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    return text
