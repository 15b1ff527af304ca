"""Commits across 2 gloo ranks on demo stores: they advance together, a rank killed at any moment of a commit
is brought back to the common step, mismatched stores are refused."""
import json
import os

import pytest
import torch

from offload_bitnet import create_model
from offload_bitnet.distributed.commit import RankCommit
from offload_bitnet.distributed.env import DistContext, DistributedError
from offload_bitnet.distributed.rank_stores import make_rank_store
from offload_bitnet.distributed.sharding import shard_plan
from offload_bitnet.store.blockstore import BlockStore
from rank_runs import assert_same_state, commit_program, launch, rank_stores, same_step_program

STEPS = 3


def _manifest(path):
    return json.load(open(os.path.join(path, "manifest.json")))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted 2-rank run of STEPS steps: the reference the crash tests must end at, bit for bit."""
    folder = tmp_path_factory.mktemp("clean")
    paths = rank_stores(folder)
    results = launch(commit_program, 2, str(folder / "results"), store_dirs=paths, steps=STEPS)
    return paths, results


def test_commits_advance_together_and_record_the_run(clean_run):
    paths, results = clean_run
    assert [r["exitcode"] for r in results] == [0, 0], results
    assert [r["step"] for r in results] == [STEPS, STEPS]
    for rank, path in enumerate(paths):
        manifest = _manifest(path)
        assert manifest["step"] == STEPS and "previous" not in manifest and manifest["format_version"] == 1
        assert manifest["extra"]["distributed"] == {"world_size": 2, "rank": rank, "commit": STEPS}
        assert manifest["extra"]["position"] == STEPS
    # shard_plan: rank 0 owns the first units' moments, rank 1 the rest; both hold every unit's weights
    owned = [{unit for unit, parts in _manifest(path)["files"].items() if "optim" in parts} for path in paths]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(_manifest(paths[0])["files"])
    # the loss denominator: the global count of target tokens, the same as one process counts
    targets = torch.randint(-1, 5, (8, 6), generator=torch.Generator().manual_seed(0))
    assert [r["tokens"] for r in results] == [int((targets >= 0).sum())] * 2


# (fault on rank 1, the state the crash must leave: each rank's (step, kept previous step))
CRASHES = {
    # killed writing step 2's files (67 chunk writes per step on rank 1): nobody switched
    "while writing": ("write.data:100:kill", [(1, None), (1, None)]),
    # passes through commit.rename: 2 per step (switch, release);
    # 3 = step 2's switch: rank 0 switches (keeping 1), rank 1 dies before it does
    "between the switches": ("commit.rename:3:kill", [(2, 1), (1, None)]),
    # 4 = step 2's release: both switched, rank 1 still keeps step 1
    "before releasing": ("commit.rename:4:kill", [(2, None), (2, 1)]),
}


@pytest.mark.parametrize("moment", list(CRASHES))
def test_rank_killed_during_a_commit_comes_back_to_the_clean_result(tmp_path, clean_run, moment):
    fault, expected = CRASHES[moment]
    paths = rank_stores(tmp_path)
    crashed = launch(commit_program, 2, str(tmp_path / "results"), store_dirs=paths, steps=STEPS,
                     faults_by_rank={1: fault})
    assert crashed[1]["exitcode"] == -9, crashed  # SIGKILL
    assert crashed[0]["exitcode"] == 1 and "another rank stopped" in crashed[0]["error"], crashed[0]
    assert crashed[0]["error"].startswith("rank 0 of 2: ")
    states = [(_manifest(p)["step"], _manifest(p).get("previous", {}).get("step")) for p in paths]
    assert states == expected
    resumed = launch(commit_program, 2, str(tmp_path / "results"), store_dirs=paths, steps=STEPS)
    assert [r["exitcode"] for r in resumed] == [0, 0], resumed
    assert [r["start"] for r in resumed] == [min(step for step, _ in expected)] * 2
    for path, reference in zip(paths, clean_run[0]):
        assert_same_state(path, reference)
        assert not any(name.endswith(".tmp") for name in os.listdir(os.path.join(path, "units")))


def test_a_rank_killed_between_the_switches_of_a_commit_that_keeps_the_step_is_rolled_back(tmp_path):
    # A skipped step commits its advanced data position at the same step: the commits are told apart by their
    # serial, so the rank that switched goes back to the commit every rank made.
    paths = rank_stores(tmp_path)
    # rank 1's manifest switches: step 1's switch (1) and release (2); the 3rd is the same-step commit's switch.
    crashed = launch(same_step_program, 2, str(tmp_path / "results"), store_dirs=paths, position="skipped",
                     faults_by_rank={1: "commit.rename:3:kill"})
    assert crashed[1]["exitcode"] == -9 and crashed[0]["exitcode"] == 1, crashed
    assert [_manifest(p)["extra"]["position"] for p in paths] == ["skipped", "step 1"]  # rank 0 switched alone
    resumed = launch(same_step_program, 2, str(tmp_path / "results"), store_dirs=paths, position=None)
    assert [(r["exitcode"], r["start"], r["position"]) for r in resumed] == [(0, 1, "step 1")] * 2, resumed
    for path in paths:
        manifest = _manifest(path)
        assert "previous" not in manifest and manifest["extra"]["distributed"]["commit"] == 1


def test_another_world_size_is_refused(clean_run, tmp_path):
    alone = BlockStore(clean_run[0][0], writable=False)
    with pytest.raises(DistributedError, match=r"belongs to a run on 2 ranks .* this run has 1\. Relaunch with 2"):
        RankCommit(DistContext(), alone).recover()


def test_stores_of_different_models_are_refused_on_every_rank(tmp_path):
    paths = [create_model(str(tmp_path / "a"), size="demo", arch="bitnet", n_layers=2),
             create_model(str(tmp_path / "b"), size="demo", arch="bitnet", n_layers=3)]
    results = launch(commit_program, 2, str(tmp_path / "results"), store_dirs=paths, steps=1)
    for rank, result in enumerate(results):
        assert result["exitcode"] == 1
        assert result["error"].startswith(f"rank {rank} of 2: the ranks' stores hold different models")
        assert str(tmp_path / "a") in result["error"] and str(tmp_path / "b") in result["error"]
    assert [_manifest(p)["step"] for p in paths] == [0, 0]


def _rank_stores_for(folder, world_size, ranks):
    source = BlockStore(create_model(str(folder / "model"), size="demo", arch="bitnet", n_layers=2))
    plan = shard_plan(source.config, world_size, source.settings)
    return [make_rank_store(source, str(folder / f"for{world_size}.rank{r}"), plan, r).path for r in ranks]


def test_stores_of_a_run_on_another_world_size_are_refused_on_every_rank(tmp_path):
    paths = _rank_stores_for(tmp_path, 3, [0, 1])
    results = launch(commit_program, 2, str(tmp_path / "results"), store_dirs=paths, steps=1)
    for rank, result in enumerate(results):
        assert result["exitcode"] == 1
        assert result["error"] == (f"rank {rank} of 2: rank 0: store {paths[0]} belongs to a run on 3 ranks, and "
                                   "this run has 2. Relaunch with 3 processes (torchrun --nproc_per_node / "
                                   "--nnodes), or start a new run from the model.")
    assert [_manifest(p)["step"] for p in paths] == [0, 0]


def test_swapped_rank_stores_are_refused(tmp_path):
    paths = _rank_stores_for(tmp_path, 2, [1, 0])
    results = launch(commit_program, 2, str(tmp_path / "results"), store_dirs=paths, steps=1)
    for rank, result in enumerate(results):
        assert result["exitcode"] == 1
        assert f"rank 0 was given store {paths[0]}, which is rank 1's share of the run" in result["error"]
