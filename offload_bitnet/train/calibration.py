"""Measured speeds of the machine a plan is made on: disk read and write in the store's folder, and the
compute the engine does per token and per parameter on the chosen device. A few seconds of probes, cached
per machine, device and filesystem in ``~/.cache/offload_bitnet/calibration.json`` (``--recalibrate`` redoes
them).

The probes run the engine's own code paths where they can: the write goes through ``store.write_file_atomic``
(crc32c and fsync included), the read through plain reads with the page cache dropped for the file
(``posix_fadvise(DONTNEED)``, so it measures the disk, not RAM), and the per-parameter costs time
``Layout``, ``quantize_weight`` and ``adamw_update`` on one projection-sized matrix of the store's settings.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time

import torch
from crc32c import crc32c

from offload_bitnet.engine.streaming import default_compute_dtype
from offload_bitnet.store.layout import Layout
from offload_bitnet.engine.backend import make_backend
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.io.files import write_file_atomic
from offload_bitnet.store.blockstore import StoreSettings
from offload_bitnet.model.ternary import quantize_weight

CACHE_NAME = "calibration.json"
DISK_PROBE_BYTES = 128 << 20   # large enough to get past the drive's write cache, small enough for a few seconds
PROBE_ELEMENTS = 1 << 23       # the per-parameter probes' matrix (32 MiB in fp32: past the CPU caches, as units are)
PROBE_MACS = 1 << 30           # the matmul probe's multiply-adds per call (2 GFLOP)
MIN_PROBE_CALLS = 3
MIN_PROBE_SECONDS = 0.2        # each timed loop repeats until it has run this long
PARALLEL_PROBE_SECONDS = 1.5   # the matmul on the engine's threads (see _probe_compute)


@dataclasses.dataclass
class DiskSpeed:
    """Sustained read and write speed of the filesystem holding a folder, in bytes per second."""

    read_bps: float
    write_bps: float
    folder: str = ""
    filesystem: str = ""
    measured: str = ""
    page_cache_dropped: bool = True   # False: the read may have come from RAM (no posix_fadvise here)
    fsync_s: float = 0.0              # fsync of a small file just written (a commit pays it per file it wrote)


@dataclasses.dataclass
class ComputeSpeed:
    """What the engine's compute costs on one device: matmul FLOP/s at the model's projection shapes, and
    nanoseconds per parameter of the per-unit work (for the store's settings). On a CPU these are per core
    (measured with one thread, where the fastest repetition is the machine's own speed even when other
    processes share it; with more threads a busy machine makes every call wait for its slowest thread); the
    plan divides the work by the speed-up measured on the engine's threads (``parallel_speedup``)."""

    matmul_flops: float       # fp32 on CPU (bf16 on GPUs): a trained linear's three matmuls (see _probe_compute)
    unpack_ns: float          # forward load: packed/16-bit weights to compute tensors (Layout.forward_tensors)
    masters_ns: float         # backward load: 16-bit masters to fp32 (Layout.masters) and moments decoded
    quantize_ns: float        # backward, main thread: fake-quantized compute copy (quantize_weight)
    update_ns: float          # writer: AdamW, then encoding weights, shadow and moments (Layout.encode*)
    device: str = "cpu"
    threads: int = 1
    shape: tuple = ()
    measured: str = ""
    busy: float = 0.0         # the machine's load average per core while measuring (above 1: a shared machine)
    # How much faster the matmul probe runs on ``parallel_threads`` (the engine's thread count) than on one: the
    # plan spreads CPU work over the threads by this, not by their count (2 cores gave 1.5x here, not 2x).
    parallel_threads: int = 1
    parallel_speedup: float = 1.0


@dataclasses.dataclass
class Calibration:
    """The speeds a plan uses; ``cached``: which of them came from the cache file (``disk``, ``compute``)."""

    disk: DiskSpeed
    compute: ComputeSpeed
    cached: tuple = ()
    path: str = ""

    def describe(self) -> str:
        def origin(part: str, measured: str) -> str:
            return f"cached {measured}" if part in self.cached else "measured now"

        note = "" if self.disk.page_cache_dropped else ", the read may include the page cache"
        return (f"calibration: disk read {self.disk.read_bps / 1e6:,.0f} MB/s, write {self.disk.write_bps / 1e6:,.0f} "
                f"MB/s, fsync {self.disk.fsync_s * 1e3:.1f} ms ({origin('disk', self.disk.measured)} in {self.disk.folder}{note}); {self.compute.device} "
                f"matmul {self.compute.matmul_flops / 1e9:,.1f} GFLOP/s per thread, per parameter: load {self.compute.unpack_ns + self.compute.masters_ns:.1f} ns, quantize "
                f"{self.compute.quantize_ns:.1f} ns, update {self.compute.update_ns:.1f} ns "
                f"({origin('compute', self.compute.measured)}); file {self.path}, --recalibrate measures again"
                + (f"\n  note: the machine was busy while the compute was measured (load {self.compute.busy:.1f} per "
                   "core): a run on a machine this busy takes longer than planned; if the speeds look low, "
                   "--recalibrate when it is quiet"
                   if self.compute.busy > 1.0 else ""))


def cache_path() -> str:
    """The calibration file (beside the import cache; ``OFFLOAD_BITNET_CACHE`` moves both)."""
    root = os.environ.get("OFFLOAD_BITNET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "offload_bitnet"))
    return os.path.join(root, CACHE_NAME)


def existing_folder(path: str) -> str:
    """``path`` or its nearest existing parent (a store that is not created yet lands on the same disk)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def filesystem_of(folder: str) -> str:
    """``TYPE:DEVICE`` of the mount holding ``folder`` (the longest mount point that contains it)."""
    device = os.stat(folder).st_dev
    kind, best = "unknown", ""
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 3 and (folder + "/").startswith(fields[1].rstrip("/") + "/") \
                        and len(fields[1]) > len(best):
                    best, kind = fields[1], fields[2]
    except OSError:
        pass
    return f"{kind}:{os.major(device)}:{os.minor(device)}"


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _timed(function, seconds: float = MIN_PROBE_SECONDS) -> float:
    """Seconds per call of ``function``: the fastest of the calls made in ``seconds`` (at least
    ``MIN_PROBE_CALLS``, after one warm-up call), so that other processes' bursts on a shared machine count as
    little as they can."""
    function()
    best, began, calls = float("inf"), time.perf_counter(), 0
    while True:
        started = time.perf_counter()
        function()
        best, calls = min(best, time.perf_counter() - started), calls + 1
        if calls >= MIN_PROBE_CALLS and time.perf_counter() - began >= seconds:
            return best


# ---------------------------------------------------------------------------------------------- probes
def probe_disk(folder: str, nbytes: int = DISK_PROBE_BYTES) -> DiskSpeed:
    """Write (crc32c + fsync, as a store write does) and read back (page cache dropped) a temporary file in
    ``folder``; the file is removed in any case."""
    path = os.path.join(folder, f".offload-bitnet-probe-{os.getpid()}")
    chunk = os.urandom(8 << 20)
    chunks = [chunk] * max(1, nbytes // len(chunk))
    size = len(chunk) * len(chunks)
    try:
        began = time.perf_counter()
        write_file_atomic(path, *chunks, durable=True)
        write_s = time.perf_counter() - began
        dropped = hasattr(os, "posix_fadvise")
        buffer = bytearray(len(chunk))
        with open(path, "rb", buffering=0) as handle:
            if dropped:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            began = time.perf_counter()
            while handle.readinto(buffer):
                crc32c(buffer)
            read_s = time.perf_counter() - began
        page = bytes(4096)

        def small_durable_write():
            with open(path, "wb") as handle:
                handle.write(page)
                handle.flush()
                os.fsync(handle.fileno())

        fsync_s = _timed(small_durable_write)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return DiskSpeed(read_bps=size / max(read_s, 1e-9), write_bps=size / max(write_s, 1e-9), folder=folder,
                     filesystem=filesystem_of(folder), measured=_now(), page_cache_dropped=dropped, fsync_s=fsync_s)


def probe_shape(tokens: int, dim: int, hidden: int) -> tuple[int, int, int]:
    """The matmul the probe times: ``[tokens, dim] x [hidden, dim]^T``, capped to a few seconds' worth."""
    tokens, dim = min(max(tokens, 16), 256), min(dim, 8192)
    return tokens, dim, max(64, min(hidden, PROBE_MACS // (tokens * dim)))


def probe_compute(device: str, shape: tuple[int, int, int], settings: StoreSettings) -> ComputeSpeed:
    """Time the engine's compute on ``device``: the matmul at ``shape`` (tokens, dim, hidden) in the engine's
    compute dtype, and the per-parameter work of a projection for ``settings`` (on a CPU with one thread)."""
    threads = torch.get_num_threads()
    if make_backend(device).torch_device.type != "cpu" or threads == 1:
        return _probe_compute(device, shape, settings)
    parallel = _probe_compute(device, shape, settings, matmul_only=True)
    torch.set_num_threads(1)
    try:
        single = _probe_compute(device, shape, settings)
    finally:
        torch.set_num_threads(threads)
    speedup = min(max(parallel.matmul_flops / single.matmul_flops, 1.0), threads)
    return dataclasses.replace(single, parallel_threads=threads, parallel_speedup=speedup)


def _probe_compute(device: str, shape: tuple[int, int, int], settings: StoreSettings,
                   matmul_only: bool = False) -> ComputeSpeed:
    backend = make_backend(device)  # the matmul in the device's compute library (torch, or MLX)
    torch_device = backend.torch_device  # where the engine's tensors live (the CPU for MLX)
    dtype = default_compute_dtype(torch_device)
    tokens, dim, hidden = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=generator).to(torch_device, dtype)
    weight = (torch.randn(hidden, dim, generator=generator) * 0.02).to(torch_device, dtype)
    grad_out = (torch.randn(tokens, hidden, generator=generator) * 1e-3).to(torch_device, dtype)
    # A projection in a training step: its forward, then the input gradient and the weight gradient added into
    # the gradient buffer. The weight gradient's [hidden, tokens] x [tokens, dim] product writes a weight-sized
    # result from few tokens, and runs far below the forward's speed on a CPU (timing the forward alone
    # predicted a 7B step at half its time).
    matmul = backend.projection_probe(x, weight, grad_out)

    # With several threads one call waits for the slowest, so a single busy moment on any core slows it: the
    # fastest of more calls (here 1.06x to 1.8x from run to run with the default, on a machine at rest).
    matmul_flops = 6 * tokens * dim * hidden / _timed(matmul, PARALLEL_PROBE_SECONDS if matmul_only else
                                                      MIN_PROBE_SECONDS)
    if matmul_only:
        return ComputeSpeed(matmul_flops=matmul_flops, unpack_ns=0.0, masters_ns=0.0, quantize_ns=0.0,
                            update_ns=0.0, device=device, threads=torch.get_num_threads())
    rows = max(4, PROBE_ELEMENTS // dim // 4 * 4)
    master = torch.randn(rows, dim, generator=generator) * 0.02
    unit, layout = "block.0", Layout(settings)
    parts = layout.encode(unit, {"q_proj": master})
    moments = {"q_proj": (torch.zeros_like(master), torch.full_like(master, 1e-6))}
    optim_part = layout.encode_moments(moments)
    grad = torch.randn(rows, dim, generator=generator) * 1e-3
    count = master.numel()

    def per_parameter(function) -> float:
        return _timed(function) / count * 1e9

    def update():
        work = master.clone()
        exp_avg, exp_avg_sq = (m.clone() for m in moments["q_proj"])
        backend.adamw_update(work, grad, exp_avg, exp_avg_sq, 2, AdamWConfig(), 1e-4)
        layout.encode(unit, {"q_proj": work})
        layout.encode_moments({"q_proj": (exp_avg, exp_avg_sq)})

    return ComputeSpeed(
        matmul_flops=matmul_flops,
        unpack_ns=per_parameter(lambda: layout.forward_tensors(unit, parts["weights"], dtype, torch_device)),
        masters_ns=per_parameter(lambda: (layout.masters(unit, parts["weights"], parts.get("shadow"), torch_device),
                                          layout.moments(optim_part, {"q_proj": master.shape}, torch_device))),
        quantize_ns=per_parameter(lambda: quantize_weight(master)) if settings.mode == "qat" else 0.0,
        update_ns=per_parameter(update), device=device, threads=torch.get_num_threads(), shape=tuple(shape),
        measured=_now(), busy=load_per_core())


def load_per_core() -> float:
    """The 1-minute load average over the CPU count (0 where the system does not say)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


# ---------------------------------------------------------------------------------------------- the cache
def _read_cache(path: str) -> dict:
    try:
        with open(path) as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def disk_key(folder: str) -> str:
    return f"disk|{socket.gethostname()}|{filesystem_of(folder)}"


# Entries of older probes are not used: 1 timed the matmul's forward alone (a 7B step came out at half its time);
# 3 times forward and both gradients, and the engine's threads' speed-up.
COMPUTE_PROBE_VERSION = 3


def compute_key(device: str, shape: tuple, settings: StoreSettings) -> str:
    return (f"compute|v{COMPUTE_PROBE_VERSION}|{socket.gethostname()}|{device}|"
            f"{'x'.join(map(str, shape))}|{settings.mode}/{settings.shadow_dtype}/{settings.state_dtype}")


def calibrate(folder: str, device: str, shape: tuple[int, int, int], settings: StoreSettings,
              recalibrate: bool = False, path: str | None = None) -> Calibration:
    """The disk speed of ``folder``'s filesystem and the compute speed of ``device`` at ``shape`` (see
    ``probe_shape``) for ``settings``: from the cache, or measured now (``recalibrate``: always) and saved."""
    path = path or cache_path()
    folder = existing_folder(folder)
    cache = _read_cache(path)
    keys = disk_key(folder), compute_key(device, shape, settings)
    disk_entry, compute_entry = (None if recalibrate else cache.get(key) for key in keys)
    disk = DiskSpeed(**disk_entry) if disk_entry else probe_disk(folder)
    compute = ComputeSpeed(**{**compute_entry, "shape": tuple(compute_entry["shape"])}) if compute_entry \
        else probe_compute(device, shape, settings)
    cached = tuple(name for name, entry in (("disk", disk_entry), ("compute", compute_entry)) if entry)
    if len(cached) < 2:
        cache = _read_cache(path)  # another process may have added entries meanwhile
        cache[keys[0]], cache[keys[1]] = dataclasses.asdict(disk), dataclasses.asdict(compute)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_file_atomic(path, (json.dumps(cache, indent=1) + "\n").encode())
    return Calibration(disk, compute, cached=cached, path=path)
