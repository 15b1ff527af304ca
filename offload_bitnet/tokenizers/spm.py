"""The ``sentencepiece`` tokenizer kind: ``tokenizer.model`` (read with the ``sentencepiece`` package), plus
``tokenizer_config.json`` when present."""
from __future__ import annotations

import os
import re

from offload_bitnet.tokenizers.base import BaseTokenizer, TokenizerError
from offload_bitnet.tokenizers.config_files import chat_template_file, generation_stop_ids, read_json, special_id


class SentencePieceTokenizer(BaseTokenizer):
    """A ``sentencepiece`` model. Control tokens written in the text (``<s>`` from a chat template) are cut
    out first and mapped to their ids, as llama.cpp and transformers do; the text between them is encoded by
    sentencepiece (each piece with its own dummy-prefix space, as llama.cpp does after a special token)."""

    def __init__(self, processor, *, bos_id=None, eos_id=None, pad_id=None, add_bos=True, chat_template=None,
                 kind: str = "sentencepiece", description: dict | None = None, special_tokens: dict | None = None):
        self.sp = processor
        self.kind = kind
        self._description = description or {"kind": kind}
        self.vocab_size = processor.get_piece_size()
        if special_tokens is None:
            special_tokens = {processor.id_to_piece(i): i for i in range(self.vocab_size) if processor.is_control(i)}
        self.special_tokens = {text: i for text, i in special_tokens.items() if text}
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = []
        parts = self._split.split(text) if self._split else [text]
        for index, part in enumerate(parts):
            if index % 2:  # a special token matched by the split pattern
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return self._wrap(ids, bos, eos)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        special = set(self.special_tokens.values())
        pieces, run = [], []
        for token in ids:
            token = int(token)
            if token in special or not 0 <= token < self.vocab_size:
                if run:
                    pieces.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens and token in special:
                    pieces.append(self.token_text(token))
            else:
                run.append(token)
        if run:
            pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def describe(self) -> dict:
        return dict(self._description)


def load_sentencepiece(directory: str, description: dict, defaults: dict) -> BaseTokenizer:
    """``tokenizer.model`` with the special ids and chat template of ``tokenizer_config.json`` when present."""
    import sentencepiece  # loaded here: only this tokenizer kind needs the package

    model_path = os.path.join(directory, description.get("model") or description.get("file") or "tokenizer.model")
    if not os.path.isfile(model_path):
        raise TokenizerError(f"{model_path} is missing; re-import the model or copy its tokenizer.model there")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.load(model_path)
    except Exception as error:
        raise TokenizerError(f"cannot load sentencepiece model {model_path}: {error}") from None
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}

    def lookup(text):
        index = processor.piece_to_id(text)
        return None if index == processor.unk_id() and text != processor.id_to_piece(index) else index

    def special(key: str, own_id: int):
        """The description's id, else tokenizer_config.json's token, else the model's own (-1: none), else the
        store config's."""
        fallback = own_id if own_id >= 0 else defaults.get(f"{key}_id")
        return description.get(f"{key}_id", special_id(lookup, config, f"{key}_token", fallback))

    tokenizer = SentencePieceTokenizer(
        processor, bos_id=special("bos", processor.bos_id()), eos_id=special("eos", processor.eos_id()),
        pad_id=special("pad", processor.pad_id()),
        add_bos=description.get("add_bos", config.get("add_bos_token", True)),
        chat_template=description.get("chat_template") or chat_template_file(directory, config),
        kind="sentencepiece", description=description)
    tokenizer.extra_stop_ids = generation_stop_ids(directory)
    return tokenizer
