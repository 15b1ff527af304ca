"""Named fault points, for tests that prove nothing is lost when a run dies or its disk fails.

``OFFLOAD_BITNET_FAULTS="point:N:action[,point:N:action...]"`` makes the N-th pass through ``point`` (counted
per process, from 1) perform ``action``:

* ``kill``   — SIGKILL this process (a power cut, as far as the process can tell);
* ``sigterm`` / ``sigint`` — send this process SIGTERM / SIGINT (a user's stop request, at a known moment:
  tests need no race between a signal sent from outside and the end of the run);
* ``raise``  — raise ``InjectedFault`` (an exception in the middle of the work);
* ``enospc`` / ``eio`` — raise ``OSError`` with that errno (a full disk, a failing disk).

``OFFLOAD_BITNET_FAULTS_RANK=R``: only the process that torchrun started as rank R (``RANK``) takes the plan
(torchrun gives every rank the same environment; a crash test kills one of them).

Points: ``write.data`` (block write-back, after part of a file is written), ``write.rename`` (after fsync, before
the rename), ``commit.rename`` (manifest written, before the switch), ``commit.cleanup`` (after the switch,
before old files are deleted), ``prefetch`` (a background load), ``update`` (a block's optimizer update),
``read`` (reading a unit file). Without the variable, ``fault_point`` costs one dict lookup.
"""
from __future__ import annotations

import errno
import os
import signal
import threading

ENV = "OFFLOAD_BITNET_FAULTS"
RANK_ENV = "OFFLOAD_BITNET_FAULTS_RANK"
ACTIONS = ("kill", "sigterm", "sigint", "raise", "enospc", "eio")
POINTS = ("write.data", "write.rename", "commit.rename", "commit.cleanup", "prefetch", "update", "read")


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault."""


def _parse(spec: str) -> dict[str, list[tuple[int, str]]]:
    plan: dict[str, list[tuple[int, str]]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            point, count, action = item.split(":")
            count = int(count)
        except ValueError:
            raise ValueError(f"{ENV}: cannot parse {item!r}; expected point:N:action") from None
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown point or action in {item!r}; points: {', '.join(POINTS)}")
        plan.setdefault(point, []).append((count, action))
    return plan


def _this_process_plan(environ) -> str:
    """The fault plan of this process: the variable's, unless it names another torchrun rank."""
    rank = environ.get(RANK_ENV)
    return "" if rank is not None and environ.get("RANK", "0") != rank else environ.get(ENV, "")


_plan = _parse(_this_process_plan(os.environ))
_counts: dict[str, int] = {}
_lock = threading.Lock()


def configure(spec: str):
    """Replace the fault plan (tests in the same process)."""
    global _plan
    with _lock:
        _plan = _parse(spec)
        _counts.clear()


def pass_counts() -> dict[str, int]:
    """How many times each fault point has been passed in this process (for calibrating crash tests)."""
    with _lock:
        return dict(_counts)


def fault_point(point: str):
    """Pass through a named point; performs the planned action when this pass is the chosen one."""
    if not _plan:
        return
    with _lock:
        _counts[point] = _counts.get(point, 0) + 1
        actions = [action for count, action in _plan.get(point, ()) if count == _counts[point]]
    for action in actions:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action in ("sigterm", "sigint"):
            os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGINT)
            continue  # the process goes on: its handler decides what the signal means
        if action == "raise":
            raise InjectedFault(f"injected fault at {point}")
        code = errno.ENOSPC if action == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code))
