"""Importing a Hugging Face folder into a new store (through ``formats.importing``)."""
from __future__ import annotations

import os

import torch

from offload_bitnet.formats.hf.checkpoint import Checkpoint, plan_import, read_units
from offload_bitnet.formats.hf.config import (CONFIG, bitnet_quantization, config_from_hf, dtype_name, hf_architecture,
                                              read_config, read_config_json)
from offload_bitnet.formats.hf.tokenizer import (check_tokenizer_fits, copy_tokenizer, describe_tokenizer,
                                                 tokenizer_files)
from offload_bitnet.formats.importing import check_target, import_units
from offload_bitnet.notices import warn
from offload_bitnet.store.blockstore import StoreSettings
from offload_bitnet.store.write import default_mode
from offload_bitnet.tokenizers.runtime import load_tokenizer

SHADOW_FOR_DTYPE = {torch.float32: "fp32", torch.float64: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def read_source(folder: str):
    """``(ModelConfig, tokenizer or None)``: what an import of ``folder`` would give its store, from
    ``config.json`` and the tokenizer files in the folder (no weights are read)."""
    description = describe_tokenizer(folder)
    tokenizer = load_tokenizer(folder, {**description, "dir": "."}) if description else None
    return read_config(folder), tokenizer



def import_to_store(src: str, out_dir: str, settings: StoreSettings | None = None, progress: bool = True) -> str:
    """Import a Hugging Face folder into a new store at ``out_dir``; returns the store path.

    Everything is validated (config, tensor names, shapes, dtypes, readable files) before the store is
    created. Default settings: mode ``qat`` for BitNet and ``full`` for Llama (``create.default_mode``) with
    the source's floating dtype as shadow dtype, so the import is lossless. A packed BitNet source (no master
    weights) becomes a packed-only store holding its codes and scales exactly; with explicit qat settings it
    gets latent shadow weights reconstructed from them (``latent_from_packed``; use an fp32 shadow so that
    they reproduce each scale to fp32 rounding).
    """
    check_target(out_dir)
    config_json = read_config_json(src)
    config = config_from_hf(config_json, os.path.join(src, CONFIG))
    quant = bitnet_quantization(config_json) if config.arch == "bitnet" else None
    check_tokenizer_fits(src, config)
    checkpoint = Checkpoint(src)
    try:
        return _import_checkpoint(src, out_dir, settings, progress, checkpoint, config, config_json, quant)
    finally:
        checkpoint.close()


def _import_checkpoint(src, out_dir, settings, progress, checkpoint, config, config_json, quant) -> str:
    architecture = hf_architecture(config_json)
    plan = plan_import(checkpoint, config, quant)
    packed_source = quant is not None and quant["weights"] == "packed"
    if settings is None:
        # A packed checkpoint has no master weights: by default it becomes a packed-only store (its codes and
        # scales as they are, embeddings in the source's dtype).
        settings = StoreSettings(mode=default_mode(config), shadow_dtype=SHADOW_FOR_DTYPE[plan.main_dtype],
                                 packed_only=packed_source)
    notes = []
    if "sliding_window" in config.extra:
        notes.append(f"sliding_window={config.extra['sliding_window']} is not applied: attention is fully causal "
                     "(identical for sequences up to the window)")
    if plan.skipped:
        notes.append(f"dropped {len(plan.skipped)} non-parameter buffers ({plan.skipped[0]}, ...)")
    source = {
        "format": "hf",
        "path": os.path.abspath(src),  # the folder peft loads as the base of this store's adapters
        "architecture": architecture,
        "dtype": dtype_name(plan.main_dtype),
        "dtype_overrides": plan.dtype_overrides,
        "weights": quant["weights"] if quant else "dense",
        "packed_convention": quant["convention"] if quant and quant["weights"] == "packed" else None,
        "shard_layout": plan.layout,
        "index_metadata": checkpoint.index_metadata,
        "config": config_json,
        "skipped": plan.skipped,
        "notes": notes,
    }
    extra = {"source": source}
    tokenizer = describe_tokenizer(src)
    if tokenizer:
        extra["tokenizer"] = tokenizer
    if progress:
        for note in notes:
            warn(f"note: {note}")
    files = tokenizer_files(src)

    def add_tokenizer(folder: str):
        if files:  # generation_config.json travels along even without a tokenizer
            copy_tokenizer(src, os.path.join(folder, "tokenizer"), files)

    units = read_units(checkpoint, config, quant, packed_only=settings.packed_only)
    return import_units(out_dir, config, units, settings, extra,
                        f"importing {os.path.basename(os.path.abspath(src))}: units", add_tokenizer, progress)
