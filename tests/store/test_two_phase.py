"""The store's side of a commit across ranks: keep the previous step, roll back to it, release it."""
import json
import os

import pytest
import torch

from offload_bitnet import create_model
from offload_bitnet.io import faults
from offload_bitnet.store.blockstore import BlockStore, StoreError


@pytest.fixture
def store_path(tmp_path):
    return create_model(str(tmp_path / "store"), size="demo", arch="bitnet", n_layers=2)


def _unit_files(path):
    return sorted(os.listdir(os.path.join(path, "units")))


def _write_step(store, step, value):
    store.write("norm", "weights", {"weight": torch.full((store.config.dim,), float(value))}, step)


def test_plain_commit_writes_no_previous_record_and_keeps_format(store_path):
    store = BlockStore(store_path, writable=True)
    _write_step(store, 1, 1.0)
    store.commit(1)
    manifest = json.load(open(os.path.join(store_path, "manifest.json")))
    assert "previous" not in manifest and manifest["format_version"] == 1
    assert store.previous_step is None


def test_kept_previous_survives_reopen_and_rolls_back(store_path):
    store = BlockStore(store_path, writable=True)
    before = store.read("norm", "weights")["weight"].clone()
    old_manifest = dict(store.manifest)
    _write_step(store, 1, 7.0)
    store.commit(1, extra={"run": 1}, keep_previous=True)
    assert store.step == 1 and store.previous_step == 0 and store.manifest["format_version"] == 3
    store.close()
    # a crash here: the store reopens at step 1 and keeps step 0's files (they are not "uncommitted")
    reopened = BlockStore(store_path, writable=True)
    assert reopened.step == 1 and reopened.previous_step == 0
    assert torch.equal(reopened.read("norm", "weights")["weight"], torch.full_like(before, 7.0))
    reopened.rollback(0)
    assert reopened.step == 0 and reopened.previous_step is None
    assert torch.equal(reopened.read("norm", "weights")["weight"], before)
    reopened.close()
    again = BlockStore(store_path, writable=True)
    assert again.manifest == old_manifest  # exactly the state before step 1, format version and extra included
    assert torch.equal(again.read("norm", "weights")["weight"], before)
    assert again.verify_all() == []


def test_release_recycles_previous_files_and_restores_format(store_path):
    store = BlockStore(store_path, writable=True)
    files_before = _unit_files(store_path)
    _write_step(store, 1, 3.0)
    store.commit(1, keep_previous=True)
    assert len(_unit_files(store_path)) == len(files_before) + 1  # old and new norm weights both on disk
    store.release_previous()
    assert store.previous_step is None and store.manifest["format_version"] == 1
    assert "previous" not in json.load(open(os.path.join(store_path, "manifest.json")))
    store.close()
    assert len(_unit_files(store_path)) == len(files_before)  # the old one was recycled, then removed at close
    reopened = BlockStore(store_path, writable=True)
    reopened.release_previous()  # no-op when nothing is kept
    assert reopened.step == 1 and reopened.verify_all() == []


def test_rollback_to_a_step_not_kept_is_refused(store_path):
    store = BlockStore(store_path, writable=True)
    _write_step(store, 1, 1.0)
    store.commit(1)
    with pytest.raises(StoreError, match="cannot roll store .* back from step 1 to step 0: it keeps no earlier"):
        store.rollback(0)
    store.rollback(1)  # already there
    _write_step(store, 2, 2.0)
    store.commit(2, keep_previous=True)
    with pytest.raises(StoreError, match="it keeps step 1"):
        store.rollback(0)
    _write_step(store, 3, 3.0)
    with pytest.raises(StoreError, match="still kept; release it first"):
        store.commit(3, keep_previous=True)


@pytest.mark.parametrize("pass_number", [1, 2])
def test_crash_at_either_switch_opens_at_one_of_the_two_steps(store_path, pass_number):
    """A fault at the manifest switch of the commit (1) or of the release (2): the store opens at step 1
    (keeping step 0 when the release did not happen) and every file it names checks out."""
    store = BlockStore(store_path, writable=True)
    _write_step(store, 1, 5.0)
    faults.configure(f"commit.rename:{pass_number}:raise")
    try:
        with pytest.raises(faults.InjectedFault):
            store.commit(1, keep_previous=True)
            store.release_previous()
    finally:
        faults.configure("")
    store.close()
    reopened = BlockStore(store_path, writable=True)
    assert reopened.step == (0 if pass_number == 1 else 1)
    assert reopened.previous_step == (None if pass_number == 1 else 0)
    assert reopened.verify_all() == []
