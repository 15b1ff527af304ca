"""The step plan: every load of one training step, in the order the step takes them, each naming its unit and
kind, so that the step asks for what it wants by name and a reordering fails loudly.

The plan is built once per step (forward loads from the engine, backward loads from the trainable, see
``trainables.py``) and streamed by the ``Prefetcher`` in that order, one load ahead, in one stream for both passes:
the first backward units load while the last blocks run forward, and an untied head's moments load during the
cross-entropy. ``StepPlan.take(unit, kind)`` checks the next load before it takes it.

Kinds: ``forward`` (the compute tensors forward needs), ``masters`` (what an update starts from, with the
unit's moments when its update runs on the main thread), ``moments`` (a unit's moments alone), ``grad`` (a zeroed
fp32 gradient buffer), ``frozen`` (forward tensors of a unit that backward reads but does not update).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

KINDS = ("forward", "masters", "moments", "grad", "frozen")


class StepPlanError(RuntimeError):
    """An internal error: the step asked for a load other than the plan's next one (a bug, not bad input)."""


@dataclass(frozen=True)
class Load:
    """One load of a step: ``job()`` makes it (on the prefetch thread)."""

    unit: str
    kind: str
    job: Callable[[], object] = field(compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown load kind {self.kind!r}; one of {', '.join(KINDS)}")


class StepPlan:
    """The loads of one step, streamed in order by ``prefetcher`` and taken one by one with ``take``."""

    def __init__(self, loads: list[Load], prefetcher):
        self.loads = list(loads)
        self._stream = prefetcher.stream(load.job for load in self.loads)
        self.taken = 0

    def take(self, unit: str, kind: str):
        """The next load's result, which must be ``unit``'s ``kind``; StepPlanError (nothing taken) otherwise."""
        if self.taken >= len(self.loads):
            raise StepPlanError(f"internal error: the step asked for {unit} {kind} after all {len(self.loads)} "
                                "planned loads were taken; the step plan and the step disagree")
        planned = self.loads[self.taken]
        if (planned.unit, planned.kind) != (unit, kind):
            raise StepPlanError(f"internal error: the step asked for {unit} {kind}, but load {self.taken} of the "
                                f"step plan is {planned.unit} {planned.kind}; the step plan and the step disagree "
                                f"(plan: {self.describe()})")
        result = next(self._stream)
        self.taken += 1
        return result

    def finish(self):
        """Check that the step took every planned load (a load left over is a plan the step did not follow)."""
        if self.taken != len(self.loads):
            left = ", ".join(f"{load.unit} {load.kind}" for load in self.loads[self.taken:])
            raise StepPlanError(f"internal error: the step ended with planned loads not taken: {left}")

    def describe(self) -> str:
        return ", ".join(f"{load.unit} {load.kind}" for load in self.loads)
