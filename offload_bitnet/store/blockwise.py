"""8-bit blockwise storage of AdamW moments (``state_dtype="int8"``): 2 bytes per parameter instead of 8.

Both moments span many orders of magnitude within a block, so both are coded on a log scale, per block of
``BLOCK`` values, between the block's smallest and largest magnitude (code 0 is exactly zero):
* first moment (signed): int8, the sign and 127 log levels;
* second moment (non-negative): uint8, 255 log levels.
The error is a few percent of each value, and no small value is rounded to zero (which, for the second moment,
would make Adam's step m / (sqrt(v) + eps) explode).
"""
from __future__ import annotations

import torch

BLOCK = 256
LOG_LEVELS = 254  # codes 1..255
# Blocks coded or decoded at a time: the temporaries of the log-scale arithmetic (about ten fp32 copies of
# what is in work) then stay a few MiB, instead of ten copies of a whole projection (a 70B projection is
# 235M values: 9 GiB of temporaries). Blocks are independent, so the result does not depend on the chunking.
CHUNK_BLOCKS = 4096
_FLOAT_TINY = torch.finfo(torch.float32).tiny
_FLOAT_MAX = torch.finfo(torch.float32).max


def _chunks(numel: int):
    """``(first value, value count)`` of each run of at most CHUNK_BLOCKS blocks covering ``numel`` values."""
    step = CHUNK_BLOCKS * BLOCK
    for start in range(0, numel, step):
        yield start, min(step, numel - start)


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """A run of values as fp32 blocks ``[n, BLOCK]``, zero-padded to whole blocks."""
    flat = flat.float()
    pad = -flat.numel() % BLOCK
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    return flat.reshape(-1, BLOCK)


def _encode(x: torch.Tensor, code, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``code(blocks) -> (codes, log2_range)`` run chunk by chunk into ``q`` [n_blocks, BLOCK] and ``log2_range``."""
    flat = x.detach().reshape(-1)
    n_blocks = -(-flat.numel() // BLOCK)
    q = torch.empty(n_blocks, BLOCK, dtype=dtype, device=x.device)
    log2_range = torch.empty(n_blocks, 2, dtype=torch.float32, device=x.device)
    for start, count in _chunks(flat.numel()):
        rows = slice(start // BLOCK, start // BLOCK + -(-count // BLOCK))
        q[rows], log2_range[rows] = code(_blocks(flat[start:start + count]))
    return {"q": q, "log2_range": log2_range}


def _decode(part: dict[str, torch.Tensor], shape, value, out: torch.Tensor | None) -> torch.Tensor:
    """``value(codes, log2_range) -> fp32 blocks`` run chunk by chunk into ``out`` (fp32, ``shape``)."""
    q, log2_range = part["q"], part["log2_range"]
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    flat = out.view(-1)
    for start, count in _chunks(flat.numel()):
        rows = slice(start // BLOCK, start // BLOCK + -(-count // BLOCK))
        flat[start:start + count] = value(q[rows].float(), log2_range[rows]).reshape(-1)[:count]
    return out


def _signed_codes(blocks: torch.Tensor):
    codes, log2_range = _log_codes(blocks.abs(), levels=126)
    return codes.copysign_(blocks).to(torch.int8), log2_range


def _signed_values(codes: torch.Tensor, log2_range: torch.Tensor) -> torch.Tensor:
    return _log_values(codes.abs(), log2_range, levels=126).copysign_(codes)


def encode_signed(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 codes [n_blocks, BLOCK]: the sign, and |x| on the block's log scale (``encode_log``) in 1..127."""
    return _encode(x, _signed_codes, torch.int8)


def decode_signed(part: dict[str, torch.Tensor], shape, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values of ``encode_signed`` codes (into ``out`` when given)."""
    return _decode(part, shape, _signed_values, out)


def _log_codes_of(blocks: torch.Tensor):
    codes, log2_range = _log_codes(blocks.clamp(min=0), levels=LOG_LEVELS)
    return codes.to(torch.uint8), log2_range


def encode_log(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 codes [n_blocks, BLOCK] and per-block (min, max) of log2 of the positive values [n_blocks, 2]."""
    return _encode(v, _log_codes_of, torch.uint8)


def decode_log(part: dict[str, torch.Tensor], shape, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values of ``encode_log`` codes (into ``out`` when given)."""
    return _decode(part, shape, lambda codes, log2_range: _log_values(codes, log2_range, levels=LOG_LEVELS), out)


def _log_codes(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 codes 1..levels+1 for the positive values of ``blocks`` (non-negative), spread evenly in log2 over
    each block's range, 0 for zero; and the ranges [n_blocks, 2].

    The writer codes every moment of every step (at 13B, 26G values a step), so each pass over the values
    counts: the block's extremes are taken before the logarithm (log2 is monotone, so the extremes' logarithms
    are the logarithms' extremes, bit for bit), the arithmetic runs in place, and the masks are multiplied in
    (``torch.where`` with a mask is several times slower here). The codes are those of the plain formula."""
    positive = blocks > 0
    high = blocks.amax(dim=1)
    low = blocks.add(~positive, alpha=_FLOAT_MAX).amin(dim=1)   # zeros become larger than any value: x + 0 is x
    empty = high <= 0
    low, high = (value.clamp_(min=_FLOAT_TINY).log2_().masked_fill_(empty, 0.0) for value in (low, high))
    span = torch.where(high > low, high - low, torch.ones_like(high))
    codes = blocks.clamp(min=_FLOAT_TINY).log2_()
    codes.sub_(low[:, None]).div_(span[:, None]).mul_(levels).round_().clamp_(0, levels).add_(1).mul_(positive)
    return codes, torch.stack((low, high), dim=1)


def _log_values(codes: torch.Tensor, log2_range: torch.Tensor, levels: int) -> torch.Tensor:
    """fp32 values of fp32 ``codes`` (overwritten) on the blocks' log2 ranges; 0 for code 0."""
    low, high = log2_range[:, 0:1], log2_range[:, 1:2]
    coded = codes > 0
    return codes.sub_(1).div_(levels).mul_(high - low).add_(low).exp2_().mul_(coded)
