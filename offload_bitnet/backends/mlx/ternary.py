"""BitNet b1.58 quantization and the store's 2-bit packing, in MLX (mirrors ``offload_bitnet.ternary``).

Weights: gamma = max(mean|W|, 1e-5); codes = clip(round(W * (1 / gamma)), -1, 1), round half to even.
Activations: per token, s = 127 / max(max|x|, 1e-5); clip(round(x * s), -128, 127) / s.
Packing: uint8 ``[out/4, in]``, code + 1 in 2-bit fields; the field at shift 2*i of packed row r is row
``i * out/4 + r`` (transformers' ``pack_weights``). Unpacking is exact: the store's packed tensors give the very
values ``ternary.unpack_weight`` gives. Straight-through versions return exactly the quantized value forward and
pass the gradient unchanged backward (``x + stop_gradient(q - x)`` would differ from q by rounding).
"""
from __future__ import annotations

import mlx.core as mx

from offload_bitnet.backends.mlx.arrays import to_mx

VALUES_PER_BYTE = 4


def weight_scale(weight: mx.array) -> mx.array:
    """Per-tensor scale gamma = max(mean|W|, 1e-5) as a 1-element fp32 array (the mean is MLX's reduction, so
    it may differ from torch's in the last bit)."""
    return mx.maximum(mx.mean(mx.abs(weight.astype(mx.float32))), 1e-5).reshape(1)


def ternary_codes(weight: mx.array, scale: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """int8 codes in {-1, 0, 1} and the scale gamma of a weight matrix."""
    if scale is None:
        scale = weight_scale(weight)
    # Multiply by the reciprocal, as transformers' WeightQuant does, so that ties round identically.
    scaled = weight.astype(mx.float32) * (1.0 / scale)
    return mx.clip(mx.round(scaled), -1, 1).astype(mx.int8), scale


def dequantize(codes: mx.array, scale: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """codes * gamma, computed as codes / (1 / gamma) like the torch path (bit-identical there)."""
    return codes.astype(dtype) / (1.0 / scale.astype(dtype))


def quantize_weight(weight: mx.array) -> mx.array:
    """Dense fake-quantized weight (no gradient path); transformers' WeightQuant forward."""
    codes, scale = ternary_codes(weight)
    dtype = weight.dtype if mx.issubdtype(weight.dtype, mx.floating) else mx.float32
    return dequantize(codes, scale, dtype)


def quantize_activation(x: mx.array) -> mx.array:
    """Per-token 8-bit fake quantization of activations (no gradient path)."""
    # torch evaluates ``127 / tensor`` as reciprocal(tensor) * 127, one rounding more than a division: mirrored.
    scale = mx.reciprocal(mx.maximum(mx.max(mx.abs(x), axis=-1, keepdims=True), 1e-5)) * 127.0
    return mx.clip(mx.round(x * scale), -128, 127) / scale


@mx.custom_function
def ste_quantize_weight(weight: mx.array) -> mx.array:
    """``quantize_weight`` forward, identity backward: the gradient of the quantized weight is the shadow's."""
    return quantize_weight(weight)


@ste_quantize_weight.vjp
def _ste_quantize_weight_vjp(primals, cotangent, output):
    return (cotangent,)


@mx.custom_function
def ste_quantize_activation(x: mx.array) -> mx.array:
    """``quantize_activation`` forward, identity backward."""
    return quantize_activation(x)


@ste_quantize_activation.vjp
def _ste_quantize_activation_vjp(primals, cotangent, output):
    return (cotangent,)


def pack_codes(codes: mx.array) -> mx.array:
    """int8 codes ``[out, in]`` (out divisible by 4) to uint8 ``[out/4, in]``."""
    out_features = codes.shape[0]
    if out_features % VALUES_PER_BYTE:
        raise ValueError(f"cannot pack {out_features} rows: the output dimension must be divisible by 4")
    fields = (codes.astype(mx.int16) + 1).astype(mx.uint8).reshape(VALUES_PER_BYTE, out_features // 4,
                                                                    *codes.shape[1:])
    return fields[0] | (fields[1] << 2) | (fields[2] << 4) | (fields[3] << 6)


def unpack_codes(packed) -> mx.array:
    """Inverse of ``pack_codes``: uint8 ``[out/4, in]`` (mx, numpy or torch) to int8 codes ``[out, in]``."""
    packed = to_mx(packed)
    fields = mx.stack([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)])
    return (fields.astype(mx.int8) - 1).reshape(packed.shape[0] * VALUES_PER_BYTE, *packed.shape[1:])


def pack_weight(weight: mx.array) -> tuple[mx.array, mx.array]:
    """Quantize and pack a dense weight: (uint8 ``[out/4, in]``, fp32 scale ``[1]``)."""
    codes, scale = ternary_codes(weight)
    return pack_codes(codes), scale


def unpack_weight(packed, scale, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The dense weight ``[out, in]`` of a packed ternary tensor (mx, numpy or torch uint8 and fp32 scale),
    bit-identical to ``ternary.unpack_weight``: the codes are small integers, exact in any float dtype, and the
    division by 1/gamma is the same IEEE operation."""
    return dequantize(unpack_codes(packed), to_mx(scale, mx.float32), dtype)
