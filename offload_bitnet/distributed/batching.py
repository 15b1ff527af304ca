"""How an optimizer step's sequences are split over ranks and micro-batches, and the global token count the
loss is normalized by.

``--batch-size`` is the number of sequences per optimizer step whatever the number of ranks. The sequences of
one step, in the order a single process takes them (global positions ``0 .. batch_size-1``), are cut into
``world_size x grad_accum`` micro-batches of ``per_rank_batch`` sequences; rank ``r`` takes the ``grad_accum``
consecutive micro-batches ``r*grad_accum .. r*grad_accum + grad_accum - 1``. So N ranks x M micro-batches see
exactly the micro-batches of 1 rank x N*M, and summing the ranks' gradients in rank order adds the same
per-micro-batch sums a single process adds in micro-batch order.
"""
from __future__ import annotations

import torch

from offload_bitnet.model.loss import IGNORE_INDEX

_MAX_LISTED = 8  # valid values listed in an error message


class BatchSplitError(ValueError):
    """--batch-size does not divide into ranks x micro-batches; the message lists values that do."""


def per_rank_batch(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Sequences per micro-batch on each rank: ``batch_size / (world_size x grad_accum)``, exactly.

    Raises BatchSplitError listing valid --batch-size values for this --grad-accum and world size, and valid
    --grad-accum values for this --batch-size."""
    for name, value in (("--batch-size", batch_size), ("the number of ranks", world_size),
                        ("--grad-accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise BatchSplitError(f"{name} must be a positive whole number, got {value!r}")
    parts = world_size * grad_accum
    if batch_size % parts == 0:
        return batch_size // parts
    sizes = [parts * k for k in range(1, _MAX_LISTED + 1)]
    accums = [g for g in range(1, batch_size + 1) if batch_size % (world_size * g) == 0][:_MAX_LISTED]
    ranks = "rank" if world_size == 1 else "ranks"
    message = (f"--batch-size {batch_size} (sequences per optimizer step) does not split over {world_size} {ranks} "
               f"x --grad-accum {grad_accum} micro-batches: it must be a multiple of {parts}. "
               f"Valid --batch-size with --grad-accum {grad_accum}: {', '.join(map(str, sizes))}, ...")
    if accums:
        message += f"; valid --grad-accum with --batch-size {batch_size}: {', '.join(map(str, accums))}"
    else:
        message += (f"; no --grad-accum works with --batch-size {batch_size} on {world_size} {ranks} "
                    f"(it needs at least {world_size} sequences, a multiple of {world_size})")
    raise BatchSplitError(message + ".")


def rank_micro_batches(batch_size: int, world_size: int, grad_accum: int, rank: int) -> list[range]:
    """The global positions (within one optimizer step's ``batch_size`` sequences) of each of ``rank``'s
    micro-batches, in the order it runs them."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
    size = per_rank_batch(batch_size, world_size, grad_accum)
    first = rank * grad_accum
    return [range((first + m) * size, (first + m + 1) * size) for m in range(grad_accum)]


def rank_sequences(step_sequences: torch.Tensor, world_size: int, grad_accum: int, rank: int) -> list[torch.Tensor]:
    """``rank``'s micro-batches of one step's ``[batch_size, ...]`` sequences (rows in global order)."""
    return [step_sequences[positions.start:positions.stop]
            for positions in rank_micro_batches(step_sequences.shape[0], world_size, grad_accum, rank)]


def local_target_tokens(targets: list[torch.Tensor]) -> int:
    """Target tokens (not ``IGNORE_INDEX``) in this rank's micro-batches of a step (already shifted targets)."""
    return sum(int((t != IGNORE_INDEX).sum()) for t in targets)


def global_target_tokens(context, targets: list[torch.Tensor]) -> int:
    """Target tokens of the whole step over every rank: the loss's denominator, the same on every rank and
    the same as one process counts over all the step's micro-batches (``context``: a ``DistContext``)."""
    return context.all_reduce_sum_int([local_target_tokens(targets)])[0]
