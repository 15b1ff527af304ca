"""Durable files: atomic writes through a temporary file and a rename, fsync of files and folders, early
writeback."""
from __future__ import annotations

import ctypes
import os
import threading

from crc32c import crc32c

from offload_bitnet.io.faults import fault_point


def _start_writeback(fd: int):
    """Ask the kernel to start writing a file's dirty pages now, without waiting (Linux); elsewhere a no-op,
    and the fsync at commit does all the work."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE


def _load_sync_file_range():
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    return function


_sync_file_range = _load_sync_file_range()


def fsync_path(path: str):
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, *chunks, durable: bool = True, reuse: str | None = None) -> tuple[int, int]:
    """Write ``chunks`` (bytes-like) to ``path`` through a temporary file and a rename.

    ``durable``: fsync before the rename. Otherwise writeback only starts, and the caller must fsync the file
    before anything durable refers to it (``BlockStore.commit`` does). ``reuse``: a disposable file to overwrite
    in place instead of allocating a new one. Returns (size, crc32c) written."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    size, crc = 0, 0
    mode = "wb"
    if reuse is not None:
        try:
            os.replace(reuse, tmp)
            mode = "r+b"
        except FileNotFoundError:
            pass
    try:
        with open(tmp, mode) as handle:
            for chunk in chunks:
                handle.write(chunk)
                size += len(chunk)
                crc = crc32c(chunk, crc)
                fault_point("write.data")
            handle.truncate()
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
            else:
                _start_writeback(handle.fileno())
        fault_point("write.rename")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return size, crc
