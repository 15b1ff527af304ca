"""One optimizer step through the streaming engine vs. the same step in memory (autograd + torch AdamW).

Used by ``test_backprop.py`` and the tests: it is the end-to-end check that streaming, RNG replay,
layer-major accumulation, chunked cross-entropy and the per-block AdamW reproduce plain training.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from offload_bitnet.store.write import create_model
from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine
from offload_bitnet.reference.inmemory import InMemoryModel
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.store.blockstore import BlockStore


@dataclass
class ParityResult:
    streamed_loss: float
    in_memory_loss: float
    max_rel_err: float
    worst_tensor: str
    tensors_compared: int


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (0 when both are zero)."""
    scale = expected.abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff / scale if scale > 0 else diff


def run_parity(mode: str = "qat", dropout: float = 0.1, micro_batches: int = 2, seed: int = 0,
               workdir: str | None = None, **overrides) -> ParityResult:
    """Build a small GQA model, take one step both ways from the same weights and data, compare."""
    shape = dict(size="demo", n_layers=4, n_heads=4, n_kv_heads=2, dim=64, hidden_dim=192, tie_embeddings=False)
    shape.update(overrides)
    arch = "bitnet" if mode == "qat" else "llama"
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        path = create_model(f"{root}/store", arch=arch, mode=mode, shadow_dtype="fp32", seed=seed, **shape)
        optim = AdamWConfig(lr=1e-3, weight_decay=0.1)
        generator = torch.Generator().manual_seed(seed + 1)
        store = BlockStore(path, writable=True)
        vocab = store.config.vocab_size
        batches = []
        for _ in range(micro_batches):
            ids = torch.randint(0, vocab, (2, 24), generator=generator)
            labels = ids.clone()
            labels[:, :3] = -100  # a masked prompt, as in instruction data
            batches.append((ids, labels))

        reference = InMemoryModel.from_store(store)
        optimizer = reference.optimizer(optim)
        loss = reference.step_loss(batches, dropout=dropout, seed=seed, step=1)
        loss.backward()
        optimizer.step()

        engine = StreamingEngine(store, EngineOptions(dropout=dropout, seed=seed, optim=optim,
                                                      activation_budget_bytes=8 << 10))
        stats = engine.train_step(batches)
        engine.close()

        updated = InMemoryModel.from_store(BlockStore(path)).named_unit_tensors()
        expected = reference.named_unit_tensors()
        worst, worst_name, count = abs(stats.loss - loss.item()) / abs(loss.item()), "loss", 0
        for unit, tensors in expected.items():
            for name, tensor in tensors.items():
                err = relative_error(updated[unit][name], tensor.detach())
                count += 1
                if err > worst:
                    worst, worst_name = err, f"{unit}.{name}"
        return ParityResult(stats.loss, loss.item(), worst, worst_name, count)
