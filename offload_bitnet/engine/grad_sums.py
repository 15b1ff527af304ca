"""How a step sums its micro-batches' gradients of one weight: in the compute dtype, as autograd accumulates a
leaf's ``.grad`` (``RoundedSums``, the default), or exactly (``ExactSums``, ``EngineOptions.exact_grad_sums``).

Rounded sums depend on their order: one process adds ``((g0 + g1) + g2) + g3``, two data-parallel ranks of two
micro-batches ``(g0 + g1) + (g2 + g3)``. The difference is a rounding, but AdamW's first steps divide by
``sqrt(v) + eps``, so where the micro-batches' gradients nearly cancel a rounding moves a weight by up to the
learning rate, and after a few steps the two runs' weights differ by ~1e-5 of a tensor's largest value. Exact
sums add in float64: a sum of a few fp32 gradients is then exact (while their exponents lie within 29 binary
orders of each other, nearly always), so every order gives the same float64 and the same fp32 rounding, and
N ranks x G micro-batches train bit for bit what one process trains with N x G. The price is memory: a block's
summed gradients take 8 bytes per parameter instead of 4 (at 7B, 1.6 GB instead of 0.8 GB), and the data-parallel
reduce sends twice the bytes.

The engine asks its ``GradSums`` to ``track`` every trainable leaf (a tensor, or a ``model.LazyWeight``) before
the step's first backward through it, and reads each leaf's sum with ``summed``; what consumes the sum (the
AdamW update, the ranks' reduce) takes it in whatever dtype it comes (the update rounds it to fp32 once).
"""
from __future__ import annotations

import torch

from offload_bitnet.model.block import LazyWeight


class RoundedSums:
    """Autograd's own accumulation: each micro-batch's gradient added into the leaf's ``.grad``."""

    exact = False

    def track(self, leaf):
        return leaf

    def summed(self, leaf) -> torch.Tensor | None:
        return leaf.grad

    def summed_or_zeros(self, leaf) -> torch.Tensor:
        """The sum, made zeros when no micro-batch gave the leaf a gradient (a rank's share of a data-parallel
        step, reduced with the others')."""
        if leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
        return leaf.grad

    def buffer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of a gradient buffer the engine sums into itself (the head's)."""
        return dtype


class ExactSums:
    """Float64 sums (see the module docstring). A tensor leaf's gradient moves into its float64 sum as soon as
    autograd has made it (a post-accumulate hook), so only one weight's fp32 gradient exists beside the sums;
    a ``LazyWeight`` sums into a float64 ``.grad`` itself."""

    exact = True

    def track(self, leaf):
        if isinstance(leaf, LazyWeight):
            leaf.grad_dtype = torch.float64
        elif not getattr(leaf, "_exact_sum_tracked", False):
            leaf._exact_sum_tracked = True
            leaf.register_post_accumulate_grad_hook(_move_into_sum)
        return leaf

    def summed(self, leaf) -> torch.Tensor | None:
        if isinstance(leaf, LazyWeight):
            return leaf.grad
        return getattr(leaf, "grad_sum", None)

    def summed_or_zeros(self, leaf) -> torch.Tensor:
        if self.summed(leaf) is None:
            leaf.grad_sum = torch.zeros_like(leaf, dtype=torch.float64)
        return self.summed(leaf)

    def buffer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64


def _move_into_sum(leaf: torch.Tensor):
    total = getattr(leaf, "grad_sum", None)
    if total is None:
        leaf.grad_sum = leaf.grad.to(torch.float64)
    else:
        total.add_(leaf.grad)
    leaf.grad = None


def grad_sums(exact: bool):
    """The engine's way of summing gradients: exact (float64) or rounded (autograd's)."""
    return ExactSums() if exact else RoundedSums()
