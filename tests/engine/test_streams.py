import threading
import time

import pytest

from offload_bitnet.engine.streams import Prefetcher, WriteBehind


# Waits in these tests are on events, never on time; this bound only turns a hang into a failure.
HANG_GUARD_S = 60


class RecordingStore:
    """Stands in for a BlockStore: records writes and commits. With ``write_gate`` (an Event), each write
    waits until the test sets it, so a write is in progress for exactly as long as the test needs."""

    def __init__(self, write_gate: threading.Event | None = None, gated_units=None):
        self.write_gate, self.gated_units = write_gate, gated_units
        self.events = []
        self.lock = threading.Lock()

    def write(self, unit, part, tensors, step):
        if self.write_gate is not None and (self.gated_units is None or unit in self.gated_units):
            assert self.write_gate.wait(HANG_GUARD_S), "the test never released the write"
        with self.lock:
            self.events.append(("write", unit, part, step))

    def commit(self, step, extra):
        with self.lock:
            self.events.append(("commit", step))


class ObservedLock:
    """A lock that sets ``contended`` when an acquire has to wait for it."""

    def __init__(self):
        self._lock, self.contended = threading.Lock(), threading.Event()

    def acquire(self, blocking=True):
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        self.contended.set()
        return self._lock.acquire()

    def release(self):
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def busy_writer(making_lock=None, max_pending=1):
    """A writer (queue of one) busy with update "a" until the returned event is set. Returns (store, writer, log,
    release); ``log`` records each update's name and whether the caller's thread ran it. ``making_lock``: the
    writer's lock for making updates, in place of its own."""
    store, log = RecordingStore(), []
    writer = WriteBehind(store, max_pending=max_pending)
    if making_lock is not None:
        writer._making = making_lock
    running, release = threading.Event(), threading.Event()

    def hold():
        running.set()
        assert release.wait(HANG_GUARD_S), "the test never released update a"
        log.append(("a", threading.current_thread() is threading.main_thread()))
        return {}
    writer.update("a", hold, 1)
    assert running.wait(HANG_GUARD_S)
    return store, writer, log, release


def recording_update(log, name, parts=None):
    def make_parts():
        log.append((name, threading.current_thread() is threading.main_thread()))
        return parts if parts is not None else {"weights": {"w": name}}
    return make_parts


def test_a_full_queue_makes_the_caller_run_the_oldest_update_while_the_writer_writes():
    write_gate = threading.Event()
    store, log = RecordingStore(write_gate, gated_units={"a"}), []
    writer = WriteBehind(store, max_pending=1)
    writing = threading.Event()
    writer.update("a", lambda: writing.set() or {"weights": {"w": "a"}}, 1)  # made at once; its write is held
    assert writing.wait(HANG_GUARD_S)
    assert writer.pending_part("a", "weights") == {"w": "a"}  # made: only its write is left
    writer.update("b", recording_update(log, "b"), 1)  # queued
    writer.update("c", recording_update(log, "c"), 1)  # queue full: the caller runs "b" and queues "c"
    assert log == [("b", True)]
    write_gate.set()
    writer.commit(1, None)  # never taken over: it follows every write
    writer.flush()
    writer.close()
    assert [name for name, _ in log] == ["b", "c"]
    assert store.events[-1] == ("commit", 1)
    assert sorted(e[1] for e in store.events[:-1]) == ["a", "b", "c"]  # the commit follows every write


def waiting_for_room(writer) -> threading.Event:
    """An event set when a caller blocks waiting for room in ``writer``'s queue."""
    waiting, blocking_put = threading.Event(), writer._queue.put

    def put(job, block=True, timeout=None):
        if block and job is not None:
            waiting.set()
        return blocking_put(job, block, timeout)
    writer._queue.put = put
    return waiting


def returns_only_after_release(call, waiting: threading.Event, gate: threading.Event) -> bool:
    """Run ``call()`` while a helper sets ``gate`` once ``waiting`` is set (the caller is blocked); whether
    ``call`` returned only after that."""
    releaser = threading.Thread(target=lambda: waiting.wait(HANG_GUARD_S) and gate.set())
    releaser.start()
    call()
    released_before_return = gate.is_set()
    gate.set()  # (a failure above must not leave the writer holding "a")
    releaser.join()
    return released_before_return


def test_a_caller_waits_instead_of_making_a_second_update_at_once():
    _, writer, log, gate = busy_writer()  # the writer is making update "a"'s parts
    writer.update("b", recording_update(log, "b"), 1)  # queued
    # Queue full, "a" still in the making: update("c") waits and runs nothing itself.
    assert returns_only_after_release(lambda: writer.update("c", recording_update(log, "c"), 1),
                                      waiting_for_room(writer), gate), \
        "update() returned while the writer was still making the update before it"
    writer.flush()
    writer.close()
    assert log == [("a", False), ("b", False), ("c", False)]


def test_a_hand_off_returns_once_the_writer_takes_the_update():
    _, writer, log, gate = busy_writer(max_pending=0)
    waiting, real_wait = threading.Event(), writer._queue.not_full.wait

    def wait(timeout=None):
        waiting.set()
        return real_wait(timeout)
    writer._queue.not_full.wait = wait
    # No queue: update("b") waits while "a" is in the making.
    assert returns_only_after_release(lambda: writer.update("b", recording_update(log, "b"), 1), waiting, gate), \
        "update() returned before the writer took the update"
    writer.flush()
    writer.close()
    assert log == [("a", False), ("b", False)]


def test_the_last_update_made_by_the_caller_waits_for_the_writers_update():
    lock = ObservedLock()
    _, writer, log, gate = busy_writer(lock)  # the writer is making update "a"'s parts
    order = []
    # Released only once the caller waits for the writer's update to be made.
    releaser = threading.Thread(target=lambda: lock.contended.wait(HANG_GUARD_S) and (order.append("released"),
                                                                                      gate.set()))
    releaser.start()

    def last():
        order.append("last made")
        return {"weights": {"w": "last"}}
    writer.make_and_write("embed", last, 1)
    gate.set()
    releaser.join()
    writer.flush()
    writer.close()
    assert order == ["released", "last made"] and log == [("a", False)]


def test_an_unstealable_update_runs_on_the_writer_after_the_jobs_before_it():
    _, writer, log, gate = busy_writer()
    writer.update("rows-1", recording_update(log, "rows-1", parts={}), 1, stealable=False)
    # The queue is full and its oldest job is not stealable, so update("rows-2") must wait for the writer: a
    # helper releases update "a" only once the caller is blocked waiting for room in the queue.
    assert returns_only_after_release(lambda: writer.update("rows-2", recording_update(log, "rows-2"), 1,
                                                            stealable=False), waiting_for_room(writer), gate), \
        "update() returned while the writer was still busy with the job before it"
    writer.flush()
    writer.close()
    assert log == [("a", False), ("rows-1", False), ("rows-2", False)]


def test_pending_parts_are_served_until_written_and_failures_reach_the_caller():
    write_gate = threading.Event()
    store = RecordingStore(write_gate)
    writer = WriteBehind(store, max_pending=1)
    writer.update("a", recording_update([], "a", parts={"weights": {"w": 1}}), 3)
    assert writer.pending_part("a", "weights") == {"w": 1}  # waits for the update, not for the write
    assert store.events == []  # the write is still held
    write_gate.set()
    writer.flush()
    assert writer.pending_part("a", "weights") is None and ("write", "a", "weights", 3) in store.events

    def failing():
        raise ValueError("bad update")
    writer.update("b", failing, 4)
    with pytest.raises(ValueError, match="bad update"):
        writer.flush()
    assert isinstance(writer.discard(), ValueError)
    writer.commit(4, None)
    writer.flush()
    writer.close()
    assert store.events[-1] == ("commit", 4)


def test_prefetcher_yields_results_in_order_and_runs_ahead():
    prefetcher = Prefetcher(depth=1)
    started, changed = [], threading.Condition()

    def job(i):
        def run():
            with changed:
                started.append(i)
                changed.notify_all()
            return i * i
        return run
    stream = prefetcher.stream(job(i) for i in range(5))
    assert next(stream) == 0
    # The next two load before they are asked for, and no further: job 3 is submitted by the next ``next``.
    with changed:
        assert changed.wait_for(lambda: len(started) >= 3, HANG_GUARD_S), started
        assert started == [0, 1, 2]
    assert list(stream) == [1, 4, 9, 16]
    prefetcher.close()


def test_the_writers_busy_time_counts_its_updates_and_writes_apart():
    """``update_seconds`` / ``write_seconds`` (StepStats.update_busy_s / write_busy_s) add up the time spent making
    parts and writing them, on the writer and on a caller; lower bounds only (a sleep never ends early)."""
    class SlowStore(RecordingStore):
        def write(self, unit, part, tensors, step):
            time.sleep(0.02)
            super().write(unit, part, tensors, step)

    def slow_parts():
        time.sleep(0.03)
        return {"weights": {}, "optim": {}}

    writer = WriteBehind(SlowStore(), max_pending=1)
    try:
        writer.update("block.0", slow_parts, 1)               # on the writer thread
        writer.make_and_write("block.1", slow_parts, 1)       # on the caller's
        writer.flush()
        assert writer.update_seconds >= 2 * 0.03
        assert writer.write_seconds >= 4 * 0.02               # two parts per update
    finally:
        writer.close()
