"""8-bit blockwise storage of AdamW moments (``state_dtype="int8"``): 2 bytes per parameter instead of 8.

Both moments span many orders of magnitude within a block, so both are coded on a log scale, per block of
``BLOCK`` values, between the block's smallest and largest magnitude (code 0 is exactly zero):
* first moment (signed): int8, the sign and 127 log levels;
* second moment (non-negative): uint8, 255 log levels.
The error is a few percent of each value, and no small value is rounded to zero (which, for the second moment,
would make Adam's step m / (sqrt(v) + eps) explode).
"""
from __future__ import annotations

import math

import torch

BLOCK = 256
LOG_LEVELS = 254  # codes 1..255


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().float().reshape(-1)
    pad = -flat.numel() % BLOCK
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    return flat.reshape(-1, BLOCK)


def _unblock(blocks: torch.Tensor, shape) -> torch.Tensor:
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def encode_signed(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 codes [n_blocks, BLOCK]: the sign, and |x| on the block's log scale (``encode_log``) in 1..127."""
    blocks = _blocks(x)
    magnitude = _log_codes(blocks.abs(), levels=126)
    codes = torch.where(blocks < 0, -magnitude["q"], magnitude["q"]).to(torch.int8)
    return {"q": codes, "log2_range": magnitude["log2_range"]}


def decode_signed(part: dict[str, torch.Tensor], shape) -> torch.Tensor:
    codes = part["q"].float()
    magnitude = _log_values(codes.abs(), part["log2_range"], levels=126)
    return _unblock(torch.where(codes < 0, -magnitude, magnitude), shape)


def encode_log(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 codes [n_blocks, BLOCK] and per-block (min, max) of log2 of the positive values [n_blocks, 2]."""
    part = _log_codes(_blocks(v).clamp(min=0), levels=LOG_LEVELS)
    return {"q": part["q"].to(torch.uint8), "log2_range": part["log2_range"]}


def decode_log(part: dict[str, torch.Tensor], shape) -> torch.Tensor:
    return _unblock(_log_values(part["q"].float(), part["log2_range"], levels=LOG_LEVELS), shape)


def _log_codes(blocks: torch.Tensor, levels: int) -> dict[str, torch.Tensor]:
    """Codes 1..levels+1 for positive values, spread evenly in log2 over each block's range; 0 for zero."""
    positive = blocks > 0
    logs = torch.where(positive, blocks.clamp(min=torch.finfo(torch.float32).tiny).log2(), torch.zeros_like(blocks))
    low = torch.where(positive, logs, torch.full_like(logs, math.inf)).amin(dim=1)
    high = torch.where(positive, logs, torch.full_like(logs, -math.inf)).amax(dim=1)
    empty = ~positive.any(dim=1)
    low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    codes = 1 + ((logs - low[:, None]) / span[:, None] * levels).round().clamp(0, levels)
    return {"q": torch.where(positive, codes, torch.zeros_like(codes)).to(torch.int16),
            "log2_range": torch.stack((low, high), dim=1)}


def _log_values(codes: torch.Tensor, log2_range: torch.Tensor, levels: int) -> torch.Tensor:
    low, high = log2_range[:, 0:1], log2_range[:, 1:2]
    values = torch.exp2(low + (codes - 1) / levels * (high - low))
    return torch.where(codes > 0, values, torch.zeros_like(values))
