"""Background I/O for the engine: a prefetching loader, a write-behind writer and the activation stash."""
from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch


class Prefetcher:
    """Runs load jobs on one background thread, ``depth`` jobs ahead of the consumer."""

    def __init__(self, depth: int = 1):
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-prefetch")
        self.wait_seconds = 0.0

    def stream(self, jobs):
        """Yield the results of ``jobs`` (callables) in order, loading ahead in the background."""
        jobs = iter(jobs)
        in_flight = deque()
        for _ in range(self.depth + 1):
            job = next(jobs, None)
            if job is None:
                break
            in_flight.append(self._pool.submit(job))
        while in_flight:
            future = in_flight.popleft()
            started = time.perf_counter()
            result = future.result()
            self.wait_seconds += time.perf_counter() - started
            job = next(jobs, None)
            if job is not None:
                in_flight.append(self._pool.submit(job))
            yield result

    def close(self):
        self._pool.shutdown(wait=True)


class WriteBehind:
    """Writes units and commits on one background thread, in submission order.

    Until a unit's write has reached the store, ``pending`` serves it to readers, so a read always sees the
    newest version. After a failed job nothing more is written or committed, and the error is raised in the
    caller's thread on the next call.
    """

    def __init__(self, store, max_pending: int = 2):
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._pending: dict[tuple[str, str], dict] = {}
        self._pending_lock = threading.Lock()
        self._error: BaseException | None = None
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="offload-writer", daemon=True)
        self._thread.start()

    def pending_part(self, unit: str, part: str):
        with self._pending_lock:
            return self._pending.get((unit, part))

    def write(self, unit: str, parts: dict[str, dict], step: int):
        self.raise_if_failed()
        with self._pending_lock:
            for part, tensors in parts.items():
                self._pending[(unit, part)] = tensors
        self._put(("write", unit, parts, step))

    def commit(self, step: int, extra: dict | None):
        self._put(("commit", step, extra))

    def flush(self):
        """Wait until everything submitted is written and committed."""
        started = time.perf_counter()
        self._queue.join()
        self.wait_seconds += time.perf_counter() - started
        self.raise_if_failed()

    def raise_if_failed(self):
        if self._error is not None:
            raise self._error

    def close(self):
        self._queue.put(None)
        self._thread.join()

    def _put(self, job):
        self.raise_if_failed()
        started = time.perf_counter()
        self._queue.put(job)
        self.wait_seconds += time.perf_counter() - started

    def _run(self):
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._do(job)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self._error = error
            finally:
                self._queue.task_done()

    def _do(self, job):
        if job[0] == "write":
            _, unit, parts, step = job
            for part, tensors in parts.items():
                self.store.write(unit, part, tensors, step)
                with self._pending_lock:
                    if self._pending.get((unit, part)) is tensors:
                        del self._pending[(unit, part)]
        else:
            _, step, extra = job
            self.store.commit(step, extra)


class ActivationStash:
    """Saved block inputs: kept in RAM up to ``budget_bytes``, spilled to files in ``spill_dir`` beyond it."""

    def __init__(self, budget_bytes: int, spill_dir: str):
        self.budget_bytes = budget_bytes
        self.spill_dir = spill_dir
        self._in_ram: dict = {}
        self._on_disk: dict = {}
        self.ram_bytes = 0
        self.spilled_bytes = 0

    def put(self, key, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self.ram_bytes + size <= self.budget_bytes:
            self._in_ram[key] = tensor
            self.ram_bytes += size
            return
        os.makedirs(self.spill_dir, exist_ok=True)
        path = os.path.join(self.spill_dir, "act-" + "-".join(map(str, key)) + ".pt")
        torch.save(tensor.detach().cpu(), path)
        self._on_disk[key] = (path, tensor.device)
        self.spilled_bytes += size

    def pop(self, key) -> torch.Tensor:
        if key in self._in_ram:
            tensor = self._in_ram.pop(key)
            self.ram_bytes -= tensor.numel() * tensor.element_size()
            return tensor
        path, device = self._on_disk.pop(key)
        tensor = torch.load(path, weights_only=True).to(device)
        os.remove(path)
        return tensor

    def clear(self):
        self._in_ram.clear()
        self._on_disk.clear()
        self.ram_bytes = 0
        shutil.rmtree(self.spill_dir, ignore_errors=True)
