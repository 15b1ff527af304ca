"""Writing stores: from named fp32 tensors (any source) or from random initialization by size."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from offload_bitnet.model.block import init_block
from offload_bitnet.model.config import ModelConfig, config_for_size
from offload_bitnet.progress import Progress
from offload_bitnet.store.blockstore import BlockStore, StoreSettings
from offload_bitnet.store.layout import Layout
from offload_bitnet.store.units import block_unit, unit_names, unit_shapes


def default_mode(config: ModelConfig) -> str:
    """BitNet models train as ternary QAT, LLaMA models as full fine-tuning."""
    return "qat" if config.arch == "bitnet" else "full"


def write_store(path: str, config: ModelConfig, units: Iterable[tuple[str, dict[str, torch.Tensor]]],
                settings: StoreSettings | None = None, extra: dict | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> BlockStore:
    """Create a store at ``path`` from ``(unit, {name: tensor})`` pairs produced one unit at a time.

    ``units`` is consumed lazily, so a generator that reads its source tensor by tensor keeps memory at about
    one unit. Every unit of the config must appear once. Returns the store, committed at step 0 and open.
    """
    settings = settings or StoreSettings(mode=default_mode(config))
    store = BlockStore.create(path, config, settings, extra)
    layout = Layout(settings)
    expected = unit_names(config)
    seen = set()
    try:
        for index, (unit, tensors) in enumerate(units):
            if unit not in expected:
                raise ValueError(f"unexpected unit {unit!r}; a model with this config has {expected[0]}..{expected[-1]}")
            check_unit_shapes(config, unit, tensors)
            for part, part_tensors in layout.encode(unit, tensors).items():
                store.write(unit, part, part_tensors, 0)
            seen.add(unit)
            del tensors  # hold one unit at a time, not this one while the source produces the next
            if progress:
                progress(index + 1, len(expected), unit)
        missing = [u for u in expected if u not in seen]
        if missing:
            raise ValueError(f"the source has no tensors for units {missing[:5]}")
        store.commit(0)
    except BaseException:
        store.close()
        raise
    return store


def check_unit_shapes(config: ModelConfig, unit: str, tensors: dict[str, torch.Tensor]):
    """Raise ValueError naming the tensor when a unit's tensors do not match the config."""
    expected = unit_shapes(config, unit)
    if set(tensors) != set(expected):
        raise ValueError(f"unit {unit}: expected tensors {sorted(expected)}, got {sorted(tensors)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"unit {unit} tensor {name}: shape {tuple(tensors[name].shape)} does not match the "
                             f"config's {tuple(shape)}")


def random_units(config: ModelConfig, seed: int = 0, std: float = 0.02):
    """Random-initialized units, one at a time (normal(0, std) matrices, unit norms)."""
    generator = torch.Generator().manual_seed(seed)
    yield "embed", {"weight": torch.randn(config.vocab_size, config.dim, generator=generator) * std}
    for index in range(config.n_layers):
        yield block_unit(index), init_block(config, generator, std)
    yield "norm", {"weight": torch.ones(config.dim)}
    if not config.tie_embeddings:
        yield "head", {"weight": torch.randn(config.vocab_size, config.dim, generator=generator) * std}


def create_model(out_dir: str, size: str = "demo", arch: str = "bitnet", mode: str | None = None,
                 shadow_dtype: str = "fp16", state_dtype: str = "fp32", seed: int = 0,
                 progress: bool = False, packed_only: bool = False, **overrides) -> str:
    """Create a randomly initialized model store of a named size; returns its path.

    ``overrides`` replace config fields (e.g. ``n_layers=4``). ``mode`` defaults to ``qat`` for BitNet and
    ``full`` for LLaMA. ``packed_only``: a frozen ternary base (qat only) with the packed projections, norms,
    embedding and head and no shadow weights: the same packed weights as the qat store of the same seed, for
    LoRA and generation. Units are made and written one at a time, so memory stays about one block.
    """
    config = config_for_size(size, arch, **overrides)
    settings = StoreSettings(mode=mode or default_mode(config), shadow_dtype=shadow_dtype, state_dtype=state_dtype,
                             packed_only=packed_only)
    report = None
    if progress:
        bar = Progress(len(unit_names(config)), f"creating {size} {arch} model: units")
        report = lambda done, total, unit: bar.update(done, unit)  # noqa: E731
    store = write_store(out_dir, config, random_units(config, seed), settings,
                        extra={"created_from": f"random init, size {size}, seed {seed}"}, progress=report)
    store.close()
    return out_dir
