"""Model formats at the edge: import into a block store, export out of one.

Each format module (``hf``, ``meta``, ``gguf``) provides:

* ``detect(path) -> bool``: whether ``path`` holds a model in that format;
* ``import_to_store(src, out_dir, settings: StoreSettings | None, progress: bool) -> str``: stream the model
  into a new store (one unit in memory at a time), record ``manifest["extra"]["source"]`` (what export needs
  to write the source format back) and ``manifest["extra"]["tokenizer"]`` (tokenizer files go in
  ``STORE/tokenizer/``); returns the store path;
* exporters ``(store: BlockStore, out_dir, **options) -> str``, one per output kind, listed in ``EXPORTERS``
  (GGUF's, for any store, is in ``gguf_export``);
* ``read_config(path) -> ModelConfig`` and ``read_source(path) -> (ModelConfig, tokenizer or None)``: the
  shapes and tokenizer an import would give, from the source's metadata only (the dry-run plan).

Every import (and ``merge``) makes its store through ``formats.importing`` (staging folder, cleanup, progress,
atomic rename). The format modules are loaded when first needed (``importlib``): loading them all would add
the ``gguf`` package, safetensors and tokenizers to the start-up of every command.
"""
from __future__ import annotations

import importlib
import json
import os

from offload_bitnet.formats.cache import cached_store_dir, ensure_cached_import
from offload_bitnet.formats.importing import is_complete_store, is_store  # noqa: F401 - part of the API
from offload_bitnet.store.blockstore import BlockStore, StoreSettings

FORMATS = ("hf", "meta", "gguf")
# What export_model writes, and the exporter of each: (module, function). ``gguf``: a llama.cpp GGUF of any store
# (``--gguf-type``). ``source``: the format the store was imported from. The one list of export formats: the
# CLI's ``export --format``, finetune's ``--export-format`` and the README's table follow it.
EXPORTERS = {"hf": ("hf", "export_hf"), "hf-bitnet": ("hf", "export_hf_bitnet"), "meta": ("meta", "export_from_store"),
             "gguf": ("gguf_export", "export_from_store")}
EXPORT_FORMATS = ("source",) + tuple(EXPORTERS)
# GGUF tensor types (``--gguf-type``); see ``gguf_export``.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "tq2_0", "tq1_0")


def detect_format(path: str) -> str:
    """``store``, ``hf``, ``meta`` or ``gguf``; raises ValueError saying what was found otherwise."""
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist; give a model folder, a .gguf file or a store")
    if os.path.isdir(path) and is_store(path):
        return "store"
    for name in FORMATS:
        module = importlib.import_module(f".{name}", __name__)
        if module.detect(path):
            return name
    hint = _run_or_adapter_hint(path) if os.path.isdir(path) else None
    if hint:
        raise ValueError(hint)
    listing = ", ".join(sorted(os.listdir(path))[:8]) if os.path.isdir(path) else os.path.basename(path)
    raise ValueError(f"{path} is not a model this tool reads (found: {listing}). Expected a Hugging Face folder "
                     "(config.json + *.safetensors), a Meta llama folder (params.json + consolidated.*.pth), "
                     "a .gguf file, or an offload_bitnet store (manifest.json).")


def _run_or_adapter_hint(path: str) -> str | None:
    """The message for a run folder or a LoRA adapter folder given where a model is expected."""
    def run_record(folder: str) -> dict:
        try:
            with open(os.path.join(folder, "run.json")) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        run = run_record(os.path.dirname(os.path.abspath(path)))
        try:
            with open(os.path.join(path, "adapter_config.json")) as handle:
                base = json.load(handle).get("base_model_name_or_path") or ""
        except (OSError, ValueError):
            base = ""
        base = run.get("source") or base or "BASE"
        return (f"{path} is a LoRA adapter folder, not a model: give its base model and the adapters, "
                f"test_gen.py {base} --adapter {path} (or fold them in: offload-bitnet merge "
                f"{run.get('store') or base} {path} OUT)")
    store = os.path.join(path, "store")
    merged = os.path.join(path, "merged")
    if os.path.isfile(os.path.join(path, "run.json")) or is_store(store):
        choices = [p for p in (store, merged) if is_store(p)]
        adapter = os.path.join(path, "adapter")
        if choices:
            return f"{path} is a run folder, not a model: did you mean {' or '.join(choices)}?"
        if os.path.isdir(adapter):
            base = run_record(path).get("source") or "BASE"
            return (f"{path} is the folder of a LoRA run, not a model: did you mean its base with the adapters, "
                    f"test_gen.py {base} --adapter {adapter}?")
        return f"{path} is a run folder that holds no model yet (no store, merged model or adapters)"
    return None


def read_source(path: str):
    """``(ModelConfig, tokenizer or None)`` of a model that is not imported yet, from its own metadata (HF
    ``config.json``, Meta ``params.json`` and shard headers, the GGUF header) without reading its weights."""
    kind = detect_format(path)
    if kind == "store":
        raise ValueError(f"{path} is a store; open it with BlockStore")
    module = importlib.import_module(f".{kind}", __name__)
    return module.read_source(path)


def import_model(src: str, out_dir: str, settings: StoreSettings | None = None, progress: bool = True) -> str:
    """Import any supported model into a new store at ``out_dir``."""
    kind = detect_format(src)
    if kind == "store":
        raise ValueError(f"{src} is already a store")
    module = importlib.import_module(f".{kind}", __name__)
    return module.import_to_store(src, out_dir, settings, progress)


def export_model(store_path: str, out_dir: str, format: str = "source", **options) -> str:
    """Export a store. ``format``: ``source`` (the format it was imported from), ``hf`` (LlamaForCausalLM
    full precision), ``hf-bitnet`` (packed BitNetForCausalLM), ``meta`` or ``gguf`` (llama.cpp; option
    ``gguf_type``: f32, f16, bf16, q8_0, tq2_0, tq1_0, default tq2_0 for ternary stores and f16 otherwise)."""
    store = BlockStore(store_path)
    requested_source = format == "source"
    if requested_source:
        format = store.extra.get("source", {}).get("format", "hf")
    if format not in EXPORTERS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if format != "gguf" and options.pop("gguf_type", None):
        raise ValueError(f"--gguf-type applies to GGUF exports; store {store_path} exports to {format}")
    module_name, function = EXPORTERS[format]
    if requested_source and format == "hf":
        function = "export_from_store"  # the source layout of a Hugging Face import, else the generic one
    exporter = getattr(importlib.import_module(f".{module_name}", __name__), function)
    return exporter(store, out_dir, **options)


def default_store_dir(src: str, settings: StoreSettings | None = None) -> str:
    """Where the cached import of ``src`` (as it is now) lives: ``~/.cache/offload_bitnet/<name>-<digest>``
    (see ``formats.cache``)."""
    return cached_store_dir(src, settings)


def ensure_store(path: str, settings: StoreSettings | None = None, progress: bool = True) -> str:
    """``path`` itself when it is a store, else the cached import of it (imported on first use, and again
    when the source changed; says which on stderr when ``progress``)."""
    if detect_format(path) == "store":
        return path
    return ensure_cached_import(path, import_model, settings, progress)
