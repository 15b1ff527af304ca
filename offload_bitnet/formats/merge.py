"""Fold LoRA adapters into their base model: a new full-precision store with ``W + B A * alpha / r``.

The base store is streamed one unit at a time into a new store (``formats.importing.import_units``); the
adapters (small) stay in RAM.
"""
from __future__ import annotations

import os

import torch

from offload_bitnet.formats.importing import import_units
from offload_bitnet.model.lora import ADAPTER_CONFIG, ADAPTER_PROGRESS, AdapterSet
from offload_bitnet.notices import warn
from offload_bitnet.store.blockstore import DTYPES, BlockStore, StoreSettings
from offload_bitnet.store.layout import Layout
from offload_bitnet.store.units import block_index, is_block
from offload_bitnet.tokenizers.base import copy_store_tokenizer


def load_adapters(adapter_dir: str, config) -> AdapterSet:
    """The adapters of ``adapter_dir``: this tool's last checkpoint, else a plain PEFT adapter folder."""
    if os.path.isfile(os.path.join(adapter_dir, ADAPTER_PROGRESS)):
        return AdapterSet.load(adapter_dir, config)
    if os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG)):
        return AdapterSet.from_peft(adapter_dir, config)
    raise ValueError(f"{adapter_dir} holds no LoRA adapter (neither {ADAPTER_PROGRESS} nor {ADAPTER_CONFIG}); "
                     "pass the adapter_dir the LoRA training wrote to")


def merged_shadow_dtype(settings: StoreSettings) -> str:
    """The merged store's dtype: the base's for a full store; fp16 for a qat base, whose dequantized ternary
    weights (codes * scale) keep more precision in fp16's 10-bit mantissa than in bf16's 7 bits."""
    return "fp16" if settings.mode == "qat" else settings.shadow_dtype


def merged_extra(base: BlockStore, adapters: AdapterSet, adapter_dir: str) -> dict:
    """The base's ``extra`` plus a record of the merge.

    A recorded Hugging Face ``source`` stays when it describes dense unquantized weights (a Llama source), so
    ``export_from_store`` writes the merged model in the source's layout. A quantized BitNet source is kept as
    ``base_source`` instead: exporting in its layout would re-quantize (or re-pack) the merged weights.
    """
    extra = dict(base.extra)
    source = extra.get("source")
    if isinstance(source, dict) and (source.get("weights", "dense") != "dense"
                                     or "quantization_config" in (source.get("config") or {})):
        extra["base_source"] = extra.pop("source")
    extra["lora_merge"] = {
        "base_store": base.path, "base_mode": base.settings.mode, "base_step": base.step,
        "adapter_dir": os.path.abspath(adapter_dir), "adapter_step": adapters.step, "rank": adapters.lora.rank,
        "alpha": adapters.lora.alpha, "targets": list(adapters.lora.targets),
        "base_weights": "dequantized ternary (codes*scale)" if base.settings.mode == "qat" else "stored weights",
    }
    return extra


def merged_units(base: BlockStore, adapters: AdapterSet):
    """``(unit, {name: fp32 tensor})`` of the merged model, one unit at a time."""
    layout = Layout(base.settings)
    for unit in base.units:
        # forward_tensors: for a qat store the projections are codes * scale from the packed weights, exactly
        # what the engine's forward used under the adapters; every other tensor is its stored value in fp32.
        tensors = layout.forward_tensors(unit, base.read(unit, "weights"), torch.float32, "cpu")
        if is_block(unit):
            layer = block_index(unit)
            for name in adapters.lora.targets:
                tensors[name] = adapters.merged_weight(layer, name, tensors[name])
        yield unit, tensors
        del tensors


def merge_lora(store_path: str, adapter_dir: str, out_dir: str, progress: bool = True,
               shadow_dtype: str | None = None) -> str:
    """Write a new store at ``out_dir`` whose projections are ``W + B A * alpha / r``; returns its path.

    The merged store is in ``full`` mode with the dtype of ``merged_shadow_dtype`` unless ``shadow_dtype``
    says otherwise. Its config is the base's: a merged BitNet-arch model keeps its sub-norms and relu² MLP
    but no longer quantizes (full mode); a merged qat Llama is a plain Llama. ``extra`` (source, tokenizer)
    and the tokenizer folder are copied (see ``merged_extra``). Memory: one unit of the base plus the adapters.

    For a ternary (``qat``) base, W is the dequantized ternary weight (codes * scale from the packed weights),
    not the latent shadow: the adapters were trained on top of the ternary forward, so the correction B A
    they learned is relative to the ternary weights; adding it to the latent weights would add the
    quantization error (latent - ternary) on top. The merged full-precision model still differs from the
    adapter-trained one in one respect: its projections see unquantized activations, where the trained
    BitLinear path fed 8-bit absmax-quantized activations to W (the adapter path saw them unquantized). The
    difference is that of activation quantization, ``W (Q(x) - x)``; there is no exact full-precision merge
    of a quantized forward. Adapters trained during a quantization warmup (``quant_mix`` < 1) saw a mix of
    latent and ternary weights; the merge still uses the ternary ones.
    """
    base = BlockStore(store_path, writable=False)
    try:
        adapters = load_adapters(adapter_dir, base.config)
        dtype = shadow_dtype or merged_shadow_dtype(base.settings)
        if dtype not in DTYPES:
            raise ValueError(f"shadow_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        settings = StoreSettings(mode="full", shadow_dtype=dtype, state_dtype=base.settings.state_dtype)
        if progress and base.settings.mode == "qat":
            warn("note: the merged store is full precision: its projections no longer quantize their "
                 "activations, so its outputs differ slightly from the quantized model with adapters")
        def add_tokenizer(staging: str):
            copy_store_tokenizer(base.path, base.extra, staging)

        import_units(out_dir, base.config, merged_units(base, adapters), settings,
                     merged_extra(base, adapters, adapter_dir), f"merging {adapter_dir} into {out_dir}: units",
                     add_tokenizer, progress)
    finally:
        base.close()
    return os.path.abspath(out_dir)
