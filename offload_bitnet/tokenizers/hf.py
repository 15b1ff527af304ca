"""The ``hf`` tokenizer kind: ``tokenizer.json`` (read with the ``tokenizers`` package), plus ``tokenizer_config.json``
(special tokens, ``add_bos_token``, chat template), ``chat_template.jinja`` and ``generation_config.json``."""
from __future__ import annotations

import os

from offload_bitnet.tokenizers.base import BaseTokenizer, TokenizerError
from offload_bitnet.tokenizers.config_files import chat_template_file, generation_stop_ids, read_json, special_id
from offload_bitnet.tokenizers.spm import load_sentencepiece


class HFTokenizer(BaseTokenizer):
    """A ``tokenizers.Tokenizer`` (``tokenizer.json`` or one built from GGUF metadata)."""

    kind = "hf"

    def __init__(self, backend, *, bos_id=None, eos_id=None, pad_id=None, add_bos=None, chat_template=None,
                 kind: str = "hf", description: dict | None = None):
        self.backend = backend
        self.kind = kind
        self._description = description or {"kind": kind}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        if add_bos is None:
            # No flag: BOS is added when the tokenizer's own post-processor adds it (Llama 3 style).
            with_special = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(with_special) and with_special[0] == bos_id
        self.add_bos = bool(add_bos)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # Special tokens written in the text (a rendered chat template) are matched whole by ``tokenizers``.
        return self._wrap(self.backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def describe(self) -> dict:
        return dict(self._description)


def load_hf(directory: str, description: dict, defaults: dict) -> BaseTokenizer:
    """``tokenizer.json`` (or, without it, ``tokenizer.model``) with its ``tokenizer_config.json``."""
    from tokenizers import Tokenizer  # only this tokenizer kind needs it

    config_path = os.path.join(directory, "tokenizer_config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    special_map_path = os.path.join(directory, "special_tokens_map.json")
    if os.path.isfile(special_map_path):
        config = {**read_json(special_map_path), **config}
    json_path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(json_path):
        if os.path.isfile(os.path.join(directory, "tokenizer.model")):
            return load_sentencepiece(directory, description, defaults)
        raise TokenizerError(f"{directory} has no tokenizer.json; re-import the model or copy its tokenizer "
                             "files there")
    try:
        backend = Tokenizer.from_file(json_path)
    except Exception as error:
        raise TokenizerError(f"cannot load {json_path}: {error}") from None
    lookup = backend.token_to_id
    tokenizer = HFTokenizer(
        backend,
        bos_id=description.get("bos_id", special_id(lookup, config, "bos_token", defaults.get("bos_id"))),
        eos_id=description.get("eos_id", special_id(lookup, config, "eos_token", defaults.get("eos_id"))),
        pad_id=description.get("pad_id", special_id(lookup, config, "pad_token", defaults.get("pad_id"))),
        add_bos=description.get("add_bos", config.get("add_bos_token")),
        chat_template=description.get("chat_template") or chat_template_file(directory, config),
        kind="hf", description=description)
    tokenizer.extra_stop_ids = generation_stop_ids(directory)
    return tokenizer
