"""LoRA adapters out of a run, for the tools people use them in (``offload-bitnet export-adapter``).

* ``peft``: a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) whose
  ``base_model_name_or_path`` is a Hugging Face folder peft can load: the folder the base store was imported
  from when there is one (a LoRA run records it already, see ``peft_base_model``), else an ``hf`` export of
  the base store, written by this command (``--base DIR``, default ``OUT/base``) and recorded there.
* ``gguf``: a llama.cpp LoRA adapter (``formats.gguf_adapter``), applied with ``llama-cli -m BASE.gguf --lora
  ADAPTER.gguf`` or ``llama_cpp.Llama(model_path=..., lora_path=...)``.
"""
from __future__ import annotations

import json
import os
import shutil

from offload_bitnet.formats import detect_format, export_model, hf, is_store
from offload_bitnet.formats.cache import read_record
from offload_bitnet.formats.merge import load_adapters
from offload_bitnet.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from offload_bitnet.notices import warn
from offload_bitnet.store.blockstore import BlockStore

ADAPTER_FORMATS = ("peft", "gguf")


class AdapterExportError(ValueError):
    """An adapter cannot be exported as asked; the message says why and what to do."""


def hf_source_folder(store) -> str | None:
    """The Hugging Face folder ``store`` was imported from, when it still is one: the path recorded at import
    (``extra["source"]["path"]``), else the import cache's record of the source."""
    source = store.extra.get("source") or {}
    if source.get("format") != "hf":
        return None
    record = read_record(store.path) or {}
    for path in (source.get("path"), record.get("source")):
        if path and os.path.isdir(path) and hf.detect(path):
            return os.path.abspath(path)
    return None


def peft_base_model(store) -> str:
    """What a LoRA run writes as ``base_model_name_or_path``: the HF folder of the base when it came from one
    (peft loads it), else the store path (``export-adapter --format peft`` then exports the base for peft)."""
    return hf_source_folder(store) or os.path.abspath(store.path)


def resolve_adapter(path: str) -> tuple[str, str | None]:
    """``(adapter_dir, base store or None)`` of a run folder or an adapter folder: the store its run.json
    names, else the adapter's ``base_model_name_or_path`` when that is a store."""
    adapter_dir = path
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and os.path.isdir(os.path.join(path, "adapter")):
        adapter_dir = os.path.join(path, "adapter")
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG)):
        raise AdapterExportError(f"{path} is neither a LoRA run folder (RUN_DIR with adapter/) nor an adapter folder "
                                 f"({ADAPTER_CONFIG} is missing); give the folder of a --mode lora run")
    store = None
    run_json = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "run.json")
    candidates = []
    if os.path.isfile(run_json):
        with open(run_json) as handle:
            candidates.append(json.load(handle).get("store"))
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as handle:
        candidates.append(json.load(handle).get("base_model_name_or_path"))
    for candidate in candidates:
        if candidate and is_store(candidate):
            store = candidate
            break
    return adapter_dir, store


def export_adapter(path: str, out: str, format: str = "peft", base: str | None = None, store: str | None = None,
                   progress: bool = True) -> str:
    """Export the adapters of run folder (or adapter folder) ``path`` to ``out`` as ``format`` (``peft`` or
    ``gguf``); ``store`` names the base store when the run does not say it. Returns the written path."""
    if format not in ADAPTER_FORMATS:
        raise AdapterExportError(f"unknown adapter format {format!r}; choose one of {', '.join(ADAPTER_FORMATS)}")
    adapter_dir, found = resolve_adapter(path)
    store_path = store or found
    if store_path is None:
        raise AdapterExportError(f"cannot tell which store the adapters in {adapter_dir} were trained on; "
                                 "give it with --store STORE")
    base_store = BlockStore(store_path)
    adapters = load_adapters(adapter_dir, base_store.config)
    if format == "gguf":
        from offload_bitnet.formats.gguf_adapter import write_lora_gguf  # lazy: the gguf package is only needed here

        return write_lora_gguf(adapters, base_store, out, progress=progress)
    return export_peft(adapter_dir, base_store, out, base, progress)


def export_peft(adapter_dir: str, store, out: str, base: str | None = None, progress: bool = True) -> str:
    """A PEFT folder at ``out`` whose ``base_model_name_or_path`` peft can load (see the module docstring)."""
    if os.path.isdir(out) and os.listdir(out):
        raise AdapterExportError(f"{out} exists and is not empty; export into a new or empty folder")
    base_folder = base or hf_source_folder(store)
    if base_folder is None or not os.path.exists(base_folder):
        base_folder = base_folder or os.path.join(out, "base")
        if progress:
            warn(f"the base store {store.path} has no Hugging Face folder peft could load: exporting it to "
                 f"{base_folder} (offload-bitnet export {store.path} {base_folder} --format hf)")
        export_model(store.path, base_folder, format="hf", progress=progress)
    elif detect_format(base_folder) != "hf":
        raise AdapterExportError(f"--base {base_folder} is not a Hugging Face model folder (config.json + "
                                 "*.safetensors); give one, or a new folder to export the base into")
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS), os.path.join(out, ADAPTER_WEIGHTS))
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as handle:
        config = json.load(handle)
    config["base_model_name_or_path"] = os.path.abspath(base_folder)
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as handle:
        json.dump(config, handle, indent=1)
        handle.write("\n")
    return os.path.abspath(out)
