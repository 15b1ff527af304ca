"""Nothing committed is ever lost: kill -9 at named moments, exceptions, full and failing disks."""
import os
import subprocess
import sys

import pytest
import torch

from offload_bitnet import BlockStore, StoreError, create_model
from offload_bitnet.io.faults import ENV

sys.path.insert(0, os.path.dirname(__file__))
import crash_driver  # noqa: E402

DRIVER = os.path.join(os.path.dirname(__file__), "crash_driver.py")
STEPS = 4


def run_driver(path, steps=STEPS, faults=""):
    env = dict(os.environ, **{ENV: faults})
    return subprocess.run([sys.executable, DRIVER, path, str(steps)], env=env, capture_output=True, text=True,
                          timeout=300)


def snapshot(path):
    """Every tensor of every part, the step and the extra, of a store's committed state."""
    store = BlockStore(path)
    tensors = {(unit, part): store.read(unit, part) for unit, parts in store.manifest["files"].items() for part in parts}
    return store.step, store.extra, {key: {n: t.clone() for n, t in value.items()} for key, value in tensors.items()}


def assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for key in a[2]:
        for name in a[2][key]:
            assert torch.equal(a[2][key][name], b[2][key][name]), (key, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its committed state after every step."""
    path = fresh_store(tmp_path_factory.mktemp("reference"))
    states = [snapshot(path)]
    for step in range(1, STEPS + 1):
        crash_driver.main(path, step)  # in process: the same code as the subprocess runs, without start-up cost
        states.append(snapshot(path))
    return path, states


def fresh_store(root):
    """The reference's starting point. Reductions (the ternary scale) depend on the thread count, so stores
    are always created, and runs always made, with one thread."""
    torch.set_num_threads(1)
    return create_model(str(root / "store"), size="demo", arch="bitnet", n_layers=2)


@pytest.mark.parametrize("faults", [
    "write.data:7:kill", "write.rename:13:kill", "commit.rename:2:kill", "commit.cleanup:3:kill",
    "prefetch:9:kill", "update:5:kill",
])
def test_kill_at_any_moment_then_resume_is_bit_identical(reference, tmp_path, faults):
    _, states = reference
    path = fresh_store(tmp_path)
    killed = run_driver(path, faults=faults)
    assert killed.returncode == -9, killed.stderr
    step = BlockStore(path).step
    assert_same(snapshot(path), states[step])  # exactly some committed step, never a mixture
    assert run_driver(path).returncode == 0
    assert_same(snapshot(path), states[STEPS])
    committed = {e["file"] for p in BlockStore(path).manifest["files"].values() for e in p.values()}
    assert set(os.listdir(os.path.join(path, "units"))) == committed  # no leftovers accumulate


def test_repeated_kills_never_lose_progress(reference, tmp_path):
    _, states = reference
    path = fresh_store(tmp_path)
    for count in (3, 5, 8, 11, 17):
        run_driver(path, faults=f"write.data:{count}:kill")
    assert run_driver(path).returncode == 0
    assert_same(snapshot(path), states[STEPS])


def test_exception_inside_a_block_update_leaves_the_last_step(reference, tmp_path):
    _, states = reference
    path = fresh_store(tmp_path)
    failed = run_driver(path, faults="update:12:raise")
    assert failed.returncode != 0 and "injected fault at update" in failed.stderr
    assert_same(snapshot(path), states[BlockStore(path).step])
    assert run_driver(path).returncode == 0
    assert_same(snapshot(path), states[STEPS])


def test_disk_full_stops_with_a_clear_message_and_keeps_the_store(reference, tmp_path):
    _, states = reference
    path = fresh_store(tmp_path)
    failed = run_driver(path, faults="write.data:20:enospc")
    assert failed.returncode != 0
    assert "disk full while writing" in failed.stderr and "free now" in failed.stderr
    assert "run the same command again" in failed.stderr.lower()
    assert_same(snapshot(path), states[BlockStore(path).step])
    assert run_driver(path).returncode == 0
    assert_same(snapshot(path), states[STEPS])


def test_read_error_names_the_file(reference, tmp_path):
    path = fresh_store(tmp_path)
    failed = run_driver(path, faults="read:4:eio")
    assert failed.returncode != 0
    assert "cannot read" in failed.stderr and "Input/output error" in failed.stderr
    assert BlockStore(path).step == 0


def test_real_small_filesystem_fills_up(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        path = create_model(str(mount_point / "store"), size="demo", arch="bitnet", n_layers=2)
        with pytest.raises(StoreError, match="not enough free disk space"):
            from offload_bitnet import open_for_training
            open_for_training(path)
        assert BlockStore(path).step == 0
    finally:
        subprocess.run(["umount", str(mount_point)])


def test_leftover_temporary_files_are_removed_on_open(tmp_path):
    path = create_model(str(tmp_path / "store"), size="demo", n_layers=1)
    open(os.path.join(path, "units", "block.000.weights.s00000001.safetensors.123.tmp"), "w").write("x")
    open(os.path.join(path, "units", "block.000.weights.s00000001.safetensors"), "w").write("x")
    open(os.path.join(path, "manifest.json.commit.tmp"), "w").write("{")
    os.makedirs(os.path.join(path, "scratch"))
    BlockStore(path, writable=True).close()
    assert sorted(os.listdir(os.path.join(path, "units"))) == sorted(
        e["file"] for p in BlockStore(path).manifest["files"].values() for e in p.values())
    assert not os.path.exists(os.path.join(path, "manifest.json.commit.tmp"))
    assert not os.path.exists(os.path.join(path, "scratch"))
