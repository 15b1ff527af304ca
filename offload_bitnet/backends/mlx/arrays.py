"""Arrays in and out of MLX: torch CPU tensors and numpy arrays to ``mx.array`` and back.

MLX -> numpy/torch shares memory (numpy's buffer protocol); numpy/torch -> MLX copies once, since
``mx.array`` owns its buffers. numpy has no bfloat16, so bf16 travels as its raw 16 bits and is reinterpreted on
the other side. On the CPU backend 16-bit values are widened to fp32 for compute (``compute_dtype``).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch

# The compute dtype of the CPU backend: 16-bit matmuls are far slower than fp32 there (as in the torch path).
CPU_COMPUTE_DTYPE = mx.float32

_TORCH_TO_MX = {
    torch.float64: mx.float64, torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16,
    torch.int64: mx.int64, torch.int32: mx.int32, torch.int16: mx.int16, torch.int8: mx.int8,
    torch.uint8: mx.uint8, torch.bool: mx.bool_,
}
_MX_TO_TORCH = {value: key for key, value in _TORCH_TO_MX.items()}


def default_compute_dtype() -> mx.Dtype:
    """fp32 on the CPU device, bf16 on a GPU (Metal), as ``engine.default_compute_dtype`` does for torch."""
    return CPU_COMPUTE_DTYPE if mx.default_device() == mx.cpu else mx.bfloat16


def to_mx(value, dtype: mx.Dtype | None = None) -> mx.array:
    """A torch tensor (CPU), numpy array or ``mx.array`` as an ``mx.array``, converted to ``dtype`` if given."""
    if isinstance(value, mx.array):
        array = value
    elif isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.device.type != "cpu":
            raise ValueError(f"to_mx takes CPU tensors, got one on {tensor.device}: move it with .cpu() first")
        if tensor.dtype == torch.bfloat16:
            # numpy cannot hold bf16: pass the raw bits and reinterpret them in MLX (no rounding anywhere).
            array = mx.array(tensor.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
        elif tensor.dtype in _TORCH_TO_MX:
            # The dtype explicitly: mx.array would make float64 numpy arrays float32.
            array = mx.array(tensor.contiguous().numpy(), dtype=_TORCH_TO_MX[tensor.dtype])
        else:
            raise ValueError(f"to_mx: torch dtype {tensor.dtype} has no MLX counterpart")
    else:
        array = mx.array(np.ascontiguousarray(value))
    return array if dtype is None or array.dtype == dtype else array.astype(dtype)


def to_numpy(array: mx.array) -> np.ndarray:
    """An ``mx.array`` as a numpy array sharing its memory (evaluates it first); bf16 comes back as fp32."""
    if array.dtype == mx.bfloat16:
        array = array.astype(mx.float32)
    return np.array(array, copy=False)


def to_torch(array: mx.array, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An ``mx.array`` as a CPU torch tensor sharing its memory where the dtypes allow (bf16 keeps its bits)."""
    if array.dtype == mx.bfloat16:
        tensor = torch.from_numpy(np.array(array.view(mx.int16), copy=False)).view(torch.bfloat16)
    elif array.dtype in _MX_TO_TORCH:
        tensor = torch.from_numpy(np.array(array, copy=False))
    else:
        raise ValueError(f"to_torch: MLX dtype {array.dtype} has no torch counterpart")
    return tensor if dtype is None else tensor.to(dtype)


def tree_to_mx(tensors: dict, dtype: mx.Dtype | None = None, floating_only: bool = True) -> dict:
    """``{name: to_mx(tensor, dtype)}``; with ``floating_only`` the dtype applies to floating tensors only
    (packed uint8 weights and token ids keep theirs)."""
    converted = {}
    for name, value in tensors.items():
        array = to_mx(value)
        if dtype is not None and (not floating_only or mx.issubdtype(array.dtype, mx.floating)):
            array = array.astype(dtype)
        converted[name] = array
    return converted
