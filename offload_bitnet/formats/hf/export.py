"""Writing a store as a Hugging Face folder: one exporter per output kind.

* ``export_hf``: full precision, ``LlamaForCausalLM`` for a Llama store; for a BitNet store ``BitNetForCausalLM``
  with its latent weights and an ``online`` ``autobitlinear`` quantization_config (transformers then quantizes
  on the fly, as this engine does; a packed-only store writes the latent weights of its codes,
  ``ternary.latent_weight``, which quantize back to them). A Llama store in ``qat`` mode exports its latent
  (shadow) weights as they are: the trained model is their ternary quantization, which ``LlamaForCausalLM``
  does not apply, so its outputs differ (a note says so).
* ``export_hf_bitnet``: ``BitNetForCausalLM`` with packed ternary projections in transformers' offline
  ``autobitlinear`` layout (uint8 ``[out/4, in]`` + ``weight_scale`` [1], ``W = codes * weight_scale``), the
  exact codes and scales the engine's forward uses. Needs an ``arch="bitnet"`` store.
* ``export_hf_source``: a store imported from Hugging Face written in its source format: the same
  architecture, ``config.json``, key names, dtypes and file/index layout (packed sources packed again, in
  their own convention).

Each takes ``dtype`` (the floating dtype; default: the source's, else the store's shadow dtype), ``shards``
(the number of safetensors files; default: the source's layout, else files of ``max_shard_bytes``) and
``progress``. Tensors are streamed unit by unit into pre-sized shard files (``shards.ShardWriter``); the
tokenizer files transformers loads are written along (``hf.tokenizer``), whatever the store was imported from.
"""
from __future__ import annotations

import json
import os

from offload_bitnet.formats.hf.config import CONFIG, HFFormatError, dtype_name, hf_config, parse_dtype
from offload_bitnet.formats.hf.shards import (DEFAULT_MAX_SHARD_BYTES, ShardWriter, TensorSpec, generic_specs,
                                              source_specs, spec_value, split_shards, unit_values, write_index)
from offload_bitnet.formats.hf.tokenizer import write_tokenizer_files
from offload_bitnet.notices import warn
from offload_bitnet.progress import Progress
from offload_bitnet.store.blockstore import DTYPES, BlockStore
from offload_bitnet.store.layout import Layout


def has_hf_source(store: BlockStore) -> bool:
    """Whether ``store`` was imported from a Hugging Face folder (and records its layout)."""
    return store.extra.get("source", {}).get("format") == "hf"


def export_hf(store: BlockStore, out_dir: str, dtype=None, shards: int | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> str:
    """Write ``store`` as a full-precision transformers folder (see the module docstring); returns ``out_dir``."""
    _note_latent_llama(store, progress)
    return _generic(store, out_dir, dtype, shards, max_shard_bytes, progress, packed=False)


def export_hf_bitnet(store: BlockStore, out_dir: str, dtype=None, shards: int | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> str:
    """Write an ``arch="bitnet"`` store as a packed ``BitNetForCausalLM`` folder; returns ``out_dir``."""
    if store.config.arch != "bitnet":
        raise HFFormatError(f"store {store.path} is a {store.config.arch} model; a packed BitNetForCausalLM export "
                            "needs an arch='bitnet' store (export it without bitnet=True for LlamaForCausalLM)")
    return _generic(store, out_dir, dtype, shards, max_shard_bytes, progress, packed=True)


def export_hf_source(store: BlockStore, out_dir: str, dtype=None, shards: int | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> str:
    """Write a store imported from Hugging Face in its source layout; returns ``out_dir``."""
    if not has_hf_source(store):
        raise HFFormatError(f"store {store.path} was not imported from a Hugging Face folder, so it has no source "
                            "layout to write back; export it with format='hf'")
    dtype = parse_dtype(dtype) if dtype is not None else None
    _note_latent_llama(store, progress)
    recorded = store.extra["source"]
    specs = source_specs(store, dtype)
    if shards is None:
        by_key = {spec.key: spec for spec in specs}
        files = {file: [by_key[k] for k in keys] for file, keys in recorded["shard_layout"].items()}
        index_metadata = recorded.get("index_metadata")
    else:
        files = split_shards(specs, shards, max_shard_bytes)
        index_metadata = {}
    config_json = dict(recorded["config"])
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config_json:
                config_json[key] = dtype_name(dtype)
    write_index_file = index_metadata is not None or len(files) > 1
    return _write_folder(store, out_dir, files, config_json, index_metadata, write_index_file, progress)


def export_from_store(store: BlockStore, out_dir: str, bitnet: bool = False, dtype=None, shards: int | None = None,
                      source: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = True) -> str:
    """Write a store as a Hugging Face folder: packed BitNet with ``bitnet=True``, else the source layout of a
    store imported from Hugging Face (unless ``source=False``), else full precision. Returns ``out_dir``."""
    options = dict(dtype=dtype, shards=shards, max_shard_bytes=max_shard_bytes, progress=progress)
    if bitnet:
        return export_hf_bitnet(store, out_dir, **options)
    if source and has_hf_source(store):
        return export_hf_source(store, out_dir, **options)
    return export_hf(store, out_dir, **options)


def _note_latent_llama(store: BlockStore, progress: bool):
    if store.config.arch == "llama" and store.settings.mode == "qat" and progress:
        warn("note: this qat store is exported with its latent (shadow) weights in full precision; "
             "LlamaForCausalLM does not apply the ternary quantization the store was trained with")


def _generic(store: BlockStore, out_dir: str, dtype, shards, max_shard_bytes, progress, packed: bool) -> str:
    """The transformers layout of any store: full precision, or (``packed``) offline autobitlinear."""
    config = store.config
    dtype = parse_dtype(dtype) if dtype is not None else DTYPES[store.settings.shadow_dtype]
    quantization = None
    if config.arch == "bitnet" and (packed or store.settings.mode == "qat"):
        quantization = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                        "quantization_mode": "offline" if packed else "online",
                        "modules_to_not_convert": ["lm_head"], "use_rms_norm": False, "rms_norm_eps": 1e-6}
    files = split_shards(generic_specs(config, dtype, packed=packed), shards, max_shard_bytes)
    return _write_folder(store, out_dir, files, hf_config(config, dtype, quantization), {}, len(files) > 1, progress)


def _write_folder(store: BlockStore, out_dir: str, files: dict[str, list[TensorSpec]], config_json: dict,
                  index_metadata: dict | None, write_index_file: bool, progress: bool) -> str:
    """Stream the store's units into the planned shard files, then the index, config.json and tokenizer."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise HFFormatError(f"{out_dir} exists and is not empty; export into a new or empty folder")
    os.makedirs(out_dir, exist_ok=True)
    by_unit: dict[str, list[TensorSpec]] = {}
    for specs_of_file in files.values():
        for spec in specs_of_file:
            by_unit.setdefault(spec.unit, []).append(spec)
    layout = Layout(store.settings)
    writer = ShardWriter(out_dir, files)
    bar = Progress(len(store.units), f"exporting to {out_dir}: units") if progress else None
    try:
        for done, unit in enumerate(store.units, 1):
            unit_specs = by_unit.get(unit, [])
            need_packed = any(spec.kind != "dense" for spec in unit_specs)
            masters, packed = unit_values(store, layout, unit, need_packed)
            for spec in unit_specs:
                writer.write(spec.key, spec_value(spec, masters, packed))
            del masters, packed
            if bar:
                bar.update(done, unit)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    if write_index_file:
        write_index(out_dir, files, index_metadata)
    with open(os.path.join(out_dir, CONFIG), "w") as handle:
        json.dump(config_json, handle, indent=2)
        handle.write("\n")
    write_tokenizer_files(store, out_dir, progress)
    return out_dir
