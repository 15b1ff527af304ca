"""How the trainer talks to its user: ``say`` (a progress line, flushed at once; it lives with ``warn`` in
``offload_bitnet.notices``, since the formats and tokenizers warn too) and ``TrainError`` (a run that cannot go
on, with a message that says why and what to do)."""
from __future__ import annotations

from offload_bitnet.notices import say, set_quiet

__all__ = ["TrainError", "say", "set_quiet"]  # say and set_quiet for the trainer's modules


class TrainError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""
