"""The one safetensors codec: files written here are ordinary safetensors files, read back as views of their
bytes (no copy), with the one table of dtype codes every module uses."""
from __future__ import annotations

import json
import struct

import torch


class SafetensorsError(ValueError):
    """Bytes that are not a readable safetensors file; the message names the file."""


# safetensors dtype codes; files written here are ordinary safetensors files.
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.uint8: "U8",
    torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def encode_safetensors(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list]:
    """The safetensors header and the tensors' raw bytes as buffers (no copy of the data)."""
    header, buffers, offset = {}, [], 0
    # Widest dtypes first, as the safetensors library does, so every tensor stays aligned to its element size.
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        tensor = tensors[name].detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        buffers.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, buffers


def encoded_size(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes ``encode_safetensors`` produces for ``tensors`` (header included), without copying data."""
    header, buffers = encode_safetensors(tensors)
    return len(header) + sum(len(buffer) for buffer in buffers)


def decode_safetensors(data: torch.Tensor, origin: str) -> dict[str, torch.Tensor]:
    """Tensors viewing the file bytes ``data`` (a uint8 tensor, or a writable bytes-like object) in place."""
    try:
        if not isinstance(data, torch.Tensor):
            data = torch.frombuffer(data, dtype=torch.uint8)
        (length,) = struct.unpack_from("<Q", data[:8].numpy(), 0)
        header = json.loads(data[8:8 + length].numpy().tobytes())
        start = 8 + length
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = TORCH_DTYPES[info["dtype"]]
            if begin == end:
                tensors[name] = torch.empty(info["shape"], dtype=dtype)
            else:
                tensors[name] = data[start + begin:start + end].view(dtype).reshape(info["shape"])
        return tensors
    except (struct.error, ValueError, KeyError, RuntimeError) as error:
        raise SafetensorsError(f"{origin} is not a readable safetensors file ({error}); restore it or re-import") from error
