"""A whole model in memory in MLX: the reference a streamed MLX step is checked against (as ``inmemory`` is for
torch). ``mx.value_and_grad`` over the step loss gives the gradients, ``adamw_step`` the update; the same block
math and the same dropout keys (seed, step, micro-batch, layer) as the streamed step. Only for models that fit
in memory.

Units are keyed as in the store: ``{"embed": {"weight"}, block_unit(i): {<block params>}, "norm": {"weight"},
"head": {"weight"}}`` (no ``head`` when the embeddings are tied). Block params may hold LoRA matrices
(``"<proj>.lora_a"``, ``"<proj>.lora_b"``, see ``model``).
"""
from __future__ import annotations

import mlx.core as mx

from offload_bitnet.model.config import ModelConfig
from offload_bitnet.store.units import block_unit
from offload_bitnet.backends.mlx.loss import IGNORE_INDEX, shift_labels, token_cross_entropy
from offload_bitnet.backends.mlx.model import LORA_A, LORA_B, block_forward, dropout_key, rms_norm, rope_tables
from offload_bitnet.backends.mlx.optim import adamw_update


def head_weight(units: dict, config: ModelConfig) -> mx.array:
    return units["embed" if config.tie_embeddings else "head"]["weight"]


def hidden_states(units: dict, input_ids: mx.array, config: ModelConfig, *, quantize: float = 0.0,
                  weight_quantize: float = 0.0, dropout_p: float = 0.0, lora_scaling: float = 1.0,
                  lora_dropout: float = 0.0, seed: int = 0, step: int = 0, micro: int = 0) -> mx.array:
    """Final-norm hidden states ``[B, T, dim]``; dropout (when ``dropout_p`` or ``lora_dropout``) keyed by
    (seed, step, micro, layer) like the streamed step."""
    cos, sin = rope_tables(config, input_ids.shape[1])
    x = units["embed"]["weight"][input_ids]
    training = dropout_p > 0 or lora_dropout > 0
    for layer in range(config.n_layers):
        key = dropout_key(seed, step, micro, layer) if training else None
        x = block_forward(units[block_unit(layer)], x, config, cos, sin, quantize=quantize,
                          weight_quantize=weight_quantize, dropout_p=dropout_p, key=key, lora_scaling=lora_scaling,
                          lora_dropout=lora_dropout)
    return rms_norm(x, units["norm"]["weight"], config.norm_eps)


def step_loss(units: dict, micro_batches, config: ModelConfig, *, seed: int = 0, step: int = 1,
              **options) -> mx.array:
    """The loss one step minimizes: the token-mean cross-entropy over all micro-batches
    ``[(input_ids, labels or None)]`` (``options``: those of ``hidden_states``)."""
    targets = [shift_labels(ids, labels) for ids, labels in micro_batches]
    n_tokens = sum(int((t != IGNORE_INDEX).sum().item()) for t in targets)
    total = mx.array(0.0)
    for micro, ((ids, _), target) in enumerate(zip(micro_batches, targets)):
        hidden = hidden_states(units, ids, config, seed=seed, step=step, micro=micro, **options)
        total = total + token_cross_entropy(hidden @ head_weight(units, config).T, target)
    return total / n_tokens


def split_trainable(units: dict, lora: bool) -> tuple[dict, dict]:
    """``(trainable, frozen)`` nested dicts: the LoRA matrices (``lora``) or every other tensor (full, qat)."""
    trainable, frozen = {}, {}
    for unit, params in units.items():
        for name, value in params.items():
            side = trainable if name.endswith((LORA_A, LORA_B)) == lora else frozen
            side.setdefault(unit, {})[name] = value
    return trainable, frozen


def merge(first: dict, second: dict) -> dict:
    """Two nested unit dicts as one."""
    merged = {unit: dict(params) for unit, params in first.items()}
    for unit, params in second.items():
        merged.setdefault(unit, {}).update(params)
    return merged


def loss_and_grads(units: dict, micro_batches, config: ModelConfig, *, lora: bool = False,
                   **options) -> tuple[mx.array, dict]:
    """The step loss and its gradients w.r.t. the trainable tensors (``split_trainable``), by ``mx.value_and_grad``
    (``options``: those of ``step_loss``)."""
    trainable, frozen = split_trainable(units, lora)

    def loss(trainable):
        return step_loss(merge(frozen, trainable), micro_batches, config, **options)

    return mx.value_and_grad(loss)(trainable)


def adamw_step(params: dict, grads: dict, moments: dict, step: int, lr: float, betas=(0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.0) -> tuple[dict, dict]:
    """One AdamW step over nested ``params`` with ``grads`` of the same shape; ``moments`` maps unit -> name ->
    (exp_avg, exp_avg_sq) and may be empty before the first step. Matrices decay, norms do not (``optim.decays``).
    Returns the new params and moments."""
    new_params, new_moments = {}, {}
    for unit, tensors in params.items():
        new_params[unit], new_moments[unit] = {}, {}
        for name, param in tensors.items():
            exp_avg, exp_avg_sq = moments.get(unit, {}).get(name, (mx.zeros_like(param), mx.zeros_like(param)))
            param, exp_avg, exp_avg_sq = adamw_update(param, grads[unit][name], exp_avg, exp_avg_sq, step, lr, betas,
                                                      eps, weight_decay, decay=param.ndim >= 2)
            new_params[unit][name], new_moments[unit][name] = param, (exp_avg, exp_avg_sq)
    return new_params, new_moments
