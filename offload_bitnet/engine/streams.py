"""Background I/O for the engine: a prefetching loader, a write-behind writer and the activation stash."""
from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import torch


def lower_thread_priority(niceness: int = 10):
    """Make the calling thread yield the CPU to the compute thread when they compete for a core (Linux: nice
    is per thread). Background I/O that waits a little costs nothing; a compute thread that waits delays the
    whole step. Elsewhere, or where it is refused, nothing changes."""
    get_id = getattr(threading, "get_native_id", None)
    if sys.platform.startswith("linux") and get_id is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, get_id(), niceness)
        except OSError:
            pass


class Prefetcher:
    """Runs load jobs on one background thread, ``depth`` jobs ahead of the consumer."""

    def __init__(self, depth: int = 1):
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-prefetch",
                                        initializer=lower_thread_priority)
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
    """Runs unit updates, their writes and commits on a background thread, in submission order (a caller that
    finds the queue full runs the oldest queued update itself while the writer is only writing; commits stay
    behind every earlier write).

    One update makes its parts at a time, on whichever thread (``_making``): an update in the making holds its
    gradients, the old moments and shadow as read, fp32 work and the new parts (at 7B about 3 GB), a queued one
    only its gradients. Two at once doubled that in the peak (10.3 GiB at 7B) and saved no time: both threads
    share the same cores, and each update's elementwise work already spreads over them.

    Until a unit's new version is in the store, ``pending_part`` serves it from memory (waiting while its update
    still runs), so a read always sees the newest version. After a failed job nothing more is run, written or
    committed, and the error is raised in the caller's thread on its next call; ``discard`` clears it when the
    caller abandons the step.
    """

    def __init__(self, store, max_pending: int = 2):
        self.store = store
        # 0: a hand-off, no queue: ``update`` returns once its job is taken (big blocks: a queued update holds a
        # block's fp32 gradients, 0.8 GB at 7B, while the writer is the bottleneck anyway).
        self._hand_off = max_pending == 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(max_pending, 1))
        self._updating: Counter = Counter()   # unit -> queued updates that have not made their parts yet
        self._pending: dict[tuple[str, str], dict] = {}  # (unit, part) -> tensors made, not yet in the store
        self._changed = threading.Condition()
        self._making = threading.Lock()  # held while an update makes its parts (see the class docstring)
        self._error: BaseException | None = None
        self.wait_seconds = 0.0
        self.stolen_seconds = 0.0  # time callers spent running queued updates themselves (queue full)
        # Busy time of the updates (making parts) and of the store writes, on whichever thread ran them: what
        # the writer's work costs, against the plan's model of it (bench/scale.py prints both).
        self.update_seconds = 0.0
        self.write_seconds = 0.0
        self._timing = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="offload-writer", daemon=True)
        self._thread.start()

    def update(self, unit: str, make_parts, step: int, stealable: bool = True):
        """Queue ``make_parts()`` (returns ``{part: tensors}``, e.g. by running the optimizer update) and the
        write of what it returns as the unit's version for ``step``. ``stealable=False``: only the writer thread
        runs it, so it runs after every job queued before it has finished (a caller never takes it over)."""
        self.raise_if_failed()
        with self._changed:
            self._updating[unit] += 1
        job = ("write", unit, make_parts, step, stealable)
        try:
            self._put(job)
        except BaseException:
            self._made(unit, {})
            raise
        if self._hand_off:
            self._wait_taken(job)

    def make_and_write(self, unit: str, make_parts, step: int):
        """Run ``make_parts()`` on the caller's thread (as the only update making parts then) and queue the write
        of what it returns: an update with nothing left to overlap (the step's last one)."""
        self.raise_if_failed()
        self.write(unit, self._make(make_parts), step)

    def write(self, unit: str, parts: dict[str, dict], step: int):
        """Queue the write of ready ``{part: tensors}``."""
        self._made(unit, parts, count=False)  # before the job can run: the writer drops them once written
        self.update(unit, lambda: parts, step)

    def pending_part(self, unit: str, part: str) -> dict | None:
        """A unit's part not in the store yet (None when the store has the newest version); waits while an
        update of the unit is still running. The tensors are the writer's: copy them before changing them."""
        started = time.perf_counter()
        with self._changed:
            while self._error is None and self._updating[unit]:
                self._changed.wait()
            self.raise_if_failed()
            pending = self._pending.get((unit, part))
        self.wait_seconds += time.perf_counter() - started
        return pending

    def wait_for_updates(self):
        """Block until every queued update has made its parts (their writes may still run); raise a failure."""
        started = time.perf_counter()
        with self._changed:
            while self._error is None and self._updating:
                self._changed.wait()
        self.wait_seconds += time.perf_counter() - started
        self.raise_if_failed()

    def commit(self, step: int, extra: dict | None):
        self._put(("commit", step, extra))

    def flush(self):
        """Wait until everything submitted is written and committed."""
        started = time.perf_counter()
        self._queue.join()
        self.wait_seconds += time.perf_counter() - started
        self.raise_if_failed()

    def discard(self) -> BaseException | None:
        """Wait for the queue to empty (jobs after a failure are skipped), then clear and return the failure."""
        self._queue.join()
        with self._changed:
            error, self._error = self._error, None
            self._pending.clear()
        return error

    def raise_if_failed(self):
        if self._error is not None:
            raise self._error

    def close(self):
        self._queue.put(None)
        self._thread.join()

    def _put(self, job):
        """Queue ``job``. While the queue is full, the caller runs the oldest queued write itself instead of
        waiting: both threads then work on the backlog, and memory holds no more jobs than the queue allows."""
        while True:
            self.raise_if_failed()
            try:
                self._queue.put_nowait(job)
                return
            except queue.Full:
                pass
            if self._run_stolen():
                continue
            started = time.perf_counter()  # a commit or a job only the writer runs is next: wait for it to take it
            try:
                self._queue.put(job, timeout=0.05)
                return
            except queue.Full:
                pass
            finally:
                self.wait_seconds += time.perf_counter() - started

    def _wait_taken(self, job):
        """Wait until the writer has taken ``job`` from the queue (a hand-off: the caller never runs it, which
        would be a second update in the making as soon as the writer takes its next one)."""
        while True:
            self.raise_if_failed()
            with self._queue.mutex:
                if not any(waiting is job for waiting in self._queue.queue):
                    return
            started = time.perf_counter()
            with self._queue.not_full:  # notified when the writer takes a job
                if any(waiting is job for waiting in self._queue.queue):
                    self._queue.not_full.wait(0.05)
            self.wait_seconds += time.perf_counter() - started

    def _run_stolen(self) -> bool:
        """Run the oldest queued job on this thread if ``_steal_write`` may take it; whether it did."""
        stolen = self._steal_write()
        if stolen is None:
            return False
        started = time.perf_counter()
        self._run_one(stolen)
        self.stolen_seconds += time.perf_counter() - started
        return True

    def _steal_write(self):
        """Take the oldest queued job if it is a stealable update and write (never a commit, which must follow
        every write before it), and only while no update is making its parts (the writer is writing)."""
        if self._making.locked():
            return None
        with self._queue.mutex:
            waiting = self._queue.queue
            if waiting and waiting[0] is not None and waiting[0][0] == "write" and waiting[0][4]:
                job = waiting.popleft()
                self._queue.not_full.notify()
                return job
        return None

    def _make(self, make_parts) -> dict:
        """Run ``make_parts()`` as the only update making parts, counting its time in ``update_seconds``."""
        with self._making:
            started = time.perf_counter()
            parts = make_parts()
            self.update_seconds += time.perf_counter() - started
        return parts

    def _made(self, unit: str, parts: dict, count: bool = True):
        """Record a unit's new parts as pending (``count``: and that one of its queued updates ran)."""
        with self._changed:
            for part, tensors in parts.items():
                self._pending[(unit, part)] = tensors
            if count:
                self._updating[unit] -= 1
                if self._updating[unit] <= 0:
                    del self._updating[unit]
            self._changed.notify_all()

    def _run(self):
        # At the writer's own priority, not lowered as the prefetcher's: its updates are CPU work the step
        # waits for once the queue is full, and at 7B it is the bottleneck (bench/scale.py --probe-width 7B
        # --probe-layers 4: steps of 84 / 87 s with it lowered, 61 / 71 s without; the same losses).
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            self._run_one(job)

    def _run_one(self, job):
        """Run one queued job (on the writer thread, or on a caller that took it over)."""
        try:
            if self._error is None:
                self._do(job)
            elif job[0] == "write":
                self._made(job[1], {})  # skipped after a failure: no longer updating
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            with self._changed:
                self._error = error
                self._changed.notify_all()
        finally:
            self._queue.task_done()

    def _do(self, job):
        if job[0] == "write":
            _, unit, make_parts, step, _ = job
            try:
                parts = self._make(make_parts)
            except BaseException:
                self._made(unit, {})
                raise
            self._made(unit, parts)
            for part in list(parts):
                tensors = parts.pop(part)  # each part is let go once written
                started = time.perf_counter()
                self.store.write(unit, part, tensors, step)
                with self._timing:
                    self.write_seconds += time.perf_counter() - started
                with self._changed:
                    if self._pending.get((unit, part)) is tensors:
                        del self._pending[(unit, part)]
        else:
            _, step, extra = job
            self.store.commit(step, extra)


class ActivationStash:
    """Saved block inputs: kept in RAM up to ``budget_bytes``, spilled to files in ``spill_dir`` beyond it.

    Optional extras that save recomputation (``keep``) get at most ``keep_budget_bytes``, and only what the
    budget has left after the inputs still to come (``reserve``); they never spill and never crowd out an input.
    Their cap does not grow with the model's depth, so neither does peak memory."""

    def __init__(self, budget_bytes: int, spill_dir: str, keep_budget_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self.keep_budget_bytes = keep_budget_bytes
        self.kept_bytes = 0
        self.spill_dir = spill_dir
        self._in_ram: dict = {}
        self._on_disk: dict = {}
        self._kept: dict = {}
        self.ram_bytes = 0
        self.reserved_bytes = 0
        self.spilled_bytes = 0

    def reserve(self, nbytes: int):
        """Hold ``nbytes`` of the budget for inputs that ``put`` will bring (each put releases its share)."""
        self.reserved_bytes = nbytes

    def keep(self, key, value, nbytes: int) -> bool:
        """Hold ``value`` in RAM if it fits beside the inputs; returns whether it was kept."""
        if (self.ram_bytes + self.reserved_bytes + nbytes > self.budget_bytes
                or self.kept_bytes + nbytes > self.keep_budget_bytes):
            return False
        self._kept[key] = (value, nbytes)
        self.ram_bytes += nbytes
        self.kept_bytes += nbytes
        return True

    def take(self, key):
        """What ``keep`` held under ``key`` (None if it was not kept)."""
        value, nbytes = self._kept.pop(key, (None, 0))
        self.ram_bytes -= nbytes
        self.kept_bytes -= nbytes
        return value

    def put(self, key, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        self.reserved_bytes = max(self.reserved_bytes - size, 0)
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
        self._kept.clear()
        self.ram_bytes = 0
        self.kept_bytes = 0
        self.reserved_bytes = 0
        shutil.rmtree(self.spill_dir, ignore_errors=True)


class ResidentWeights:
    """Forward parts (``weights``: packed projections, norms, embedding, head) kept in RAM across steps, as
    read, up to ``budget_bytes``: after the first step the forward pass (and a LoRA run's backward) reads no
    forward bytes from disk. Units are admitted in the order they are first read while they fit.

    An update's new forward part replaces the kept one when the update makes it (``replace``), so a read never
    sees a stale version; ``clear`` drops everything (an abandoned step)."""

    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self.kept_bytes = 0
        self._parts: dict[str, tuple[dict, int]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _size(tensors: dict) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def get(self, unit: str) -> dict | None:
        with self._lock:
            entry = self._parts.get(unit)
        return None if entry is None else entry[0]

    def offer(self, unit: str, tensors: dict):
        """Keep ``tensors`` (a unit's forward part, which nobody changes in place) if they fit."""
        if self.budget_bytes <= 0:
            return
        size = self._size(tensors)
        with self._lock:
            old = self._parts.get(unit, (None, 0))[1]
            if self.kept_bytes - old + size <= self.budget_bytes:
                self._parts[unit] = (tensors, size)
                self.kept_bytes += size - old

    def replace(self, unit: str, tensors: dict):
        """An update made a new forward part of ``unit``: keep it instead of the old one (if ``unit`` is kept)."""
        with self._lock:
            if unit not in self._parts:
                return
            old = self._parts.pop(unit)[1]
            self.kept_bytes -= old
        self.offer(unit, tensors)

    def clear(self):
        with self._lock:
            self._parts.clear()
            self.kept_bytes = 0
