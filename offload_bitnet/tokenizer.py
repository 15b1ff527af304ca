"""Tokenizers a store can carry. The store keeps its tokenizer files in ``STORE/tokenizer/`` and describes
them in ``manifest["extra"]["tokenizer"]`` (``{"kind": "byte"}`` for the built-in byte-level tokenizer)."""
from __future__ import annotations

import os


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS 256, EOS 257, PAD 258 (vocab padded to 260).

    Used by the demo and by blank models, which have no trained tokenizer.
    """

    kind = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 260
    chat_template = None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str):
        os.makedirs(directory, exist_ok=True)

    def describe(self) -> dict:
        return {"kind": self.kind}


def load_tokenizer(store_path: str, description: dict | None):
    """The tokenizer a store describes; the byte tokenizer when it names none."""
    kind = (description or {}).get("kind", "byte")
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"store {store_path} names tokenizer kind {kind!r}, which this version cannot load")
