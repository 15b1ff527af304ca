"""LoRA on ``--device mlx``: the adapters' AdamW runs in MLX (the backend's ``adamw_update``), the adapters after
a step match the torch backend's, and a resumed MLX run ends bit-identical to an uninterrupted one."""
import pytest
import torch

pytest.importorskip("mlx.core")

from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine  # noqa: E402
from offload_bitnet.model.adamw import AdamWConfig, adamw_update  # noqa: E402
from offload_bitnet.model.lora import LoRAConfig  # noqa: E402
from offload_bitnet.reference.parity import relative_error  # noqa: E402
from offload_bitnet.store.blockstore import BlockStore  # noqa: E402
from offload_bitnet.store.write import create_model  # noqa: E402

TOLERANCE = 1e-5
SMALL = dict(size="demo", n_layers=2, vocab_size=128)
TARGETS = ("q_proj", "v_proj", "down_proj")


def _batches(vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (2, 16), generator=generator), None) for _ in range(2)]


def _engine(path, adapter_dir, device, dropout=0.0):
    lora = LoRAConfig(rank=4, alpha=8, dropout=dropout, targets=TARGETS)
    return StreamingEngine(BlockStore(path), EngineOptions(device=device, lora=lora, adapter_dir=str(adapter_dir),
                                                           seed=0, optim=AdamWConfig(lr=1e-2, weight_decay=0.1)))


def _counting_updates(engine) -> list:
    """Count the calls of the engine's backend's AdamW (plain assignment on the instance, undone with it)."""
    calls, update = [], engine.backend.adamw_update

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return update(*args, **kwargs)

    engine.backend.adamw_update = counting
    return calls


def _snapshot(adapters) -> dict:
    """``{(layer, proj, matrix): (weight, exp_avg, exp_avg_sq)}`` copies of an ``AdapterSet``."""
    return {(*key, m): (t.clone(), *(s.clone() for s in adapters.moments[key][m]))
            for key, mats in adapters.weights.items() for m, t in mats.items()}


def test_lora_on_mlx_gives_torch_gradients_and_runs_its_adamw_in_mlx(tmp_path):
    """Dropout off. The moments after each of two steps (the gradients: exp_avg is 0.1 g at step 1) match the
    torch backend's; the adapters after step 1 are torch's AdamW applied to the MLX step's own gradients; every
    adapter update went through the backend's (MLX's) AdamW.

    The adapters after step 1 are not compared with the torch backend's at 1e-5 (2.5e-5 measured): AdamW's
    first step is lr * g / (|g| + eps), whose derivative lr * eps / (|g| + eps)^2 turns the two backends'
    last-bit gradient differences (1e-11 absolute here) into 2.5e-7 weight differences at an element whose
    gradient is 1e-7 (eps is 1e-8), as torch's AdamW does from the MLX gradients too."""
    path = create_model(str(tmp_path / "base"), arch="llama", mode="full", **SMALL)
    snapshots, losses = {}, {}
    for device in ["cpu", "mlx"]:
        with _engine(path, tmp_path / device, device) as engine:
            calls = _counting_updates(engine)
            snapshots[device] = [_snapshot(engine.adapters)]
            losses[device] = []
            for seed in (3, 4):
                losses[device].append(engine.train_step(_batches(engine.config.vocab_size, seed)).loss)
                snapshots[device].append(_snapshot(engine.adapters))
            assert engine.backend.name == ("mlx" if device == "mlx" else "torch")
            # Every adapter matrix of every block, each step, through the backend's AdamW.
            assert len(calls) == 2 * engine.config.n_layers * len(TARGETS) * 2
            optim = engine.options.optim
    assert losses["mlx"] == pytest.approx(losses["cpu"], rel=TOLERANCE)
    for step in (1, 2):
        worst = max(relative_error(mlx_value, torch_value)
                    for key, values in snapshots["cpu"][step].items()
                    for mlx_value, torch_value in zip(snapshots["mlx"][step][key][1:], values[1:]))
        print(f"LoRA on mlx, step {step}: moments max_rel_err vs torch {worst:.2e}")
        assert worst <= TOLERANCE
    worst = against_torch = 0.0
    for key, (initial, _, _) in snapshots["mlx"][0].items():
        weight, exp_avg, _ = snapshots["mlx"][1][key]
        param, moments = initial.clone(), (torch.zeros_like(initial), torch.zeros_like(initial))
        adamw_update(param, exp_avg / (1 - optim.beta1), *moments, 1, optim)
        worst = max(worst, relative_error(weight, param))
        against_torch = max(against_torch, relative_error(weight, snapshots["cpu"][1][key][0]))
    print(f"LoRA on mlx, step 1: adapters max_rel_err vs torch's AdamW of the MLX gradients {worst:.2e}, "
          f"vs the torch backend's adapters {against_torch:.2e}")
    assert worst <= TOLERANCE


def test_lora_resumed_on_mlx_equals_uninterrupted(tmp_path):
    path = create_model(str(tmp_path / "base"), arch="bitnet", mode="qat", **SMALL)
    vocab = BlockStore(path).config.vocab_size
    batches = [_batches(vocab, seed) for seed in range(3)]
    with _engine(path, tmp_path / "straight", "mlx", dropout=0.1) as straight:
        for batch in batches:
            straight.train_step(batch)
        expected = straight.adapters
    with _engine(path, tmp_path / "resumed", "mlx", dropout=0.1) as first:
        first.train_step(batches[0])
    with _engine(path, tmp_path / "resumed", "mlx", dropout=0.1) as resumed:
        assert resumed.step == 1
        for batch in batches[1:]:
            resumed.train_step(batch)
        for key, mats in expected.weights.items():
            for matrix, tensor in mats.items():
                assert torch.equal(tensor, resumed.adapters.weights[key][matrix]), (key, matrix)
                for kept, got in zip(expected.moments[key][matrix], resumed.adapters.moments[key][matrix]):
                    assert torch.equal(kept, got), (key, matrix)
