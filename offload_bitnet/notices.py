"""What the package tells its user besides results and errors: ``say`` (a progress line on stdout) and ``warn``
(a warning or a note on stderr), both flushed at once (runs are watched through pipes and log files).

In a data-parallel run every rank runs the same command, so rank 0 alone says these (``set_rank``); the other
ranks' errors still reach stderr, each naming its rank (``rank_label``)."""
from __future__ import annotations

import sys

_quiet = False
_rank_label = ""


def say(message: str = ""):
    """Print one line of the run's output now (not when a buffer fills); nothing on a quiet rank."""
    if not _quiet:
        print(message, flush=True)


def warn(message: str):
    """Print a warning or a note on stderr now; nothing on a quiet rank (rank 0 says the same one)."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def set_quiet(quiet: bool):
    """Silence ``say`` and ``warn`` in this process (a data-parallel rank other than 0)."""
    global _quiet
    _quiet = quiet


def set_rank(rank: int, world_size: int):
    """This process is rank ``rank`` of ``world_size`` (torchrun): quiet unless rank 0, and its errors name it."""
    global _rank_label
    set_quiet(rank != 0)
    _rank_label = f"rank {rank} of {world_size}: " if world_size > 1 else ""


def rank_label() -> str:
    """``rank 1 of 2: `` in a process of a data-parallel run, empty otherwise: the start of its error messages."""
    return _rank_label
