"""The 8-bit activation codes of a qat step, taken from one backend and imposed on another: what makes the
cross-backend qat check well-conditioned.

BitLinear rounds each activation to ``round(x * 127 / absmax)`` per token. Two libraries compute ``x`` with
different summation orders (matmul, rms_norm), so their ``x`` differ in the last bits, and an element whose
``x * scale`` lies within those bits of a rounding boundary (k + 1/2) gets codes one apart: that activation then
moves by a whole quantization step (1/127 of the token's absmax), which no fp32 tolerance on the gradients
absorbs. ``recording_mlx_codes`` records the codes the MLX block math chose, call by call;
``torch_with_codes`` runs the torch block math with those codes instead of its own roundings (its own scale,
its own straight-through gradient: everything but the rounding decision is torch's) and counts where the two
differed and how close to a boundary each such element was.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import offload_bitnet.model.block as torch_block


def torch_activation_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-token scale of ``model.ternary.quantize_activation`` (127 / absmax), computed as it does."""
    return 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)


@dataclass
class CodeFlips:
    """Where imposed codes differed from the ones torch would have chosen (one entry per quantizer call)."""

    calls: int = 0
    elements: int = 0
    differing: int = 0
    largest_step: int = 0            # the largest |imposed - own| code difference
    widest_margin: float = 0.0       # the largest distance of a differing element's x * scale from k + 1/2
    per_call: list = field(default_factory=list)


@contextmanager
def recording_mlx_codes(codes: list):
    """While active, every 8-bit activation quantization of ``backends.mlx.model`` appends its (lazy) int codes
    to ``codes``, in call order; ``mx.eval`` them before use."""
    import mlx.core as mx

    import offload_bitnet.backends.mlx.model as mlx_block

    quantize = mlx_block.ste_quantize_activation

    def recording(x):
        scale = mx.reciprocal(mx.maximum(mx.max(mx.abs(x), axis=-1, keepdims=True), 1e-5)) * 127.0
        codes.append(mx.clip(mx.round(x * scale), -128, 127))
        return quantize(x)

    mlx_block.ste_quantize_activation = recording
    try:
        yield codes
    finally:
        mlx_block.ste_quantize_activation = quantize


class _ImposedCodes(torch.autograd.Function):
    """Forward: ``codes / scale`` with torch's own scale of ``x``; backward: straight through, as
    ``model.ternary.ste_quantize_activation``."""

    @staticmethod
    def forward(ctx, x, codes):
        return codes.to(x.dtype) / torch_activation_scale(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


@contextmanager
def torch_with_codes(codes: list):
    """While active, the torch block math (``model.block``) quantizes its activations to ``codes`` (torch
    tensors, one per call, in the order ``recording_mlx_codes`` saw them) instead of rounding them itself.
    Yields a ``CodeFlips`` that counts, call by call, the elements where torch would have rounded otherwise.
    Raises if the calls do not line up (a different number, or shapes)."""
    flips = CodeFlips()
    pending = list(codes)
    quantize = torch_block.ste_quantize_activation

    def imposed(x):
        if not pending:
            raise RuntimeError("the torch step quantized more activations than the recorded step did")
        imposed_codes = pending.pop(0)
        if imposed_codes.shape != x.shape:
            raise RuntimeError(f"recorded codes {tuple(imposed_codes.shape)} do not match the activation "
                               f"{tuple(x.shape)}: the two steps' quantizer calls are not in the same order")
        with torch.no_grad():
            scaled = x.detach() * torch_activation_scale(x.detach())
            own = scaled.round().clamp(-128, 127)
            differs = own != imposed_codes
            count = int(differs.sum())
            flips.calls += 1
            flips.elements += own.numel()
            flips.differing += count
            flips.per_call.append(count)
            if count:
                flips.largest_step = max(flips.largest_step, int((own - imposed_codes).abs().max()))
                margin = ((scaled - scaled.floor()) - 0.5).abs()[differs].max().item()
                flips.widest_margin = max(flips.widest_margin, margin)
        return _ImposedCodes.apply(x, imposed_codes)

    torch_block.ste_quantize_activation = imposed
    try:
        yield flips
    finally:
        torch_block.ste_quantize_activation = quantize
    if pending:
        raise RuntimeError(f"{len(pending)} recorded activation codes were not used: the two steps' quantizer "
                           "calls are not in the same order")
