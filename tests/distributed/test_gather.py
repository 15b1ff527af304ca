"""offload-bitnet export, gather, info and verify on a distributed run's folder (RUN/store.rank<R>)."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from offload_bitnet.cli import main as cli_main
from offload_bitnet.distributed.env import DistributedError
from offload_bitnet.distributed.gather import rank_store_paths
from rank_runs import launch
from train_runs import assert_equal, make_model, make_rank_stores, store_tensors, train, train_program


def _hf_tensors(folder):
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-rank run and the same steps on one process (2 micro-batches): the same model."""
    folder = tmp_path_factory.mktemp("gather")
    run = folder / "run"
    stores = make_rank_stores(make_model(run, "qat"), run, 2)
    results = launch(train_program, 2, str(folder / "results"), store_dirs=stores, mode="qat", steps=2,
                     batch_size=4, grad_accum=1)
    assert [r["exitcode"] for r in results] == [0, 0], results
    single = make_model(folder / "single", "qat")
    train(single, "qat", 2, 4, 2)
    return run, stores, single


def test_export_of_a_distributed_run_is_the_single_process_export(runs, tmp_path, capsys):
    run, stores, single = runs
    assert cli_main(["export", str(run), str(tmp_path / "two"), "--format", "hf"]) == 0
    assert cli_main(["export", single, str(tmp_path / "one"), "--format", "hf"]) == 0
    assert_equal(_hf_tensors(tmp_path / "two"), _hf_tensors(tmp_path / "one"), "hf exports")
    assert not os.path.exists(str(tmp_path / "two") + ".gathering")
    # one rank's folder names the run too
    assert cli_main(["export", stores[1], str(tmp_path / "three"), "--format", "hf"]) == 0


def test_gather_makes_the_single_process_store(runs, tmp_path):
    run, _, single = runs
    assert cli_main(["gather", str(run), str(tmp_path / "gathered")]) == 0
    assert_equal(store_tensors(str(tmp_path / "gathered")), store_tensors(single), "gathered store")


def test_info_and_verify_cover_every_rank(runs, capsys):
    run, stores, _ = runs
    assert cli_main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "distributed run on 2 ranks" in out and "rank 1: " + stores[1] in out and "step 2" in out
    assert cli_main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert all(f"{path}: all files match their checksums (step 2)" in out for path in stores)


def test_a_missing_rank_says_which_folder_to_copy(runs, tmp_path):
    run, stores, _ = runs
    partial = tmp_path / "partial"
    shutil.copytree(stores[0], partial / "store.rank0")
    with pytest.raises(DistributedError, match=r"lacks the store of rank\(s\) 1: copy each from the machine "
                                               r"that ran it \(rsync -a HOST_OF_RANK_1:.*store\.rank1"):
        rank_store_paths(str(partial))
    assert rank_store_paths(stores[0]) == stores
