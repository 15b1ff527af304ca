"""Shared tiny cases of the MLX backend tests: configs, random block and model tensors, error measures."""
import numpy as np
import torch

from offload_bitnet.model import block as tm
from offload_bitnet.backends.mlx.arrays import to_numpy
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.store.units import block_unit

TOLERANCE = 1e-5
SEQ, BATCH = 12, 2


def config_of(arch: str, tie: bool = False, n_layers: int = 2, **overrides) -> ModelConfig:
    values = dict(arch=arch, vocab_size=101, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=96,
                  tie_embeddings=tie)
    values.update(overrides)
    return ModelConfig(**values)


def rel_err(mlx_value, torch_value: torch.Tensor) -> float:
    got = torch.from_numpy(np.array(to_numpy(mlx_value))).double()
    want = torch_value.detach().double()
    assert got.shape == want.shape
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def check(what: str, mlx_value, torch_value, tolerance: float = TOLERANCE) -> float:
    err = rel_err(mlx_value, torch_value)
    print(f"{what}: max_rel_err {err:.2e}")
    assert err <= tolerance, f"{what}: max relative error {err:.3e} > {tolerance}"
    return err


def block_params(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 block params with norms away from 1 (so their gradients and effects are visible)."""
    generator = torch.Generator().manual_seed(seed)
    params = tm.init_block(config, generator, std=0.08)
    return {n: t + 0.2 * torch.randn(t.shape, generator=generator) if t.dim() == 1 else t for n, t in params.items()}


def lora_mats(config: ModelConfig, targets, rank: int = 4, seed: int = 1) -> dict[str, tuple]:
    """Nonzero A and B (B is zero at a real init; here its gradient path must be exercised)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = config.projection_shapes
    return {name: (torch.randn(rank, shapes[name][1], generator=generator) * 0.1,
                   torch.randn(shapes[name][0], rank, generator=generator) * 0.1) for name in targets}


def inputs(config: ModelConfig, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, SEQ, config.dim, generator=generator)
    grad_out = torch.randn(BATCH, SEQ, config.dim, generator=generator)
    return x, grad_out


def model_units(config: ModelConfig, seed: int = 9) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    units = {"embed": {"weight": torch.randn(config.vocab_size, config.dim, generator=generator) * 0.1}}
    for layer in range(config.n_layers):
        units[block_unit(layer)] = block_params(config, seed=seed + layer + 1)
    units["norm"] = {"weight": 1 + 0.2 * torch.randn(config.dim, generator=generator)}
    if not config.tie_embeddings:
        units["head"] = {"weight": torch.randn(config.vocab_size, config.dim, generator=generator) * 0.1}
    return units


def micro_batches(config: ModelConfig, count: int = 2, seed: int = 10):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=generator)
        labels = ids.clone()
        labels[0, :4] = -100
        batches.append((ids, labels))
    return batches
