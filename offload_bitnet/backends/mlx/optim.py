"""AdamW on MLX arrays with the arithmetic of torch's fused CPU kernel (``torch.optim.AdamW(fused=True)``,
``optim.adamw_update``): fp32 state, the step's scalar coefficients computed in double and rounded to fp32."""
from __future__ import annotations

import math

import mlx.core as mx


def adamw_update(param: mx.array, grad: mx.array, exp_avg: mx.array, exp_avg_sq: mx.array, step: int, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 decay: bool) -> tuple[mx.array, mx.array, mx.array]:
    """One AdamW update of an fp32 parameter; returns ``(param, exp_avg, exp_avg_sq)`` as new arrays. ``step``
    counts from 1; ``decay``: whether weight decay applies (matrices yes, norms no: ``optim.decays``).

    The same operations in the same order as torch's kernel; its moment update is one fused multiply-add
    where this is two roundings, so values may differ from torch's in the last bit."""
    beta1, beta2 = betas
    grad = grad.astype(mx.float32)
    if decay and weight_decay != 0:
        param = param * (1 - lr * weight_decay)
    # exp_avg.lerp_(grad, 1 - beta1): torch's lerp takes the other end when the weight is >= 0.5.
    weight = 1 - beta1
    if abs(weight) < 0.5:
        exp_avg = exp_avg + weight * (grad - exp_avg)
    else:
        exp_avg = grad - (grad - exp_avg) * (1 - weight)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = mx.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    param = param + (-lr / bias_correction1) * exp_avg / denom
    return param, exp_avg, exp_avg_sq
