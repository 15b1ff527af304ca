"""Reusable host memory for unit-sized tensors.

A streamed step touches its model's size in fresh tensors several times over: file reads, 16-to-32-bit
conversions, moments, quantized copies, encoded copies. The first touch of fresh memory costs far more than
the work done on it (measured on the 2-core development machine: converting 16M fp16 values into a new fp32
tensor takes 0.063 s, into one already mapped 0.011 s; reading a cached 64 MiB file into new memory 0.099 s,
into mapped memory 0.017 s). ``BufferPool`` hands out tensors backed by buffers it keeps and reuses.

Callers never give buffers back: a buffer is free again once the last tensor viewing it is gone. Each buffer
is an anonymous ``mmap`` and every tensor made from it holds a reference to it (the buffer protocol), so a
buffer whose reference count is back to the pool's own references is unused.
"""
from __future__ import annotations

import math
import mmap
import sys
import threading
from collections import OrderedDict

import torch

# Below this, malloc's own free lists already reuse memory well.
MIN_POOLED_BYTES = 1 << 20
_HUGE_PAGE = 2 << 20


def _granule(nbytes: int) -> int:
    """Buffer size for a request: whole huge pages for large buffers, whole 64 KiB otherwise."""
    unit = _HUGE_PAGE if nbytes >= _HUGE_PAGE else 1 << 16
    return -(-nbytes // unit) * unit


def _references(entry: tuple) -> int:
    """References to the buffer of a pool entry ``(size, buffer)``: the entry's own, plus one per tensor."""
    return sys.getrefcount(entry[1])


_FREE_REFERENCES = _references((0, mmap.mmap(-1, mmap.PAGESIZE)))  # an entry no tensor uses


def default_keep_bytes() -> int:
    """How much unused memory a pool may hold on to: a quarter of this machine's RAM."""
    try:
        import psutil
        return psutil.virtual_memory().total // 4
    except Exception:  # noqa: BLE001 - any failure to ask: a conservative fixed size
        return 4 << 30


class BufferPool:
    """Hands out CPU tensors backed by reusable buffers (see the module docstring).

    ``keep_bytes`` bounds the memory held in unused buffers: when a new buffer would take the pool past it, the
    least recently used unused buffers are released first. Tensors in use are never touched.
    """

    def __init__(self, keep_bytes: int | None = None):
        self.keep_bytes = default_keep_bytes() if keep_bytes is None else keep_bytes
        self._buffers: OrderedDict[int, tuple[int, mmap.mmap]] = OrderedDict()  # id -> (size, buffer), LRU first
        self._lock = threading.Lock()
        self.pooled_bytes = 0
        self.reused = 0
        self.allocated = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized CPU tensor."""
        shape = tuple(shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes < MIN_POOLED_BYTES:
            return torch.empty(shape, dtype=dtype)
        buffer = self._take(_granule(nbytes))
        return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)

    def convert(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` as ``dtype`` on the CPU: itself when it already is, else a pooled copy."""
        if tensor.dtype == dtype and tensor.device.type == "cpu":
            return tensor
        return self.empty(tensor.shape, dtype).copy_(tensor)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A pooled copy of a CPU tensor."""
        return self.empty(tensor.shape, tensor.dtype).copy_(tensor)

    def unused_bytes(self) -> int:
        """Bytes of buffers the pool holds that no tensor uses now (mapped, and resident once touched)."""
        with self._lock:
            return sum(entry[0] for entry in self._buffers.values() if _references(entry) <= _FREE_REFERENCES)

    def release(self):
        """Unmap every unused buffer (buffers in use stay until their tensors are gone)."""
        with self._lock:
            self._evict(float("inf"))

    def _take(self, size: int) -> mmap.mmap:
        with self._lock:
            for key, entry in self._buffers.items():
                if entry[0] == size and _references(entry) <= _FREE_REFERENCES:
                    self._buffers.move_to_end(key)
                    self.reused += 1
                    return entry[1]
            if self.pooled_bytes + size > self.keep_bytes:
                self._evict(self.pooled_bytes + size - self.keep_bytes)
            try:
                buffer = mmap.mmap(-1, size)
            except (OSError, MemoryError):  # e.g. an address-space limit: give back what is unused, try once more
                self._evict(float("inf"))
                try:
                    buffer = mmap.mmap(-1, size)
                except OSError as error:
                    raise MemoryError(f"cannot allocate {size / 2**20:.0f} MiB: {error}") from error
            if size >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    buffer.madvise(mmap.MADV_HUGEPAGE)  # fewer, cheaper page faults; ignored where unsupported
                except OSError:
                    pass
            self._buffers[id(buffer)] = (size, buffer)
            self.pooled_bytes += size
            self.allocated += 1
            return buffer

    def _evict(self, nbytes: float):
        """Unmap least recently used unused buffers until ``nbytes`` are released (or none is left)."""
        released = 0
        for key in list(self._buffers):
            if released >= nbytes:
                break
            entry = self._buffers[key]
            if _references(entry) <= _FREE_REFERENCES:
                del self._buffers[key]
                entry[1].close()
                self.pooled_bytes -= entry[0]
                released += entry[0]
