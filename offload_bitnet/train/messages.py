"""How the trainer talks to its user: ``say`` (a progress line, flushed at once: runs are watched through pipes and
log files) and ``TrainError`` (a run that cannot go on, with a message that says why and what to do)."""
from __future__ import annotations


class TrainError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def say(message: str = ""):
    """Print one line of the run's output now (not when a buffer fills)."""
    print(message, flush=True)
