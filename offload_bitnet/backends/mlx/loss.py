"""Next-token targets and the chunked cross-entropy of the head, in MLX (mirrors the engine's
``shift_labels`` and ``chunked_cross_entropy``)."""
from __future__ import annotations

import mlx.core as mx

from offload_bitnet.model.loss import IGNORE_INDEX  # the one definition


def shift_labels(input_ids: mx.array, labels: mx.array | None = None) -> mx.array:
    """Next-token targets: position t predicts labels[t+1]; the last position predicts nothing."""
    labels = input_ids if labels is None else labels
    ignored = mx.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype)
    return mx.concatenate([labels[:, 1:], ignored], axis=1)


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """The sum over the tokens with a target of ``logsumexp(logits) - logits[target]``, in fp32 (``targets``:
    IGNORE_INDEX for none). The one expression of the loss, for the streamed head and the in-memory reference."""
    logits = logits.astype(mx.float32)
    valid = targets != IGNORE_INDEX
    picked = mx.take_along_axis(logits, mx.where(valid, targets, 0)[..., None].astype(mx.int32), axis=-1)[..., 0]
    return mx.sum(mx.where(valid, mx.logsumexp(logits, axis=-1) - picked, 0.0))


def chunked_cross_entropy(hidden: mx.array, head_weight: mx.array, targets: mx.array, chunk_tokens: int,
                          scale: float, backward: bool) -> tuple[float, mx.array | None, mx.array | None]:
    """Sum of token cross-entropies times ``scale``, computed ``chunk_tokens`` rows of logits at a time, so that
    [tokens x vocab] logits never exist at once. ``hidden`` ``[..., dim]``, ``targets`` ``[...]`` (IGNORE_INDEX:
    no target); chunks without any target are skipped, as in the torch path.

    Returns ``(loss, dL/dhidden, dL/dhead_weight)``, the gradients ``None`` unless ``backward``. Each chunk is
    evaluated before the next is built, so MLX's lazy graph holds one chunk's logits at a time."""
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])
    targets = targets.reshape(-1)
    total = 0.0
    grad_chunks, grad_weight = [], None
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, target = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        valid = target != IGNORE_INDEX
        if not valid.any().item():
            if backward:
                grad_chunks.append(mx.zeros_like(chunk))
            continue

        def chunk_loss(chunk, head_weight):
            return token_cross_entropy(chunk @ head_weight.T, target) * scale

        if backward:
            # Autodiff of the loss expression itself: the same operations as mx.grad over the whole model (the
            # in-memory reference), hence its bits, where a hand-written softmax - onehot rounds differently.
            loss, (grad_chunk, chunk_weight_grad) = mx.value_and_grad(chunk_loss, argnums=(0, 1))(chunk, head_weight)
            grad_chunks.append(grad_chunk)
            grad_weight = chunk_weight_grad if grad_weight is None else grad_weight + chunk_weight_grad
            mx.eval(loss, grad_chunks[-1], grad_weight)
        else:
            loss = chunk_loss(chunk, head_weight)
        total += loss.item()
    if not backward:
        return total, None, None
    if grad_weight is None:
        grad_weight = mx.zeros_like(head_weight)
    grad_hidden = mx.concatenate(grad_chunks, axis=0) if grad_chunks else mx.zeros_like(hidden)
    return total, grad_hidden.reshape(shape), grad_weight
