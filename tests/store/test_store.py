import json
import os

import pytest
import torch

from offload_bitnet import create_model
from offload_bitnet.io.buffers import BufferPool
from offload_bitnet.store.blockstore import FORMAT_VERSION, BlockStore, StoreError
from offload_bitnet.store.units import unit_names


@pytest.fixture
def store_path(tmp_path):
    return create_model(str(tmp_path / "store"), size="demo", arch="bitnet", n_layers=2)


def test_created_store_has_every_unit_and_parts(store_path):
    store = BlockStore(store_path)
    assert store.step == 0
    assert store.units == unit_names(store.config)
    block = store.read("block.000", "weights")
    assert block["q_proj.packed"].dtype == torch.uint8
    assert block["q_proj.scale"].shape == (1,)
    assert store.read("block.000", "shadow")["q_proj"].dtype == torch.float16
    assert not store.has_part("block.000", "optim")  # moments start at zero, written on first update


def test_flipped_byte_is_detected_naming_file_and_unit(store_path):
    store = BlockStore(store_path)
    entry = store.manifest["files"]["block.001"]["weights"]
    path = os.path.join(store_path, "units", entry["file"])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(StoreError, match=r"block\.001 weights\) fails its checksum"):
        BlockStore(store_path).read("block.001", "weights")


def test_a_lazy_read_gives_the_same_tensors_one_at_a_time_and_checks_the_file_first(store_path):
    store = BlockStore(store_path)
    whole = store.read("block.000", "shadow")
    lazy = store.read_lazily("block.000", "shadow", BufferPool(1 << 30))
    assert sorted(lazy) == sorted(whole) and len(lazy) == len(whole)
    for name in whole:
        first, again = lazy[name], lazy[name]
        assert torch.equal(first, whole[name]) and first.dtype == whole[name].dtype
        assert first.data_ptr() != again.data_ptr()  # read when asked for, not kept
    entry = store.manifest["files"]["block.001"]["shadow"]
    path = os.path.join(store_path, "units", entry["file"])
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01  # the last tensor's last byte: caught before any tensor is handed out
    open(path, "wb").write(bytes(data))
    with pytest.raises(StoreError, match=r"block\.001 shadow\) fails its checksum"):
        BlockStore(store_path).read_lazily("block.001", "shadow")
    os.truncate(path, 100)
    with pytest.raises(StoreError, match="truncated"):
        BlockStore(store_path).read_lazily("block.001", "shadow")


def test_truncated_file_is_detected(store_path):
    store = BlockStore(store_path)
    path = os.path.join(store_path, "units", store.manifest["files"]["embed"]["weights"]["file"])
    os.truncate(path, 100)
    with pytest.raises(StoreError, match="truncated"):
        BlockStore(store_path).read("embed", "weights")


def test_uncommitted_writes_are_invisible_after_reopen_and_cleaned(store_path):
    store = BlockStore(store_path, writable=True)
    before = store.read("norm", "weights")["weight"].clone()
    store.write("norm", "weights", {"weight": before + 1}, step=1)
    assert torch.equal(store.read("norm", "weights")["weight"], before + 1)  # reads see the newest write
    store.close()  # crash before commit
    files_before = set(os.listdir(os.path.join(store_path, "units")))
    reopened = BlockStore(store_path, writable=True)
    assert reopened.step == 0
    assert torch.equal(reopened.read("norm", "weights")["weight"], before)
    assert len(os.listdir(os.path.join(store_path, "units"))) == len(files_before) - 1


def test_commit_switches_atomically_and_removes_replaced_files(store_path):
    store = BlockStore(store_path, writable=True)
    old_file = store.manifest["files"]["norm"]["weights"]["file"]
    store.write("norm", "weights", {"weight": torch.full((store.config.dim,), 2.0)}, step=1)
    store.commit(1, {"note": "x"})
    assert not os.path.exists(os.path.join(store_path, "units", old_file))
    store.close()
    reopened = BlockStore(store_path)
    assert reopened.step == 1 and reopened.extra == {"note": "x"}
    assert torch.equal(reopened.read("norm", "weights")["weight"], torch.full((reopened.config.dim,), 2.0))


def test_newer_format_version_is_refused(store_path):
    manifest_path = os.path.join(store_path, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["format_version"] = FORMAT_VERSION + 1
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(StoreError, match="Upgrade offload_bitnet"):
        BlockStore(store_path)


def test_second_writer_is_refused_naming_the_first(store_path):
    first = BlockStore(store_path, writable=True)
    with pytest.raises(StoreError, match=f"in use by pid {os.getpid()}"):
        BlockStore(store_path, writable=True)
    first.close()
    BlockStore(store_path, writable=True).close()


def test_not_a_store_and_existing_target(tmp_path, store_path):
    with pytest.raises(StoreError, match="manifest.json is missing"):
        BlockStore(str(tmp_path))
    with pytest.raises(StoreError, match="already holds a store"):
        create_model(store_path, size="demo")
