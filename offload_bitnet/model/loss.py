"""The training loss: next-token targets (``IGNORE_INDEX`` marks positions without one) and a cross-entropy
over the vocabulary computed a chunk of tokens at a time, whose weight gradient can be handed on a row range at
a time."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets: position t predicts labels[t+1]; the last position predicts nothing."""
    labels = input_ids if labels is None else labels
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunked_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int, scale: float, backward: bool, weight_grad: torch.Tensor | None = None,
                          accumulate: bool = False, on_weight_rows=None, row_slices: int = 4):
    """Sum of token cross-entropies times ``scale``, computed ``chunk_tokens`` rows of logits at a time, so that
    [tokens x vocab] logits never exist at once.

    With ``backward``, returns the gradient w.r.t. ``hidden``, and writes the gradient w.r.t. ``head_weight`` into
    ``weight_grad`` when one is given (``accumulate``: adds it). ``on_weight_rows(rows, loss_so_far)`` is then
    called for each of ``row_slices`` row ranges of ``weight_grad`` in order, as soon as those rows are final,
    with the summed loss so far: an update of those rows can start while the rest is computed (it must not
    change ``head_weight``, which this call reads to the end).
    """
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])
    targets = targets.reshape(-1)
    starts = [start for start in range(0, hidden.shape[0], chunk_tokens)
              if (targets[start:start + chunk_tokens] != IGNORE_INDEX).any()]
    total = torch.zeros((), dtype=torch.float64)
    grad_hidden = torch.zeros_like(hidden) if backward else None
    rows, extra = divmod(head_weight.shape[0], row_slices)  # the first ``extra`` ranges get one row more
    bounds = [i * rows + min(i, extra) for i in range(row_slices + 1)]
    row_ranges = [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    weight = head_weight.detach()
    for start in starts:
        stop = start + chunk_tokens
        chunk = hidden[start:stop].detach()
        with torch.no_grad():
            logits = F.linear(chunk, weight).float()
        with torch.enable_grad():
            logits.requires_grad_(backward)
            loss = F.cross_entropy(logits, targets[start:stop], ignore_index=IGNORE_INDEX, reduction="sum") * scale
            if backward:
                (grad_logits,) = torch.autograd.grad(loss, logits)
        total += loss.detach().double().cpu()
        if not backward:
            continue
        # The two products of autograd's backward of F.linear, in its orientation (the same bits), written out so
        # that the weight gradient can be handed on a row range at a time.
        grad_logits = grad_logits.to(weight.dtype)
        if weight_grad is not None:
            split = on_weight_rows is not None and start == starts[-1]
            for rows in row_ranges if split else [slice(None)]:
                if accumulate:
                    weight_grad[rows].add_(grad_logits[:, rows].t().mm(chunk))
                elif weight_grad.dtype == chunk.dtype:
                    torch.mm(grad_logits[:, rows].t(), chunk, out=weight_grad[rows])
                else:  # a wider buffer (exact sums: float64) takes the product as computed
                    weight_grad[rows].copy_(grad_logits[:, rows].t().mm(chunk))
                if split:
                    on_weight_rows(rows, total.item())
            accumulate = True
        torch.mm(grad_logits, weight, out=grad_hidden[start:stop])
    if backward and weight_grad is not None and not starts:
        if not accumulate:
            weight_grad.zero_()
        for rows in row_ranges if on_weight_rows is not None else []:
            on_weight_rows(rows, 0.0)
    return total.item(), (grad_hidden.reshape(shape) if backward else None)
