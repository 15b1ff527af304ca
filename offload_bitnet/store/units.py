"""Units and their names: ``embed``, ``block.NNN``, ``norm``, ``head``; the parts a unit is stored in; which
tensors are ternary projections. The one place that parses a unit's name."""
from __future__ import annotations

from offload_bitnet.model.config import ModelConfig

PARTS = ("weights", "shadow", "optim")
# How a store represents its projections (StoreSettings.mode): packed ternary with a 16-bit shadow, or 16-bit.
# (LoRA is a training mode on a frozen store of either kind, not a store mode.)
MODES = ("qat", "full")
BLOCK_PREFIX = "block."


def is_block(unit: str) -> bool:
    """Whether ``unit`` is a transformer block (``block.NNN``)."""
    return unit.startswith(BLOCK_PREFIX)


def block_index(unit: str) -> int:
    """The layer number of a block unit: ``block.007`` -> 7."""
    if not is_block(unit):
        raise ValueError(f"{unit!r} is not a block unit")
    return int(unit[len(BLOCK_PREFIX):])


def is_projection(unit: str, name: str) -> bool:
    """Whether tensor ``name`` of ``unit`` is one of a block's linear projections (``q_proj``, ...)."""
    return is_block(unit) and name.endswith("_proj")


def is_ternary(mode: str, unit: str, name: str) -> bool:
    """Whether a store of ``mode`` keeps this tensor as packed ternary codes: the projections of qat stores."""
    return mode == "qat" and is_projection(unit, name)


def block_unit(index: int) -> str:
    """The unit name of layer ``index``."""
    return f"block.{index:03d}"


def unit_shapes(config: ModelConfig, unit: str) -> dict[str, tuple[int, ...]]:
    """Shape of every (trainable, fp32 master) tensor of a unit."""
    if is_block(unit):
        return config.block_shapes
    if unit == "norm":
        return {"weight": (config.dim,)}
    return {"weight": (config.vocab_size, config.dim)}


def unit_names(config: ModelConfig) -> list[str]:
    """Every unit of a model in forward order."""
    names = ["embed"] + [block_unit(i) for i in range(config.n_layers)] + ["norm"]
    if not config.tie_embeddings:
        names.append("head")
    return names
