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


@pytest.mark.parametrize("arch", ["bitnet", "llama"])
@pytest.mark.parametrize("micro", [1, 2])
def test_projections_made_one_at_a_time_on_mlx_change_nothing(tmp_path, arch, micro, monkeypatch):
    """Blocks above ``dense_block_bytes`` reach MLX as ``LazyProjection``s: each weight is made for its matmul
    (the forward pass, the replay and the backward product: three times per micro-batch) and goes after it.
    The stores and losses must come out bit-identical to whole blocks made dense, with the warm-up mix too."""
    from offload_bitnet.backends.mlx.model import LazyProjection
    from test_engine import _store_tensors

    made = []
    lazy_make = LazyProjection.__init__

    def counting_init(self, make, on_grad=None):
        lazy_make(self, lambda: made.append(1) or make(), on_grad)

    monkeypatch.setattr(LazyProjection, "__init__", counting_init)
    results = {}
    for name, dense_bytes in (("dense", 1 << 40), ("lazy", 0)):
        path = create_model(str(tmp_path / name), size="demo", arch=arch, n_layers=3)
        made.clear()
        with StreamingEngine(BlockStore(path, writable=True),
                             EngineOptions(device="mlx", optim=AdamWConfig(lr=1e-3), dropout=0.1,
                                           dense_block_bytes=dense_bytes)) as engine:
            generator = torch.Generator().manual_seed(3)
            losses = [engine.train_step([(torch.randint(0, 256, (1, 16), generator=generator), None)
                                         for _ in range(micro)], quant_mix=mix).loss for mix in (0.5, 1.0)]
        results[name] = losses, _store_tensors(path), len(made)
    assert results["dense"][2] == 0
    assert results["lazy"][2] == 2 * 3 * micro * 3 * 7  # steps x layers x micro-batches x (fwd, replay, bwd) x 7
    assert results["lazy"][0] == results["dense"][0]
    for key, tensors in results["dense"][1].items():
        for tensor_name, tensor in tensors.items():
            assert torch.equal(tensor, results["lazy"][1][key][tensor_name]), (key, tensor_name)


def test_generation_with_projections_made_one_at_a_time_on_mlx_gives_the_dense_tokens(tmp_path):
    from offload_bitnet.generate import Generator, SamplingOptions

    path = create_model(str(tmp_path / "m"), size="demo", arch="bitnet", n_layers=2)
    options = SamplingOptions(max_new_tokens=5, temperature=0.0)
    tokens = []
    for dense_bytes in (1 << 40, 0):
        generator = Generator(path, "mlx", dense_block_bytes=dense_bytes)
        assert generator.lazy_blocks == (dense_bytes == 0)
        tokens.append(generator.generate([[5, 9, 17], [3, 8]], options, stop_ids=[]).tokens)
        generator.close()
    assert tokens[0] == tokens[1]


def test_lora_on_a_base_made_one_projection_at_a_time_on_mlx_changes_nothing(tmp_path):
    """The frozen base of a LoRA run (70B on a Mac) as LazyProjections: the same losses, step after step (the
    second and third depend on the adapters' updates), as with the base made dense."""
    losses = {}
    for name, dense_bytes in (("dense", 1 << 40), ("lazy", 0)):
        path = create_model(str(tmp_path / name), size="demo", arch="bitnet", mode="qat", n_layers=2)
        options = EngineOptions(device="mlx", lora=LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")),
                                adapter_dir=str(tmp_path / f"{name}-adapter"), optim=AdamWConfig(lr=1e-2),
                                dense_block_bytes=dense_bytes, dropout=0.1)
        with StreamingEngine(BlockStore(path), options) as engine:
            losses[name] = [engine.train_step(_batches(engine.config.vocab_size)).loss for _ in range(3)]
    assert losses["lazy"] == losses["dense"]
    assert losses["dense"][2] < losses["dense"][0]  # the adapters learn the repeated batch


def test_an_mlx_runs_sample_generations_run_on_mlx(tmp_path, monkeypatch):
    """The trainer's samples open a Generator on the backend's own device (they ran on torch before)."""
    from offload_bitnet.tokenizers.base import ByteTokenizer
    from offload_bitnet.train import samples

    devices, real_generator = [], samples.Generator
    monkeypatch.setattr(samples, "Generator", lambda store, device, **kw: devices.append(device) or
                        real_generator(store, device, **kw))
    path = create_model(str(tmp_path / "m"), size="demo", arch="bitnet", n_layers=2)
    with StreamingEngine(BlockStore(path, writable=True), EngineOptions(device="mlx")) as engine:
        texts = samples.generate_samples(engine, ByteTokenizer(), ["Hello"], max_new_tokens=3, seed=0,
                                         memory_budget=1 << 30)
    assert devices == ["mlx"] and len(texts) == 1
