"""Exact gradient sums (engine/grad_sums.py, ``EngineOptions.exact_grad_sums``): float64 sums of the
micro-batches' gradients, the same in any order, for dense leaves and for one-projection-at-a-time blocks."""
import pytest
import torch

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, create_model
from offload_bitnet.engine.grad_sums import ExactSums, RoundedSums
from offload_bitnet.model.block import LazyWeight, lazy_weights


def test_exact_sums_move_each_gradient_into_a_float64_sum():
    leaf = ExactSums().track(torch.tensor([1.0, 1e-8], requires_grad=True))
    for scale in (1.0, 3.0):
        (leaf * scale).sum().backward()
        assert leaf.grad is None  # moved into the sum as soon as autograd made it
    assert leaf.grad_sum.dtype == torch.float64 and leaf.grad_sum.tolist() == [4.0, 4.0]
    assert ExactSums().summed(leaf) is leaf.grad_sum


def test_rounded_sums_are_autograds_own():
    sums = RoundedSums()
    leaf = sums.track(torch.ones(2, requires_grad=True))
    leaf.sum().backward()
    leaf.sum().backward()
    assert sums.summed(leaf).dtype == torch.float32 and sums.summed(leaf).tolist() == [2.0, 2.0]
    untouched = torch.ones(3, requires_grad=True)
    assert torch.equal(sums.summed_or_zeros(untouched), torch.zeros(3))
    assert ExactSums().summed_or_zeros(torch.ones(3, requires_grad=True)).dtype == torch.float64


def test_a_lazy_weight_sums_its_gradient_in_float64():
    config_names = ["q_proj"]
    from offload_bitnet.model.config import config_for_size
    weight = lazy_weights(config_for_size("demo"), config_names, lambda name: torch.ones(4, 3),
                          requires_grad=True)["q_proj"]
    assert isinstance(weight, LazyWeight)
    ExactSums().track(weight)
    from offload_bitnet.model.block import _LazyLinear
    for _ in range(2):
        _LazyLinear.apply(torch.ones(2, 3, requires_grad=True), weight, None).sum().backward()
    assert weight.grad.dtype == torch.float64 and torch.equal(weight.grad, torch.full((4, 3), 4.0, dtype=torch.float64))


def _blocks_after_a_step(path: str, micro_batches, lazy: bool) -> dict:
    options = EngineOptions(optim=AdamWConfig(lr=1e-2), exact_grad_sums=True, dense_block_bytes=0 if lazy else 2 << 30)
    with StreamingEngine(BlockStore(path, writable=True), options) as engine:
        stats = engine.train_step([(ids, None) for ids in micro_batches])
        assert stats.skipped is None
    store = BlockStore(path)
    try:
        return {(unit, part): store.read(unit, part) for unit, parts in store.manifest["files"].items()
                for part in parts if unit.startswith("block.")}
    finally:
        store.close()


@pytest.mark.parametrize("lazy", [False, True], ids=["dense", "one-projection-at-a-time"])
def test_exact_sums_give_the_same_blocks_whatever_the_micro_batch_order(tmp_path, lazy):
    # The blocks' updates see only their summed gradients, so any order of the same micro-batches updates them
    # to the same bits (the embedding's token gradients are added in micro-batch order, and are not compared).
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(4)
    micro = [torch.randint(0, 256, (1, 12), generator=generator) for _ in range(4)]
    results = []
    for name, order in (("forward", micro), ("reversed", micro[::-1])):
        path = create_model(str(tmp_path / name), size="demo", arch="llama", n_layers=2, mode="full",
                            shadow_dtype="fp32")
        results.append(_blocks_after_a_step(path, order, lazy))
    assert results[0].keys() == results[1].keys() and len(results[0]) == 4  # 2 blocks x weights, optim
    for key, tensors in results[0].items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, results[1][key][name]), (key, name)


def test_exact_sums_are_refused_on_mlx(tmp_path):
    pytest.importorskip("mlx.core")
    path = create_model(str(tmp_path / "m"), size="demo", n_layers=1)
    with pytest.raises(ValueError, match="exact gradient sums .* add in float64"):
        StreamingEngine(BlockStore(path, writable=True), EngineOptions(device="mlx", exact_grad_sums=True))
