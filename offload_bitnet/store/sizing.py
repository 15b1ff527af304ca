"""How many bytes a store takes on disk, and how many one optimizer step reads and writes, from a config alone.

The per-file sizes are exact: they mirror what ``Layout.encode`` / ``Layout.encode_moments`` put in each part and
how ``store.encode_safetensors`` lays a file out (8-byte header length, JSON header padded with spaces to a
multiple of 8, tensors in name order). The manifest's size is an upper bound (checksums are counted at
their widest). ``tests/store/test_sizing.py`` checks both against real stores and against the engine's byte counters.
"""
from __future__ import annotations

import json
import math
import os

import torch

from offload_bitnet.io.safetensors import SAFETENSORS_DTYPES as SAFETENSOR_CODES
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.store.blockstore import StoreSettings
from offload_bitnet.store.blockwise import BLOCK
from offload_bitnet.store.units import PARTS, block_unit, is_block, is_ternary, unit_names, unit_shapes

# The tensors a store holds, by short name: their safetensors codes (the codec's one table) and element sizes.
STORE_TENSOR_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "u8": torch.uint8,
                       "i8": torch.int8}
SAFETENSORS_DTYPES = {name: (SAFETENSOR_CODES[dtype], dtype.itemsize) for name, dtype in STORE_TENSOR_DTYPES.items()}

TensorSpecs = dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype key of SAFETENSORS_DTYPES, shape)


def safetensors_bytes(specs: TensorSpecs) -> int:
    """Exact size of the file ``store.encode_safetensors`` writes for tensors of these dtypes and shapes:
    8-byte header length, compact JSON header (widest dtype first, then name order) padded with spaces to a
    multiple of 8, then the data."""
    header, offset = {}, 0
    for name in sorted(specs, key=lambda n: (-SAFETENSORS_DTYPES[specs[n][0]][1], n)):
        dtype, shape = specs[name]
        code, size = SAFETENSORS_DTYPES[dtype]
        nbytes = size
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text) % 8) + offset


def part_specs(config: ModelConfig, unit: str, part: str, settings: StoreSettings) -> TensorSpecs:
    """The tensors one part of one unit holds (empty: the part does not exist), as ``Layout`` encodes them."""
    masters = unit_shapes(config, unit)
    if part == "optim":
        if settings.packed_only:  # a frozen base: nothing is ever updated
            return {}
        if settings.state_dtype == "int8":  # blockwise.py: codes per block of BLOCK values plus block scales
            specs = {}
            for name, shape in masters.items():
                blocks = -(-math.prod(shape) // BLOCK)
                specs[f"{name}.exp_avg.q"] = ("i8", (blocks, BLOCK))
                specs[f"{name}.exp_avg.log2_range"] = ("fp32", (blocks, 2))
                specs[f"{name}.exp_avg_sq.q"] = ("u8", (blocks, BLOCK))
                specs[f"{name}.exp_avg_sq.log2_range"] = ("fp32", (blocks, 2))
            return specs
        return {f"{name}.{moment}": (settings.state_dtype, shape)
                for name, shape in masters.items() for moment in ("exp_avg", "exp_avg_sq")}
    specs = {}
    for name, shape in masters.items():
        stored = settings.shadow_dtype if len(shape) >= 2 else "fp32"  # norms stay fp32
        ternary = is_ternary(settings.mode, unit, name)
        if part == "weights":
            if ternary:
                specs[f"{name}.packed"] = ("u8", (shape[0] // 4, *shape[1:]))
                specs[f"{name}.scale"] = ("fp32", (1,))
            else:
                specs[name] = (stored, shape)
        elif part == "shadow" and ternary and not settings.packed_only:
            specs[name] = (stored, shape)
    return specs


def part_bytes(config: ModelConfig, unit: str, part: str, settings: StoreSettings) -> int:
    """Bytes of one part file of one unit (0 when the part does not exist)."""
    specs = part_specs(config, unit, part, settings)
    return safetensors_bytes(specs) if specs else 0


def _units_bytes(config: ModelConfig, settings: StoreSettings) -> dict[str, dict[str, int]]:
    """unit -> part -> bytes. All blocks have identical files, so one is computed and reused."""
    block = {part: part_bytes(config, block_unit(0), part, settings) for part in PARTS}
    return {unit: block if is_block(unit) else
            {part: part_bytes(config, unit, part, settings) for part in PARTS} for unit in unit_names(config)}


def manifest_bytes_bound(config: ModelConfig, settings: StoreSettings, extra: dict | None = None,
                         with_optim: bool = True) -> int:
    """An upper bound on ``manifest.json``: the real structure with every checksum at its widest (10 digits)."""
    sizes = _units_bytes(config, settings)
    files = {}
    for unit in unit_names(config):
        parts = [p for p in PARTS if sizes[unit][p] and (with_optim or p != "optim")]
        files[unit] = {p: {"file": f"{unit}.{p}.s00000000.safetensors", "bytes": sizes[unit][p], "crc32c": 4294967295}
                       for p in parts}
    version, settings_record = settings.manifest_record()
    manifest = {"format_version": version, "config": config.to_dict(), "settings": settings_record,
                "step": 99999999, "files": files, "extra": extra or {}}
    return len(json.dumps(manifest, indent=1).encode())


def store_bytes(config: ModelConfig, mode: str = "qat", shadow_dtype: str = "fp16", state_dtype: str = "fp32",
                extra: dict | None = None, packed_only: bool = False) -> dict[str, int]:
    """Disk bytes of a store of ``config`` once every unit has optimizer moments (after the first step).

    Keys: ``params``; ``packed`` (ternary codes and their scales, within ``weights``); ``weights`` (what
    forward reads), ``shadow``, ``optim`` (exact file bytes per part kind); ``headers`` (the safetensors
    header bytes inside those three); ``manifest`` (upper bound); ``units`` (weights+shadow+optim, exact);
    ``total`` (units + manifest). A fresh store has no ``optim`` files: subtract ``optim`` for it.
    ``packed_only``: a packed-only store (no shadow, and never any moments: ``total`` counts none).
    """
    settings = StoreSettings(mode=mode, shadow_dtype=shadow_dtype, state_dtype=state_dtype, packed_only=packed_only)
    settings.validate()
    sizes = _units_bytes(config, settings)
    totals = {part: sum(sizes[unit][part] for unit in sizes) for part in PARTS}
    packed = headers = 0
    for unit in unit_names(config):
        for part in PARTS:
            specs = part_specs(config, unit, part, settings)
            headers += sizes[unit][part] - _data_bytes(specs)
            if part == "weights":
                packed += _data_bytes({n: spec for n, spec in specs.items() if n.endswith((".packed", ".scale"))})
    manifest = manifest_bytes_bound(config, settings, extra)
    units = sum(totals.values())
    return {"params": config.param_count(), "packed": packed, **totals, "headers": headers,
            "manifest": manifest, "units": units, "total": units + manifest}


def _data_bytes(specs: TensorSpecs) -> int:
    """Tensor bytes of a part, without the header."""
    total = 0
    for dtype, shape in specs.values():
        count = SAFETENSORS_DTYPES[dtype][1]
        for dim in shape:
            count *= dim
        total += count
    return total


def step_io(config: ModelConfig, mode: str = "qat", shadow_dtype: str = "fp16", state_dtype: str = "fp32",
            first_step: bool = False) -> dict[str, int]:
    """Bytes one ``StreamingEngine.train_step`` reads and writes (any number of micro-batches).

    Forward reads the ``weights`` part of the embedding and every block. Backward reads, for the final norm,
    the head (when untied), every block and the embedding: ``weights``, ``shadow`` (ternary blocks) and
    ``optim`` (absent before the first step, ``first_step=True``), and writes all three parts of every unit.
    ``eval_read`` is what one ``logits``/``loss`` call reads.
    """
    settings = StoreSettings(mode=mode, shadow_dtype=shadow_dtype, state_dtype=state_dtype)
    settings.validate()
    sizes = _units_bytes(config, settings)
    blocks = [block_unit(i) for i in range(config.n_layers)]
    forward_read = sum(sizes[u]["weights"] for u in ["embed"] + blocks)
    read_parts = ("weights", "shadow") if first_step else PARTS
    backward_read = sum(sizes[u][p] for u in sizes for p in read_parts)
    backward_written = sum(sizes[u][p] for u in sizes for p in PARTS)
    head = "embed" if config.tie_embeddings else "head"
    eval_read = sum(sizes[u]["weights"] for u in ["embed"] + blocks + ["norm", head])  # tied: embed twice
    return {"forward_read": forward_read, "backward_read": backward_read, "backward_written": backward_written,
            "read": forward_read + backward_read, "written": backward_written, "eval_read": eval_read}


def plan(config: ModelConfig, shadow_dtype: str = "fp16", state_dtype: str = "fp32",
         first_step: bool = False) -> dict[str, dict[str, int]]:
    """``step_io`` for each training mode (``qat`` and ``full``)."""
    return {mode: step_io(config, mode, shadow_dtype, state_dtype, first_step) for mode in ("qat", "full")}


def folder_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (or of the file ``path``); files that vanish meanwhile count 0."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def human(n: float) -> str:
    """Bytes as a short binary-prefixed string (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
