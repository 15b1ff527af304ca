"""What a training step reports: its ``StepStats``, the process's peak memory, and ``NonFiniteStep``, the reason
a step is skipped as a whole."""
from __future__ import annotations

import resource
from dataclasses import dataclass

import torch


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class NonFiniteStep(ArithmeticError):
    """A step produced a non-finite loss or gradient and was skipped."""


def check_finite(unit: str, name: str, *tensors, what: str = "gradient"):
    """Raise NonFiniteStep naming ``unit`` and ``name`` when one of ``tensors`` has a non-finite element."""
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        # The extremes are non-finite exactly when some element is: one pass, no boolean tensor the size of the
        # weights, no conversion of 16-bit tensors, and no false alarm from a sum that overflows.
        low, high = torch.aminmax(tensor)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise NonFiniteStep(f"non-finite {what} in {unit} {name}")


@dataclass
class StepStats:
    """What one optimizer step did and cost."""

    step: int
    loss: float
    tokens: int
    wall_s: float
    io_wait_s: float
    bytes_read: int      # read from disk during the step (units served from the write-behind buffer are free)
    bytes_written: int   # the size of the files this step writes (the writes finish in the background)
    peak_rss: int
    spilled_bytes: int = 0
    skipped: str | None = None   # why the step was skipped (non-finite loss or gradient), else None
    # The main thread's time apart from its own compute: waiting for loads, waiting for the writer (both in
    # ``io_wait_s``), and running queued updates itself because the writer's queue was full (in compute_s).
    load_wait_s: float = 0.0
    writer_wait_s: float = 0.0
    writer_work_s: float = 0.0
    # The writer's busy time in the step, on whichever thread: making the updates' parts, and writing them.
    update_busy_s: float = 0.0
    write_busy_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return max(self.wall_s - self.io_wait_s, 0.0)

    def line(self) -> str:
        return (f"step {self.step} loss {self.loss:.4f} tokens {self.tokens} time {self.wall_s:.2f}s "
                f"(compute {self.compute_s:.2f}s, io wait {self.io_wait_s:.2f}s) read {self.bytes_read / 2**20:.1f}MiB "
                f"written {self.bytes_written / 2**20:.1f}MiB peak_rss {self.peak_rss / 2**20:.0f}MiB")
