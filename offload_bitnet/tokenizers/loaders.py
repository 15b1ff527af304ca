"""Tokenizers given by path (``--tokenizer PATH`` of test_gen.py, finetune.py, ``create`` and ``import``).

PATH is one of: a folder with ``tokenizer.json`` or ``tokenizer.model`` (and ``tokenizer_config.json``, chat
template, ``generation_config.json``), one of those files, a ``.gguf`` file (its ``tokenizer.ggml.*``
metadata), a store (its own tokenizer), or ``byte`` (the built-in byte tokenizer, on purpose).
``open_tokenizer`` loads it for one run; ``install_tokenizer`` copies it into ``STORE/tokenizer/`` and
records it in ``manifest["extra"]["tokenizer"]``, as the importers do.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from offload_bitnet.formats import hf, is_store
from offload_bitnet.formats.gguf import TOKENIZER_FILE, open_reader, read_tokenizer, tokenizer_description
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.tokenizers.base import TOKENIZER_DIR, BaseTokenizer, TokenizerError
from offload_bitnet.tokenizers.gguf_rebuild import gguf_tokenizer
from offload_bitnet.tokenizers.runtime import (_store_defaults, byte_fallback, check_fits, load_tokenizer,
                                               load_tokenizer_files)

BYTE = "byte"


@dataclass
class TokenizerSource:
    """Where a tokenizer comes from: files to copy from ``folder``, or GGUF metadata (``gguf_data``)."""

    path: str
    description: dict
    folder: str | None = None
    files: list = field(default_factory=list)
    gguf_data: dict | None = None


def tokenizer_source(path: str) -> TokenizerSource:
    """What ``--tokenizer PATH`` names; TokenizerError saying what was found otherwise."""
    if not os.path.exists(path):
        raise TokenizerError(f"--tokenizer {path}: no such file or folder")
    if os.path.isdir(path) and is_store(path):
        with open(os.path.join(path, "manifest.json")) as handle:
            description = json.load(handle).get("extra", {}).get("tokenizer")
        if not description or description.get("kind", BYTE) == BYTE:
            raise TokenizerError(f"--tokenizer {path}: that store has no tokenizer of its own either")
        folder = os.path.join(path, description.get("dir") or TOKENIZER_DIR)
        return TokenizerSource(path, dict(description), folder, sorted(os.listdir(folder)))
    if os.path.isfile(path) and path.endswith(".gguf"):
        data = read_tokenizer(open_reader(path))
        if "tokens" not in data:
            raise TokenizerError(f"--tokenizer {path}: the GGUF file carries no vocabulary (tokenizer.ggml.tokens)")
        return TokenizerSource(path, tokenizer_description(data), gguf_data=data)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path) and os.path.basename(path) not in ("tokenizer.json", "tokenizer.model"):
        raise TokenizerError(f"--tokenizer {path}: expected a tokenizer.json or tokenizer.model file, a folder "
                             "holding one, a .gguf file or a store")
    description = hf.describe_tokenizer(folder)
    if description is None:
        found = ", ".join(sorted(os.listdir(folder))[:8]) or "nothing"
        raise TokenizerError(f"--tokenizer {path}: {folder} has no tokenizer.json or tokenizer.model "
                             f"(found: {found})")
    if description["kind"] == "sentencepiece" and not description_loads(folder, description):
        description = {"kind": "tiktoken", "dir": TOKENIZER_DIR, "file": "tokenizer.model",
                       "files": description["files"]}  # a Llama 3 rank file, not sentencepiece
    return TokenizerSource(path, description, folder, hf.tokenizer_files(folder))


def description_loads(folder: str, description: dict) -> bool:
    try:
        import sentencepiece  # loaded here: only this tokenizer kind needs the package

        sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
        return True
    except (RuntimeError, OSError, ImportError):
        return False


def _load_source(source: TokenizerSource, store_path: str) -> BaseTokenizer:
    if source.gguf_data is not None:
        defaults = _store_defaults(store_path)
        model_vocab = defaults.pop("vocab_size", None)
        tokenizer = gguf_tokenizer(source.gguf_data, source.description, defaults, source.path)
        check_fits(tokenizer, model_vocab, source.path, store_path)
        return tokenizer
    return load_tokenizer_files(source.folder, source.description, store_path)


def open_tokenizer(store_path: str, description: dict | None, tokenizer_path: str | None = None) -> BaseTokenizer:
    """The tokenizer for a model: ``tokenizer_path`` (``--tokenizer``) when given, else the store's own
    (``load_tokenizer``: the byte tokenizer only where it fits, with a warning)."""
    if not tokenizer_path:
        return load_tokenizer(store_path, description)
    if tokenizer_path == BYTE:
        return byte_fallback(store_path, _store_defaults(store_path).get("vocab_size"), explicit=True)
    return _load_source(tokenizer_source(tokenizer_path), store_path)


def install_tokenizer(store_path: str, tokenizer_path: str) -> dict:
    """Copy the tokenizer ``tokenizer_path`` names into ``STORE/tokenizer/`` (replacing what was there) and
    record it in the manifest; returns its description. Checked against the model before anything changes."""
    if tokenizer_path == BYTE:
        description = {"kind": BYTE}
        staging = None
    else:
        source = tokenizer_source(tokenizer_path)
        _load_source(source, store_path)  # loads and fits the model, or raises before the store is touched
        description = dict(source.description, dir=TOKENIZER_DIR)
        staging = os.path.join(store_path, TOKENIZER_DIR + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        if source.gguf_data is not None:
            with open(os.path.join(staging, TOKENIZER_FILE), "w") as handle:
                json.dump(source.gguf_data, handle)
        else:
            for name in source.files:
                if os.path.isfile(os.path.join(source.folder, name)):
                    shutil.copyfile(os.path.join(source.folder, name), os.path.join(staging, name))
    store = BlockStore(store_path, writable=True)
    try:
        target = os.path.join(store.path, TOKENIZER_DIR)
        if os.path.isdir(target):
            shutil.rmtree(target)
        if staging:
            os.rename(staging, target)
        store.commit(store.step, dict(store.extra, tokenizer=description))
    finally:
        store.close()
    return description
