"""A rank of a 2-rank training run (the engine's distributed step) killed with kill -9 inside a block's update,
inside a write, between the ranks' manifest switches: the relaunched run ends bit-identical to an
uninterrupted one (every tensor of every rank's store, the manifests' steps and records)."""
import json
import os

import pytest

from rank_runs import launch
from train_runs import assert_equal, gathered_tensors, make_model, make_rank_stores, train_program

STEPS = 3
ARGS = dict(mode="qat", steps=STEPS, batch_size=4, grad_accum=1)


def _manifest(path):
    return json.load(open(os.path.join(path, "manifest.json")))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    stores = make_rank_stores(make_model(folder, "qat"), folder, 2)
    results = launch(train_program, 2, str(folder / "results"), store_dirs=stores, **ARGS)
    assert [r["exitcode"] for r in results] == [0, 0], results
    return stores, results[0]["losses"]


# the fault on rank 1 (which owns the last blocks and the final norm: its updates run on its writer thread)
KILLS = {"inside a block's update in step 2": "update:4:kill",
         "inside a write": "write.data:30:kill",
         "between the ranks' manifest switches of step 2": "commit.rename:3:kill"}


@pytest.mark.parametrize("moment", list(KILLS))
def test_a_rank_killed_mid_step_relaunches_to_the_uninterrupted_result(tmp_path, clean_run, moment):
    stores = make_rank_stores(make_model(tmp_path, "qat"), tmp_path, 2)
    crashed = launch(train_program, 2, str(tmp_path / "results"), store_dirs=stores, faults_by_rank={1: KILLS[moment]},
                     **ARGS)
    assert crashed[1]["exitcode"] == -9, crashed
    assert crashed[0]["exitcode"] == 1 and crashed[0]["error"].startswith("rank 0 of 2: "), crashed[0]
    steps = [_manifest(p)["step"] for p in stores]
    assert max(steps) - min(steps) <= 1 and max(steps) < STEPS
    resumed = launch(train_program, 2, str(tmp_path / "results"), store_dirs=stores, **ARGS)
    assert [r["exitcode"] for r in resumed] == [0, 0], resumed
    assert resumed[0]["losses"] == clean_run[1][min(steps):]  # the steps after the common one, as before
    assert_equal(gathered_tensors(stores), gathered_tensors(clean_run[0]), moment)
    for path, reference in zip(stores, clean_run[0]):
        manifest, expected = _manifest(path), _manifest(reference)
        assert manifest["step"] == STEPS and manifest["extra"] == expected["extra"] and "previous" not in manifest
        assert sorted(os.listdir(os.path.join(path, "units"))) == sorted(os.listdir(os.path.join(reference, "units")))
