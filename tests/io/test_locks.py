"""The locks that name their holder: one record format, written while held, emptied on release, read back by
``offload-bitnet status`` only for a live holder."""
import os

import pytest

from offload_bitnet.io.locks import HolderLock, LockHeld, holder_record, lock_holder, parse_holder


def test_a_held_lock_names_its_holder_and_refuses_a_second_one(tmp_path):
    path = str(tmp_path / "run.lock")
    lock = HolderLock(path)
    assert open(path).read() == holder_record() == f"pid {os.getpid()} on {os.uname().nodename}"
    assert parse_holder(holder_record()) == (os.getpid(), os.uname().nodename)
    with pytest.raises(LockHeld) as held:  # flock is per open file: a second open in this process conflicts too
        HolderLock(path)
    assert held.value.holder == holder_record() and held.value.path == path
    assert lock_holder(path) == holder_record()
    lock.release()
    lock.release()  # a second release is a no-op
    assert open(path).read() == "" and lock_holder(path) is None
    HolderLock(path).release()  # free again


def test_parse_holder_takes_only_the_record():
    for text in ("", "garbage", "pid x on host", "pid 12 at host", "pid 12 on host extra"):
        assert parse_holder(text) is None
    assert parse_holder(" pid 12 on host\n") == (12, "host")


def test_lock_holder_reads_only_live_holders(tmp_path):
    path = tmp_path / "lock"
    assert lock_holder(str(path)) is None
    path.write_text("garbage")
    assert lock_holder(str(path)) is None
    path.write_text(f"pid {os.getpid()} on {os.uname().nodename}")
    assert lock_holder(str(path)) == f"pid {os.getpid()} on {os.uname().nodename}"
    path.write_text(f"pid {os.getpid()} on some-other-host")
    assert "another host" in lock_holder(str(path))
