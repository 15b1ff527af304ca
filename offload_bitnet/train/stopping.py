"""Stopping at a step boundary: SIGINT/SIGTERM and the time limits (--max-hours, --until) become a request
that the trainer checks before each step, so that a run always stops at its last committed step."""
from __future__ import annotations

import datetime
import math
import signal
import time

from offload_bitnet.train.runconfig import RunConfig


class Stopper:
    """Turns SIGINT/SIGTERM and the time limits into a request to stop at the next step boundary."""

    def __init__(self, config: RunConfig, clock=time.time):
        self.requested: str | None = None
        self.signal_number: int | None = None
        self.deadline = None
        self._clock = clock  # seconds since the epoch; tests pass a fixed one
        now = clock()
        if config.max_hours is not None:
            self.deadline = now + config.max_hours * 3600
        if config.until is not None:
            hour, minute = map(int, config.until.split(":"))
            target = datetime.datetime.fromtimestamp(now).replace(hour=hour, minute=minute, second=0, microsecond=0)
            if target.timestamp() <= now:
                target += datetime.timedelta(days=1)
            self.deadline = min(self.deadline or math.inf, target.timestamp())
        self._previous = {}

    def install(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)

    def restore(self):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame):
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now; the store stays at its last committed step
        self.signal_number = number
        self.requested = signal.Signals(number).name
        print(f"\n{self.requested} received: finishing the current step, then stopping "
              "(Ctrl-C again to abort at once; the store keeps its last committed step)", flush=True)

    def reason(self, next_step_seconds: float) -> str | None:
        """Why to stop before the next step, or None."""
        if self.requested:
            return self.requested
        if self.deadline is not None and self._clock() + next_step_seconds > self.deadline:
            return "time limit"
        return None
