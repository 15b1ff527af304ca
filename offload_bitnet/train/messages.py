"""How the trainer talks to its user: ``say`` (a progress line, flushed at once: runs are watched through pipes and
log files) and ``TrainError`` (a run that cannot go on, with a message that says why and what to do)."""
from __future__ import annotations


class TrainError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


_quiet = False  # set on the ranks of a data-parallel run other than 0: rank 0 alone reports progress


def say(message: str = ""):
    """Print one line of the run's output now (not when a buffer fills); nothing on a quiet rank."""
    if not _quiet:
        print(message, flush=True)


def set_quiet(quiet: bool):
    """Silence ``say`` in this process (a data-parallel rank other than 0; its errors still reach stderr)."""
    global _quiet
    _quiet = quiet
