"""BitNet b1.58 quantization with transformers' exact semantics, and 2-bit packing.

Weights: gamma = max(mean|W|, 1e-5); codes = clamp(round(W / gamma), -1, 1) (round half to even).
Activations: per token, scale = 127 / max(max|x|, 1e-5); clamp(round(x * scale), -128, 127) / scale.
Both use the straight-through estimator: the gradient passes through unchanged.

Packing follows transformers' ``pack_weights``: uint8 ``[out/4, in]``, code+1 in 2-bit fields, the field at
shift 2*i of packed row r holding row ``i*out/4 + r``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

VALUES_PER_BYTE = 4


def weight_scale(weight: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor scale gamma = max(mean|W|, 1e-5), as a 1-element fp32 tensor. ``scratch``: an fp32 tensor
    shaped like ``weight`` to compute |W| in (instead of new memory)."""
    if scratch is None:
        absolute = weight.float().abs()
    elif weight.dtype == scratch.dtype:
        absolute = torch.abs(weight, out=scratch)
    else:
        absolute = scratch.copy_(weight).abs_()
    return absolute.mean().clamp(min=1e-5).reshape(1)


def ternary_codes(weight: torch.Tensor, scale: torch.Tensor | None = None,
                  scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight matrix to int8 codes in {-1, 0, 1} and its scale gamma (``scratch`` as in
    ``weight_scale``)."""
    if scale is None:
        scale = weight_scale(weight, scratch)
    return _scaled(weight, scale, scratch).round_().clamp_(-1, 1).to(torch.int8), scale


def _scaled(weight: torch.Tensor, scale: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``weight / gamma`` (in ``scratch`` when given), multiplied by the reciprocal as transformers'
    WeightQuant does, so that ties round identically."""
    if scratch is None:
        return weight.float() * (1.0 / scale)
    return torch.mul(weight, 1.0 / scale, out=scratch)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Ternary codes back to a dense weight: codes * gamma (into ``out`` when given)."""
    if out is not None:
        return torch.div(out.copy_(codes), 1.0 / scale.to(out.dtype), out=out)
    return codes.to(dtype) / (1.0 / scale.to(dtype))


def quantize_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense fake-quantized weight (no gradient path); equals transformers' WeightQuant forward. ``out``: a
    tensor shaped like ``weight`` (of its dtype) to compute in and return."""
    codes, scale = ternary_codes(weight, scratch=out if out is not None and out.dtype == torch.float32 else None)
    return dequantize(codes, scale, weight.dtype if weight.is_floating_point() else torch.float32, out=out)


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token 8-bit fake quantization of activations (no gradient path)."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


class _StraightThrough(torch.autograd.Function):
    """Forward returns exactly the quantized value; backward passes the gradient unchanged (as transformers'
    WeightQuant/ActQuant). ``x + (q - x).detach()`` would differ from q by rounding."""

    @staticmethod
    def forward(ctx, x, quantize):
        return quantize(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def ste_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(weight, quantize_weight)


def ste_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(x, quantize_activation)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes ``[out, in]`` (out divisible by 4) into uint8 ``[out/4, in]``."""
    out_features = _packable_rows(codes)
    fields = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(VALUES_PER_BYTE, out_features // 4, *codes.shape[1:])
    return fields[0] | (fields[1] << 2) | (fields[2] << 4) | (fields[3] << 6)


def _packable_rows(weight: torch.Tensor) -> int:
    """The output dimension of a weight to pack; it must be divisible by 4 (four rows per byte)."""
    out_features = weight.shape[0]
    if out_features % VALUES_PER_BYTE:
        raise ValueError(f"cannot pack {out_features} rows: the output dimension must be divisible by 4")
    return out_features


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 ``[out/4, in]`` to int8 codes ``[out, in]``."""
    fields = torch.stack([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)])
    return (fields.to(torch.int8) - 1).reshape(packed.shape[0] * VALUES_PER_BYTE, *packed.shape[1:])


def pack_weight(weight: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack a dense weight: returns (uint8 ``[out/4, in]``, fp32 scale ``[1]``), the bytes of
    ``pack_codes(ternary_codes(weight))``. ``scratch`` as in ``weight_scale`` (overwritten)."""
    out_features = _packable_rows(weight)
    scale = weight_scale(weight, scratch)
    # Every update of a qat store packs all its projections (at 7B, 6.5G values a step), so the fields are made
    # where the scaled weight is, in fp32, without int8/int16 copies of the whole weight: code + 1 is 0, 1 or 2,
    # and field0 + 4 field1 + 16 field2 + 64 field3 is an exact small integer in fp32, the packed byte itself.
    fields = _scaled(weight, scale, scratch).round_().clamp_(-1, 1).add_(1)
    fields = fields.reshape(VALUES_PER_BYTE, out_features // 4, *weight.shape[1:])
    packed = fields[0].add_(fields[1], alpha=4).add_(fields[2], alpha=16).add_(fields[3], alpha=64)
    return packed.to(torch.uint8), scale


def unpack_weight(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense fake-quantized weight from its packed form; equals ``quantize_weight`` of the source. ``out``: a
    ``[out, in]`` tensor of ``dtype`` to unpack into (no temporaries the size of the weight)."""
    if out is None:
        out = torch.empty((packed.shape[0] * VALUES_PER_BYTE, *packed.shape[1:]), dtype=dtype, device=packed.device)
    rows = out.view(VALUES_PER_BYTE, *packed.shape)
    field = torch.empty_like(packed)
    for i in range(VALUES_PER_BYTE):
        rows[i].copy_(torch.bitwise_and(torch.bitwise_right_shift(packed, 2 * i, out=field), 3, out=field))
    # The fields hold code + 1; exact small integers in any float dtype, so this is codes * gamma exactly.
    return torch.div(out.sub_(1), 1.0 / scale.to(out.dtype), out=out)


@dataclass(frozen=True)
class PackedTernary:
    """A ternary weight that is already quantized and packed (as ``pack_weight`` returns it): uint8 ``packed``
    ``[out/4, in]`` and the scale gamma. An importer hands it to a packed-only store, which keeps it as it is
    (``Layout.encode``) instead of unpacking and re-quantizing."""

    packed: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The dense weight's shape ``[out, in]``."""
        return torch.Size((self.packed.shape[0] * VALUES_PER_BYTE, *self.packed.shape[1:]))


def latent_weight(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An fp32 weight whose quantization gives back exactly these packed codes and (to fp32 rounding) gamma.

    The plain dequantized weight ``codes * gamma`` would not do: re-quantizing it yields the scale
    ``gamma * mean|codes|``, not gamma. Dividing by ``mean|codes|`` (the fraction of nonzero codes) makes
    ``mean|W| = gamma`` and keeps every code (``|code / fraction| >= 1`` still rounds to +-1).
    """
    codes = unpack_codes(packed).float()
    fraction = codes.abs().mean()
    if fraction == 0:
        return torch.zeros_like(codes)
    return codes * (scale.float().reshape(()) / fraction)
