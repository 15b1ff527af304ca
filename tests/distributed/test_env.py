"""The torchrun environment, the single-process context, and the collectives on 2 gloo ranks."""
import pytest
import torch
import torch.distributed as dist

from offload_bitnet.distributed.env import (DistContext, DistributedError, RankError, TorchrunEnv, default_backend,
                                            init_distributed, named_rank_errors)
from rank_runs import collectives_program, free_port, launch

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_torchrun_environment_is_read_and_checked():
    assert TorchrunEnv.from_environ({"PATH": "/bin"}) is None
    env = TorchrunEnv.from_environ(TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29500)
    partial = {k: v for k, v in TORCHRUN.items() if k not in ("MASTER_ADDR", "LOCAL_WORLD_SIZE")}
    with pytest.raises(DistributedError, match="incomplete: .* but LOCAL_WORLD_SIZE, MASTER_ADDR not"):
        TorchrunEnv.from_environ(partial)
    with pytest.raises(DistributedError, match="must be integers, got RANK='one'"):
        TorchrunEnv.from_environ(dict(TORCHRUN, RANK="one"))
    with pytest.raises(DistributedError, match="RANK=2 WORLD_SIZE=2"):
        TorchrunEnv.from_environ(dict(TORCHRUN, RANK="2"))


def test_without_torchrun_nothing_changes(monkeypatch):
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    context = init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_main, context.distributed) == (0, 1, True, False)
    assert context.describe() == "one process"
    context.barrier()
    assert context.all_reduce_sum_int([3, 4]) == [3, 4] and context.all_reduce_min_int([2]) == [2]
    tensor = torch.ones(2)
    assert context.all_reduce_sum_(tensor) is tensor and context.all_gather_object("x") == ["x"]

    @named_rank_errors(context)
    def fails():
        raise ValueError("bad value")
    with pytest.raises(ValueError, match="^bad value$"):  # a single process keeps its exceptions as they are
        fails()
    context.close()


def test_backend_choice_and_refusals(monkeypatch):
    assert [default_backend(d) for d in ("cpu", "mps", "cuda", "cuda:1", "mlx")] == \
        ["gloo", "gloo", "nccl", "nccl", "gloo"]
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedError, match="--dist-backend must be one of gloo, nccl, got 'mpi2'"):
        init_distributed("cpu", backend="mpi2")
    with pytest.raises(DistributedError, match="nccl backend needs --device cuda"):
        init_distributed("cpu", backend="nccl")


def test_one_rank_group_joins_and_closes(monkeypatch):
    env = dict(TORCHRUN, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    context = init_distributed("cpu", timeout_s=30)
    try:
        assert dist.is_initialized() and context.backend == "gloo" and context.describe() == "rank 0 of 1"
        assert context.all_reduce_sum_int([5]) == [5]

        @named_rank_errors(context)
        def fails():
            raise OSError("disk gone")
        with pytest.raises(RankError, match="^rank 0 of 1: disk gone$") as caught:
            fails()
        assert isinstance(caught.value.__cause__, OSError)
    finally:
        context.close()
    assert not dist.is_initialized() and not context.distributed
    context.close()  # idempotent


def test_collectives_on_two_ranks(tmp_path):
    results = launch(collectives_program, 2, str(tmp_path))
    assert [r["exitcode"] for r in results] == [0, 0], results
    for rank, result in enumerate(results):
        assert result["describe"] == f"rank {rank} of 2" and result["is_main"] == (rank == 0)
        assert result["backend"] == "gloo"
        assert result["sum"] == [3, 20] and result["min"] == [5] and result["max"] == [1]
        assert result["gathered"] == [{"r": 0}, {"r": 1}]
    expected = (torch.full((3,), 0.1) + torch.full((3,), 0.2)).tolist()
    assert results[0]["tensor"] == results[1]["tensor"] == expected
