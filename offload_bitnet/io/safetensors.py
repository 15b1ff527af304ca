"""The one safetensors codec: files written here are ordinary safetensors files, read back as views of their
bytes (no copy), with the one table of dtype codes every module uses."""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

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


def _pread_into(fd: int, view: memoryview, offset: int, origin: str):
    """Fill ``view`` from ``fd`` at ``offset`` (SafetensorsError if the file ends first)."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if not count:
            raise SafetensorsError(f"{origin} ends inside a tensor; restore it or re-import")
        done += count


class LazySafetensors(Mapping):
    """The tensors of a safetensors file open as ``fd`` (which it owns and closes), each read from the file when
    it is asked for, into ``empty(nbytes)`` (a uint8 tensor) when given, and not kept: a reader that takes one
    tensor at a time holds one tensor's bytes, not the file's."""

    def __init__(self, fd: int, origin: str, empty=None):
        self._fd, self.origin = fd, origin
        self._empty = empty or (lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
        try:
            (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, length, 8))
            header.pop("__metadata__", None)
            self._start, self._header = 8 + length, header
        except (struct.error, ValueError, OSError) as error:
            self.close()
            raise SafetensorsError(f"{origin} is not a readable safetensors file ({error}); restore it or "
                                   "re-import") from error

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._header[name]
        begin, end = info["data_offsets"]
        dtype = TORCH_DTYPES[info["dtype"]]
        if begin == end:
            return torch.empty(info["shape"], dtype=dtype)
        data = self._empty(end - begin)
        _pread_into(self._fd, memoryview(data.numpy()), self._start + begin, self.origin)
        return data.view(dtype).reshape(info["shape"])

    def __iter__(self):
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()
