"""The streaming engine on ``--device mlx`` (engine.backend.MLXBackend): one streamed step's gradients against
torch autograd (dropout off; qat: with the activation codes the MLX step chose) and against the in-memory MLX
``mx.grad`` reference (dropout on), LoRA on MLX against LoRA on torch, determinism, and the error without MLX
installed."""
import sys

import pytest
import torch

from offload_bitnet.engine.backend import MLX_INSTALL_HINT, make_backend
from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.model.lora import LoRAConfig
from offload_bitnet.reference.parity import relative_error
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.write import create_model

TOLERANCE = 1e-5
SMALL = dict(n_layers=2, vocab_size=128)


def test_without_mlx_the_mlx_device_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    with pytest.raises(RuntimeError, match="not installed") as error:
        make_backend("mlx")
    assert MLX_INSTALL_HINT in str(error.value)
    assert make_backend("cpu").name == "torch"


mx = pytest.importorskip("mlx.core")
from offload_bitnet.reference.parity import run_mlx_parity  # noqa: E402


@pytest.mark.parametrize("mode", ["full", "qat"])
def test_streamed_mlx_step_matches_torch_autograd_and_the_mlx_reference(tmp_path, mode):
    result = run_mlx_parity(mode, dropout=0.1, micro_batches=2, workdir=str(tmp_path), **SMALL)
    print(f"{mode}: grads vs torch {result.grad_err:.2e}, vs MLX reference {result.grad_vs_mlx:.2e}; weights after "
          f"AdamW vs torch {result.weights_vs_torch:.2e}, vs MLX reference {result.weights_vs_mlx:.2e}; AdamW vs "
          f"torch.optim.AdamW {result.adamw_vs_torch:.2e}")
    # The same library and operations as its in-memory reference: the same bits but for the embedding, whose
    # repeated tokens' rows the engine sums in torch, in another order than MLX's scatter. So even the weights
    # after AdamW agree, where a last-bit gradient difference near |g| ~ eps would move them by up to lr.
    assert result.grad_vs_mlx <= TOLERANCE, result.grad_vs_mlx_worst
    assert result.weights_vs_mlx <= TOLERANCE, result.weights_vs_mlx_worst
    assert result.loss_vs_mlx <= TOLERANCE
    assert result.adamw_vs_torch <= TOLERANCE, result.adamw_vs_torch_worst
    assert abs(result.dropout_streamed_loss - result.streamed_loss) > 1e-4  # dropout really is on
    if mode == "full":
        assert result.grad_err <= TOLERANCE, result.grad_worst
        assert abs(result.streamed_loss - result.torch_loss) <= TOLERANCE * result.torch_loss
    else:
        # qat's activations are rounded to 8 bits: a last-bit difference between the two libraries' matmuls flips
        # a level now and then, so its raw cross-backend gradients are not held to 1e-5; torch autograd run with
        # the activation codes the MLX step chose is (see README, "MLX backend", and reference.activation_codes).
        assert result.grad_vs_same_codes <= TOLERANCE, result.grad_vs_same_codes_worst


def _batches(vocab: int, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (2, 16), generator=generator), None) for _ in range(2)]


def test_lora_step_on_mlx_gives_torch_gradients(tmp_path):
    path = create_model(str(tmp_path / "m"), size="demo", arch="llama", mode="full", **SMALL)
    moments = {}
    for device in ["cpu", "mlx"]:
        options = EngineOptions(device=device, lora=LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")),
                                adapter_dir=str(tmp_path / device), optim=AdamWConfig(lr=1e-2))
        with StreamingEngine(BlockStore(path), options) as engine:
            loss = engine.train_step(_batches(engine.config.vocab_size)).loss
            moments[device] = (loss, {key: mats["lora_B"][0] / 0.1 for key, mats in engine.adapters.moments.items()})
    assert moments["mlx"][0] == pytest.approx(moments["cpu"][0], rel=TOLERANCE)
    worst = max(relative_error(moments["mlx"][1][key], grad) for key, grad in moments["cpu"][1].items())
    print(f"LoRA on mlx: lora_B gradient max_rel_err vs torch {worst:.2e}")
    assert worst <= TOLERANCE


def test_mlx_steps_are_deterministic_with_dropout(tmp_path):
    losses = []
    for run in range(2):
        path = create_model(str(tmp_path / f"m{run}"), size="demo", arch="bitnet", mode="qat", **SMALL)
        with StreamingEngine(BlockStore(path, writable=True), EngineOptions(device="mlx", dropout=0.1)) as engine:
            losses.append([engine.train_step(_batches(engine.config.vocab_size, seed)).loss for seed in range(3)])
            logits = engine.logits(_batches(engine.config.vocab_size)[0][0])
        if run == 0:
            first = logits
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0]
    assert torch.equal(first, logits)
