"""Learning-rate and weight-decay schedules, as pure functions of the optimizer step.

A schedule is recomputed from the step number alone, so a resumed run continues on exactly the same curve.
Steps count from 1 (the first optimizer step) to ``total_steps``. A decay reaches ``eta_min`` *after* the last
step (at step ``total_steps + 1``, which never runs), as Hugging Face's and PyTorch's schedulers do: every step
trains at a rate above ``eta_min``, and ``--num-train-iters 1`` trains at the peak instead of doing nothing.

* ``constant``: linear warmup to the peak, then the peak.
* ``cosine``: linear warmup to the peak (reached at the last warmup step), then cosine decay from the peak (the
  first step after the warmup) towards ``eta_min``.
* ``two-stage`` (the BitNet b1.58 recipe): stage 1 warms up and follows a cosine decay planned over the
  whole run; at the midpoint the rate drops sharply to ``stage2_lr_fraction * peak`` and decays by cosine
  towards ``eta_min`` over stage 2. Weight decay is ``weight_decay`` in stage 1 and 0 in stage 2.

``quant_mix`` is the quantization warmup of a full-precision model turned ternary (Hugging Face's
"Fine-tuning LLMs to 1.58bit"): the mix rises linearly from 0 (full precision) to 1 (ternary) over the first
``warmup_steps`` optimizer steps, then stays at 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "constant", "two-stage")


@dataclass(frozen=True)
class Schedule:
    """Learning rate and weight decay for every step of a run of ``total_steps`` steps."""

    kind: str
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    eta_min: float = 0.0
    weight_decay: float = 0.0
    stage2_lr_fraction: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least 1 step, got total_steps={self.total_steps}")

    @property
    def stage2_start(self) -> int:
        """First step of stage 2 of the two-stage schedule (the step after the midpoint)."""
        return self.total_steps // 2 + 1

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        # Decays count the steps done before this one, over the decay's steps: the first decay step is at its
        # start value and eta_min comes one step after the last.
        decay_steps = self.total_steps - self.warmup_steps
        if self.kind == "cosine" or step < self.stage2_start:
            # Stage 1 rides the cosine of the full run, so the drop at the midpoint is from about half the peak.
            return cosine(self.peak_lr, self.eta_min, step - self.warmup_steps - 1, decay_steps)
        stage2_peak = max(self.peak_lr * self.stage2_lr_fraction, self.eta_min)
        return cosine(stage2_peak, self.eta_min, step - self.stage2_start, self.total_steps - self.stage2_start + 1)

    def weight_decay_at(self, step: int) -> float:
        """Weight decay of optimizer step ``step``: constant, except 0 in stage 2 of ``two-stage``."""
        if self.kind == "two-stage" and step >= self.stage2_start:
            return 0.0
        return self.weight_decay


def cosine(start: float, end: float, done: int, length: int) -> float:
    """Cosine interpolation from ``start`` (done=0) to ``end`` (done=length)."""
    if length <= 0:
        return end
    progress = min(max(done / length, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(kind: str, peak_lr: float, total_steps: int, warmup_fraction: float = 0.0,
                  eta_min: float = 0.0, weight_decay: float = 0.0, stage2_lr_fraction: float = 0.1) -> Schedule:
    """A schedule whose warmup is ``warmup_fraction`` of ``total_steps`` (rounded, at most all but one step)."""
    warmup = min(int(round(warmup_fraction * total_steps)), max(total_steps - 1, 0))
    return Schedule(kind=kind, peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup, eta_min=eta_min,
                    weight_decay=weight_decay, stage2_lr_fraction=stage2_lr_fraction)


def quant_mix(step: int, warmup_steps: int) -> float:
    """Quantization mix of optimizer step ``step`` (1-based): ``step / warmup_steps`` up to 1; step 0 (the
    model before training) is 0. No warmup (``warmup_steps`` 0) is 1 throughout: plain ternary training."""
    if warmup_steps <= 0:
        return 1.0
    return min(max(step, 0) / warmup_steps, 1.0)
