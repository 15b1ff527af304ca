"""One-line progress reports with elapsed time and ETA."""
from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
    """A duration with its units, the one format of every ETA, elapsed time and age: ``45s``, ``3m20s``, ``1h02m``,
    ``3d04h``."""
    seconds = int(round(max(seconds, 0)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Prints ``label done/total note, elapsed, ETA`` on one line, rewritten in place on a terminal.

    Into a log file it writes a line at most every ``log_interval`` seconds (and the last one)."""

    def __init__(self, total: int, label: str, stream=None, log_interval: float = 5.0):
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.done = 0
        self.log_interval = log_interval
        self._last_logged = None

    def update(self, done: int | None = None, note: str = ""):
        self.done = self.done + 1 if done is None else done
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        line = (f"{self.label} {self.done}/{self.total} {note} "
                f"[{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}]")
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
        elif self._last_logged is None or self.done >= self.total or \
                time.perf_counter() - self._last_logged >= self.log_interval:
            self._last_logged = time.perf_counter()
            self.stream.write(line + "\n")
        self.stream.flush()


def unit_reporter(total: int, label: str):
    """A ``(done, total, unit)`` progress callback (``store.write.write_store``'s) that prints
    ``label done/total unit`` with elapsed time and ETA."""
    bar = Progress(total, label)
    return lambda done, _total, unit: bar.update(done, unit)
