"""Making each rank's store from a model's store."""
import pytest
import torch

from offload_bitnet import create_model
from offload_bitnet.distributed.env import DistributedError
from offload_bitnet.distributed.rank_stores import make_rank_store
from offload_bitnet.distributed.sharding import rank_store_dir, shard_plan
from offload_bitnet.store.blockstore import BlockStore


def test_rank_stores_split_the_owned_parts_and_keep_every_weight(tmp_path):
    source = BlockStore(create_model(str(tmp_path / "model"), size="demo", arch="bitnet"))
    plan = shard_plan(source.config, 2, source.settings)
    stores = [make_rank_store(source, rank_store_dir(str(tmp_path), rank), plan, rank) for rank in range(2)]
    for rank, store in enumerate(stores):
        assert store.step == source.step and store.extra["distributed"] == {"world_size": 2, "rank": rank}
        assert store.extra["created_from"] == source.extra["created_from"]
        for unit in source.units:
            expected = {"weights"} | ({"shadow"} & set(source.manifest["files"][unit]) if plan.owner(unit) == rank
                                      else set())
            assert set(store.manifest["files"][unit]) == expected, (rank, unit)
            for part in expected:
                mine, theirs = store.read(unit, part), source.read(unit, part)
                assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in theirs)
        store.close()
    shadows = [{u for u, parts in s.manifest["files"].items() if "shadow" in parts} for s in stores]
    assert not shadows[0] & shadows[1]
    assert shadows[0] | shadows[1] == {u for u, parts in source.manifest["files"].items() if "shadow" in parts}


def test_plan_of_another_model_is_refused(tmp_path):
    source = BlockStore(create_model(str(tmp_path / "model"), size="demo", arch="bitnet", n_layers=2))
    other = shard_plan(BlockStore(create_model(str(tmp_path / "other"), size="demo", arch="bitnet")).config, 2)
    with pytest.raises(DistributedError, match="made for another model"):
        make_rank_store(source, str(tmp_path / "r0"), other, 0)
    with pytest.raises(DistributedError, match="rank 2 is not one of the plan's 2 ranks"):
        make_rank_store(source, str(tmp_path / "r0"), shard_plan(source.config, 2, source.settings), 2)
