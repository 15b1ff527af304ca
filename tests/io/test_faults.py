"""Fault points: the chosen pass performs its action, and a signal action lets the process go on."""
from __future__ import annotations

import signal

import pytest

from offload_bitnet.io import faults


@pytest.fixture
def plan():
    yield faults.configure
    faults.configure("")


@pytest.mark.parametrize("action, number", [("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)])
def test_a_signal_fault_sends_the_signal_on_its_pass_and_goes_on(plan, action, number):
    received = []
    previous = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        plan(f"read:2:{action}")
        faults.fault_point("read")
        assert received == []
        faults.fault_point("read")  # returns: the handler decides what the signal means
        assert received == [number]
        faults.fault_point("read")
        assert received == [number] and faults.pass_counts() == {"read": 3}
    finally:
        signal.signal(number, previous)


def test_raise_and_errno_faults(plan):
    plan("update:1:raise,write.data:1:enospc")
    with pytest.raises(faults.InjectedFault, match="injected fault at update"):
        faults.fault_point("update")
    with pytest.raises(OSError, match="No space left"):
        faults.fault_point("write.data")
    with pytest.raises(ValueError, match="unknown point or action"):
        plan("update:1:explode")
