"""AdamW for one unit at a time: the same arithmetic as ``torch.optim.AdamW(fused=True)``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class AdamWConfig:
    """Hyper-parameters of AdamW. Weight decay applies to matrices only (not norms)."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


def decays(tensor: torch.Tensor) -> bool:
    """Whether weight decay applies to a parameter: matrices yes, norm vectors no."""
    return tensor.dim() >= 2


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, config: AdamWConfig, lr: float | None = None):
    """Update fp32 ``param``, ``exp_avg`` and ``exp_avg_sq`` in place. ``step`` counts from 1.

    Uses torch's fused AdamW kernel (the one behind ``torch.optim.AdamW(fused=True)``: one pass over memory
    instead of seven), and the same arithmetic written out where that kernel is missing."""
    lr = config.lr if lr is None else lr
    weight_decay = config.weight_decay if decays(param) else 0.0
    fused = getattr(torch, "_fused_adamw_", None)
    if fused is not None and param.device.type in ("cpu", "cuda", "mps"):
        fused([param], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step), device=param.device)],
              lr=lr, beta1=config.beta1, beta2=config.beta2, weight_decay=weight_decay, eps=config.eps,
              amsgrad=False, maximize=False)
        return
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - config.beta1)
    exp_avg_sq.mul_(config.beta2).addcmul_(grad, grad, value=1 - config.beta2)
    bias_correction1 = 1 - config.beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - config.beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(config.eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def torch_param_groups(named_params: dict[str, torch.nn.Parameter], config: AdamWConfig) -> list[dict]:
    """Param groups for ``torch.optim.AdamW`` that decay exactly the tensors ``adamw_update`` decays."""
    decayed = [p for p in named_params.values() if decays(p)]
    plain = [p for p in named_params.values() if not decays(p)]
    return [{"params": decayed, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
