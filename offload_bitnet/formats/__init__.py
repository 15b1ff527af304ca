"""Model formats at the edge: import into a block store, export out of one.

Each format module (``hf``, ``meta``, ``gguf``) provides:

* ``detect(path) -> bool``: whether ``path`` holds a model in that format;
* ``import_to_store(src, out_dir, settings: StoreSettings | None, progress: bool) -> str``: stream the model
  into a new store (one unit in memory at a time), record ``manifest["extra"]["source"]`` (what export needs
  to write the source format back) and ``manifest["extra"]["tokenizer"]`` (tokenizer files go in
  ``STORE/tokenizer/``); returns the store path;
* ``export_from_store(store: BlockStore, out_dir, **options) -> str``.
"""
from __future__ import annotations

import hashlib
import importlib
import os

from ..store import MANIFEST, StoreSettings

FORMATS = ("hf", "meta", "gguf")
# What export_model writes. ``gguf`` (F16/F32 llama GGUF) is for stores imported from GGUF, which carry the GGUF
# vocabulary llama.cpp needs; other stores are refused with a message (export hf and convert with llama.cpp).
EXPORT_FORMATS = ("source", "hf", "hf-bitnet", "meta", "gguf")


def is_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def is_complete_store(path: str) -> bool:
    """A store whose creation or import finished (its first commit happened)."""
    if not is_store(path):
        return False
    from ..store import BlockStore

    return BlockStore(path).step >= 0


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
    listing = ", ".join(sorted(os.listdir(path))[:8]) if os.path.isdir(path) else os.path.basename(path)
    raise ValueError(f"{path} is not a model this tool reads (found: {listing}). Expected a Hugging Face folder "
                     "(config.json + *.safetensors), a Meta llama folder (params.json + consolidated.*.pth), "
                     "a .gguf file, or an offload_bitnet store (manifest.json).")


def import_model(src: str, out_dir: str, settings: StoreSettings | None = None, progress: bool = True) -> str:
    """Import any supported model into a new store at ``out_dir``."""
    kind = detect_format(src)
    if kind == "store":
        raise ValueError(f"{src} is already a store")
    module = importlib.import_module(f".{kind}", __name__)
    return module.import_to_store(src, out_dir, settings, progress)


def export_model(store_path: str, out_dir: str, format: str = "source", **options) -> str:
    """Export a store. ``format``: ``source`` (the format it was imported from), ``hf`` (LlamaForCausalLM
    full precision), ``hf-bitnet`` (packed BitNetForCausalLM), ``meta`` or ``gguf`` (a store imported from
    GGUF only)."""
    from ..store import BlockStore

    store = BlockStore(store_path)
    requested_source = format == "source"
    if format == "source":
        format = store.extra.get("source", {}).get("format", "hf")
    module_name = {"hf": "hf", "hf-bitnet": "hf", "meta": "meta", "gguf": "gguf"}.get(format)
    if module_name is None:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    module = importlib.import_module(f".{module_name}", __name__)
    if format == "hf-bitnet":
        options.setdefault("bitnet", True)
    elif format == "hf" and module_name == "hf" and not requested_source:
        options.setdefault("source", False)  # "hf" means the generic LlamaForCausalLM, whatever the origin
    return module.export_from_store(store, out_dir, **options)


def default_store_dir(src: str) -> str:
    """Where an imported copy of ``src`` is cached: ``~/.cache/offload_bitnet/<name>-<hash>``."""
    root = os.environ.get("OFFLOAD_BITNET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "offload_bitnet"))
    absolute = os.path.abspath(src)
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:10]
    return os.path.join(root, f"{os.path.basename(absolute.rstrip('/'))}-{digest}")


def ensure_store(path: str, settings: StoreSettings | None = None, progress: bool = True) -> str:
    """``path`` itself when it is a store, else the cached import of it (imported on first use)."""
    if detect_format(path) == "store":
        return path
    target = default_store_dir(path)
    if is_complete_store(target):
        return target
    if os.path.isdir(target):  # an import that was interrupted
        import shutil

        shutil.rmtree(target)
    return import_model(path, target, settings, progress)
