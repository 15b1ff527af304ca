"""A run's start on each rank (distributed/launch.py): its store made from the model's at the first launch and
reopened after, and its share of a step's micro-batches."""
import pytest

from offload_bitnet.distributed.env import DistContext
from offload_bitnet.distributed.launch import rank_share
from offload_bitnet.distributed.sharding import rank_store_dir, shard_plan
from offload_bitnet.store.blockstore import BlockStore
from rank_runs import launch
from train_runs import make_model, open_program


def test_each_rank_makes_its_store_at_the_first_launch_and_reopens_it(tmp_path):
    model = make_model(tmp_path, "qat")
    run = str(tmp_path / "run")
    results = launch(open_program, 2, str(tmp_path / "results"), model=model, run_dir=run)
    assert [r["exitcode"] for r in results] == [0, 0], results
    source = BlockStore(model)
    plan = shard_plan(source.config, 2, source.settings)
    for rank, result in enumerate(results):
        first, second = result["opens"]
        assert first == second and first["path"] == rank_store_dir(run, rank) and first["step"] == 0
        expected = sorted((unit, part) for unit, parts in source.manifest["files"].items() for part in parts
                          if part == "weights" or plan.owner(unit) == rank)
        assert [tuple(key) for key in first["units"]] == expected


def test_a_rank_takes_its_consecutive_micro_batches():
    batches = list("abcdef")
    assert [rank_share(batches, DistContext(rank, 3, backend="gloo"), 2) for rank in range(3)] == \
        [["a", "b"], ["c", "d"], ["e", "f"]]
    with pytest.raises(ValueError, match=r"a step of 6 micro-batches for 2 rank\(s\) x --grad-accum 2 "
                                         r"\(expected 4\)"):
        rank_share(batches, DistContext(0, 2, backend="gloo"), 2)
