import threading
import time

import pytest

from offload_bitnet.streams import Prefetcher, WriteBehind


class RecordingStore:
    """Stands in for a BlockStore: records writes and commits, optionally slowly."""

    def __init__(self, write_seconds: float = 0.0):
        self.write_seconds = write_seconds
        self.events = []
        self.lock = threading.Lock()

    def write(self, unit, part, tensors, step):
        time.sleep(self.write_seconds)
        with self.lock:
            self.events.append(("write", unit, part, step))

    def commit(self, step, extra):
        with self.lock:
            self.events.append(("commit", step))


def busy_writer():
    """A writer (queue of one) busy with update "a" until the returned event is set. Returns (store, writer, log,
    release); ``log`` records each update's name and whether the caller's thread ran it."""
    store, log = RecordingStore(), []
    writer = WriteBehind(store, max_pending=1)
    running, release = threading.Event(), threading.Event()

    def hold():
        running.set()
        release.wait(5)
        log.append(("a", threading.current_thread() is threading.main_thread()))
        return {}
    writer.update("a", hold, 1)
    assert running.wait(5)
    return store, writer, log, release


def recording_update(log, name, seconds=0.0, parts=None):
    def make_parts():
        log.append((name, threading.current_thread() is threading.main_thread()))
        time.sleep(seconds)
        return parts if parts is not None else {"weights": {"w": name}}
    return make_parts


def test_a_full_queue_makes_the_caller_run_the_oldest_update():
    store, writer, log, gate = busy_writer()
    writer.update("b", recording_update(log, "b"), 1)  # queued
    writer.update("c", recording_update(log, "c"), 1)  # queue full: the caller runs "b" and queues "c"
    assert log == [("b", True)]
    gate.set()
    writer.commit(1, None)  # never taken over: it follows every write
    writer.flush()
    writer.close()
    assert sorted(name for name, _ in log) == ["a", "b", "c"]
    assert store.events[-1] == ("commit", 1)
    assert {e[1] for e in store.events[:-1]} == {"b", "c"}


def test_an_unstealable_update_runs_on_the_writer_after_the_jobs_before_it():
    _, writer, log, gate = busy_writer()
    writer.update("rows-1", recording_update(log, "rows-1", parts={}), 1, stealable=False)
    released = threading.Timer(0.2, gate.set)
    released.start()
    started = time.perf_counter()
    writer.update("rows-2", recording_update(log, "rows-2"), 1, stealable=False)  # waits: nothing to take over
    assert time.perf_counter() - started >= 0.15
    writer.flush()
    writer.close()
    assert log == [("a", False), ("rows-1", False), ("rows-2", False)]


def test_pending_parts_are_served_until_written_and_failures_reach_the_caller():
    store = RecordingStore(write_seconds=0.2)
    writer = WriteBehind(store, max_pending=1)
    writer.update("a", recording_update([], "a", parts={"weights": {"w": 1}}), 3)
    assert writer.pending_part("a", "weights") == {"w": 1}  # waits for the update, not for the write
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
    started = []

    def job(i):
        def run():
            started.append(i)
            return i * i
        return run
    stream = prefetcher.stream(job(i) for i in range(5))
    assert next(stream) == 0
    time.sleep(0.05)
    assert started[:3] == [0, 1, 2]  # the next two are loading before they are asked for
    assert list(stream) == [1, 4, 9, 16]
    prefetcher.close()
