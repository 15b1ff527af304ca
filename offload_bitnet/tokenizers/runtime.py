"""Loading the tokenizer a store carries. The store keeps its tokenizer files in ``STORE/tokenizer/`` and describes
them in ``manifest["extra"]["tokenizer"]``:

* ``{"kind": "byte"}``: the built-in byte-level tokenizer (demo and blank models);
* ``{"kind": "hf"}``: ``tokenizer.json`` (read with the ``tokenizers`` package), plus ``tokenizer_config.json``
  (special tokens, ``add_bos_token``, chat template) and ``chat_template.jinja`` when present;
* ``{"kind": "sentencepiece"}``: ``tokenizer.model`` (read with ``sentencepiece``), plus
  ``tokenizer_config.json`` when present;
* ``{"kind": "gguf", "file": "gguf_tokenizer.json"}``: the ``tokenizer.ggml.*`` metadata of a GGUF file.
  A ``gpt2`` vocabulary becomes a byte-level BPE ``tokenizers`` tokenizer; a ``llama`` vocabulary becomes a
  sentencepiece BPE model built from the tokens, scores and token types;
* ``{"kind": "tiktoken", "file": "tokenizer.model"}``: Meta's Llama 3 rank file, rebuilt as a ``tokenizers``
  BPE with Meta's special tokens and the Llama 3 chat format.

Descriptions may also carry ``bos_id``/``eos_id``/``pad_id``/``chat_template`` to override what the files say.
Every tokenizer has the same interface: ``encode(text, bos, eos)``, ``decode(ids)``, ``bos_id``, ``eos_id``,
``pad_id``, ``vocab_size``, ``add_bos`` (whether plain text prompts start with BOS), ``stop_ids`` (EOS and
end-of-turn tokens) and ``apply_chat_template(messages, add_generation_prompt=True) -> str``.

One module per kind: ``base`` (the interface, the byte tokenizer, chat templates), ``hf``, ``spm`` (sentencepiece),
``gguf_rebuild``, ``tiktoken_bpe``; ``config_files`` reads the side files hf and sentencepiece share.
"""
from __future__ import annotations

import json
import os

from offload_bitnet.notices import warn
from offload_bitnet.tokenizers.base import TOKENIZER_DIR, BaseTokenizer, ByteTokenizer, TokenizerError
from offload_bitnet.tokenizers.gguf_rebuild import load_gguf
from offload_bitnet.tokenizers.hf import load_hf
from offload_bitnet.tokenizers.spm import load_sentencepiece
from offload_bitnet.tokenizers.tiktoken_bpe import load_tiktoken

LOADERS = {"hf": load_hf, "sentencepiece": load_sentencepiece, "gguf": load_gguf, "tiktoken": load_tiktoken}


def _store_defaults(store_path: str) -> dict:
    """bos/eos/pad ids from the store's model config, the fallback when tokenizer files name none."""
    try:
        with open(os.path.join(store_path, "manifest.json")) as handle:
            config = json.load(handle).get("config", {})
    except (OSError, ValueError):
        return {}
    return {key: config.get(key) for key in ("bos_id", "eos_id", "pad_id", "vocab_size")}


def load_tokenizer(store_path: str, description: dict | None):
    """The tokenizer a store describes (``manifest["extra"]["tokenizer"]``). A store that names none gets the
    byte tokenizer, with a warning on stderr, if its vocabulary is the byte tokenizer's; otherwise it is
    refused (TokenizerError saying how to pass the model's tokenizer)."""
    description = dict(description or {})
    kind = description.get("kind", "byte")
    if kind == "byte":
        return byte_fallback(store_path, _store_defaults(store_path).get("vocab_size"))
    loader = LOADERS.get(kind)
    if loader is None:
        raise TokenizerError(f"store {store_path} names tokenizer kind {kind!r}, which this version cannot load "
                             f"(known: byte, {', '.join(LOADERS)})")
    directory = os.path.join(store_path, description.get("dir") or TOKENIZER_DIR)
    if not os.path.isdir(directory):
        raise TokenizerError(f"store {store_path} says it has a {kind} tokenizer, but {directory} is missing; "
                             "re-import the model")
    return load_tokenizer_files(directory, description, store_path)


def load_tokenizer_files(directory: str, description: dict, store_path: str) -> BaseTokenizer:
    """A tokenizer of kind ``description["kind"]`` from the files in ``directory``, checked against the model
    of ``store_path`` (its ids must fit the embedding)."""
    defaults = _store_defaults(store_path)
    model_vocab = defaults.pop("vocab_size", None)
    tokenizer = LOADERS[description["kind"]](directory, description, defaults)
    check_fits(tokenizer, model_vocab, directory, store_path)
    return tokenizer


def check_fits(tokenizer: BaseTokenizer, model_vocab: int | None, where: str, store_path: str):
    """Refuse a tokenizer with more ids than the model has embedding rows."""
    if model_vocab and tokenizer.vocab_size > model_vocab:
        raise TokenizerError(f"the tokenizer in {where} has {tokenizer.vocab_size} tokens but the model in "
                             f"{store_path} has only {model_vocab} embedding rows: they do not belong together. "
                             "Re-import the model with its own tokenizer.")


TOKENIZER_OPTION = ("--tokenizer PATH (a folder with tokenizer.json or tokenizer.model, one of those files, a "
                    ".gguf file or a store whose tokenizer to use)")


def byte_fallback(store_path: str, model_vocab: int | None, explicit: bool = False) -> ByteTokenizer:
    """The byte tokenizer for a model that has no tokenizer of its own, said loudly on stderr. Refused (unless
    ``explicit``: ``--tokenizer byte``) when the model's vocabulary is not the byte tokenizer's: its ids would
    mean something else to the model, and generation would print garbage."""
    size = ByteTokenizer.vocab_size
    if not explicit and model_vocab is not None and model_vocab != size:
        raise TokenizerError(
            f"the model in {store_path} carries no tokenizer, and its {model_vocab}-token vocabulary does not fit "
            f"the built-in byte tokenizer ({size} ids): text encoded with it would be garbage to the model. Give the "
            f"model's own tokenizer with {TOKENIZER_OPTION}, or store it with the model once: offload-bitnet import "
            "SRC OUT --tokenizer PATH (offload-bitnet create ... --tokenizer PATH for a blank model). "
            "--tokenizer byte uses the byte tokenizer anyway.")
    reason = "as asked (--tokenizer byte)" if explicit else "it has no tokenizer of its own"
    warn(f"warning: using the built-in byte tokenizer (UTF-8 bytes as ids 0-255; BOS, EOS, PAD 256-258) for "
         f"{store_path}: {reason}; --tokenizer PATH gives another")
    return ByteTokenizer()
