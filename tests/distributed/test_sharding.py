"""Owners of the units' master weights and moments, and what each rank stores (computed, no store)."""
import os

import pytest

from offload_bitnet import create_model
from offload_bitnet.distributed.sharding import contiguous_split, rank_store_dir, shard_plan
from offload_bitnet.model.config import config_for_size
from offload_bitnet.store.blockstore import BlockStore, StoreSettings
from offload_bitnet.store.sizing import folder_bytes, manifest_bytes_bound, store_bytes
from offload_bitnet.store.units import unit_names

SETTINGS = [("bitnet", "qat", "fp32"), ("bitnet", "qat", "int8"), ("llama", "full", "fp32"),
            ("llama", "full", "bf16")]


@pytest.mark.parametrize("size", ["7B", "13B"])
@pytest.mark.parametrize("arch,mode,state_dtype", SETTINGS)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_rank_holds_about_one_nth_of_the_optimizer_state(size, arch, mode, state_dtype, world_size):
    config = config_for_size(size, arch=arch)
    settings = StoreSettings(mode=mode, state_dtype=state_dtype)
    plan = shard_plan(config, world_size, settings)
    single = store_bytes(config, mode=mode, state_dtype=state_dtype)
    assert plan.single_owned_bytes == single["shadow"] + single["optim"]
    for share in plan.ranks:
        assert share.owned_bytes <= plan.single_owned_bytes * (1 + 0.05) / world_size, plan.describe()
    assert sum(share.owned_bytes for share in plan.ranks) == plan.single_owned_bytes
    # every unit has exactly one owner, and each rank's units are one contiguous range in forward order
    units = unit_names(config)
    assert [u for share in plan.ranks for u in share.units] == units
    assert all(plan.owner(u) == share.rank for share in plan.ranks for u in share.units)
    # every rank keeps every unit's forward weights
    assert all(share.disk_bytes - share.owned_bytes >= single["weights"] for share in plan.ranks)


def test_per_rank_bytes_and_description():
    config = config_for_size("7B", arch="bitnet")
    plan = shard_plan(config, 2)
    single = store_bytes(config)
    for share in plan.ranks:
        assert share.written_per_step == single["weights"] + share.owned_bytes
        assert share.read_per_step == 2 * single["weights"] + share.owned_bytes
        assert share.peak_disk_bytes > share.disk_bytes
    lines = plan.describe()
    assert lines[0].startswith("rank 0: owns embed..block.0")
    assert "rank 1: owns block." in lines[1] and "..head" in lines[1] and "per step writes" in lines[1]


def test_contiguous_split_minimizes_the_largest_share():
    assert contiguous_split([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert contiguous_split([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert contiguous_split([3], 3) == [range(0, 1), range(1, 1), range(1, 1)]
    with pytest.raises(ValueError):
        contiguous_split([1], 0)


def test_plan_matches_a_real_store_and_names_rank_folders(tmp_path):
    path = create_model(str(tmp_path / "store"), size="demo", arch="bitnet")
    store = BlockStore(path)
    plan = shard_plan(store.config, 2, store.settings)
    shadow_on_disk = {unit: parts["shadow"]["bytes"] for unit, parts in store.manifest["files"].items()
                      if "shadow" in parts}
    assert sum(shadow_on_disk.values()) + store_bytes(store.config)["optim"] == plan.single_owned_bytes
    weights_on_disk = sum(parts["weights"]["bytes"] for parts in store.manifest["files"].values())
    manifest = manifest_bytes_bound(store.config, store.settings)
    for share in plan.ranks:
        assert share.disk_bytes == weights_on_disk + share.owned_bytes + manifest
    assert folder_bytes(os.path.join(path, "manifest.json")) <= manifest
    assert rank_store_dir("/runs/exp", 1) == "/runs/exp/store.rank1"
