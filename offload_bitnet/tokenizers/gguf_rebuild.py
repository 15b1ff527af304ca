"""The ``gguf`` tokenizer kind: a GGUF file's ``tokenizer.ggml.*`` metadata rebuilt as a runtime tokenizer. A ``gpt2``
vocabulary becomes a byte-level BPE ``tokenizers`` tokenizer; a ``llama`` vocabulary becomes a sentencepiece BPE
model (a ModelProto written here) built from the tokens, scores and token types."""
from __future__ import annotations

import os
import struct

from offload_bitnet.tokenizers.base import BaseTokenizer, TokenizerError
from offload_bitnet.tokenizers.config_files import read_json
from offload_bitnet.tokenizers.hf import HFTokenizer
from offload_bitnet.tokenizers.spm import SentencePieceTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's ``tokenizer.ggml.pre`` names -> (split regex or None for GPT-2's, split digits one by one,
# match whole vocabulary words before merging). Unknown names fall back to GPT-2's pre-tokenization.
GGUF_PRE_TOKENIZERS = {
    "default": (None, False, False), "gpt-2": (None, False, False), "gpt2": (None, False, False),
    "smollm": (None, True, False),  # llama.cpp: "\p{N}" first, then the GPT-2 pattern
    "llama3": (LLAMA3_SPLIT, False, True), "llama-v3": (LLAMA3_SPLIT, False, True),
    "llama-bpe": (LLAMA3_SPLIT, False, True), "smaug-bpe": (LLAMA3_SPLIT, False, True),
    "qwen2": (QWEN2_SPLIT, False, False), "deepseek-r1-qwen": (QWEN2_SPLIT, False, False),
}
CONTROL, USER_DEFINED = 3, 4


def build_gguf_bpe(data: dict):
    """A ``tokenizers`` byte-level BPE from GGUF ``gpt2`` metadata (tokens, merges, token types, pre)."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,  # only this tokenizer kind needs it
                            pre_tokenizers)

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens, types = data["tokens"], data.get("token_type") or [1] * len(data["tokens"])
    vocab = {}
    for index, token in enumerate(tokens):
        # Normal tokens are written in the byte alphabet; a few files write them as raw text.
        if types[index] not in (CONTROL, USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(merge.split(" ", 1)) for merge in data.get("merges", [])]
    split, digits, ignore_merges = GGUF_PRE_TOKENIZERS.get(data.get("pre") or "default", (None, False, False))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types)
               if t == CONTROL and tokens[i] in vocab and vocab[tokens[i]] == i]
    plain = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types)
             if t == USER_DEFINED and tokens[i] in vocab and vocab[tokens[i]] == i]
    backend.add_special_tokens(special)
    backend.add_tokens(plain)
    return backend


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _string_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def sentencepiece_model_proto(pieces: list[tuple[str, float, int]], *, unk_id: int, bos_id: int | None,
                              eos_id: int | None, pad_id: int | None, add_dummy_prefix: bool) -> bytes:
    """A serialized sentencepiece ``ModelProto`` (BPE, identity normalizer, whitespace escaped as U+2581),
    written by hand so no protobuf package is needed. Field numbers are those of sentencepiece_model.proto."""
    body = bytearray()
    for text, score, kind in pieces:
        piece = _string_field(1, text.encode("utf-8")) + _field(2, 5, struct.pack("<f", score))
        piece += _field(3, 0, _varint(kind))
        body += _string_field(1, piece)
    byte_fallback = any(kind == 6 for _, _, kind in pieces)
    trainer = _field(3, 0, _varint(2)) + _field(4, 0, _varint(len(pieces)))  # model_type BPE, vocab_size
    trainer += _field(35, 0, _varint(int(byte_fallback)))
    for number, value in ((40, unk_id), (41, bos_id), (42, eos_id), (43, pad_id)):
        trainer += _field(number, 0, _varint(-1 if value is None else value))
    body += _string_field(2, trainer)
    normalizer = _string_field(1, b"identity") + _field(3, 0, _varint(int(add_dummy_prefix)))
    normalizer += _field(4, 0, _varint(0)) + _field(5, 0, _varint(1))  # keep extra whitespace; escape spaces
    body += _string_field(3, normalizer)
    return bytes(body)


def build_gguf_sentencepiece(data: dict):
    """A ``sentencepiece`` processor from GGUF ``llama`` metadata (tokens, scores, token types)."""
    import sentencepiece  # loaded here: only this tokenizer kind needs the package

    tokens = data["tokens"]
    scores = data.get("scores") or [0.0] * len(tokens)
    types = list(data.get("token_type") or [1] * len(tokens))
    types = [t if 1 <= t <= 6 else 1 for t in types]
    unk_id = data.get("unk_id", 0)
    if 2 not in types:  # sentencepiece refuses a model without an unknown piece
        types[unk_id] = 2
    pieces = list(zip(tokens, (float(s) for s in scores), types))
    proto = sentencepiece_model_proto(pieces, unk_id=unk_id, bos_id=data.get("bos_id"), eos_id=data.get("eos_id"),
                                      pad_id=None, add_dummy_prefix=data.get("add_space_prefix", True))
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    special = {token: i for i, (token, t) in enumerate(zip(tokens, types)) if t == CONTROL}
    return processor, special


def load_gguf(directory: str, description: dict, defaults: dict) -> BaseTokenizer:
    """Rebuild the tokenizer a GGUF file described (saved by ``formats.gguf`` as JSON)."""
    path = os.path.join(directory, description.get("file", "gguf_tokenizer.json"))
    if not os.path.isfile(path):
        raise TokenizerError(f"{path} is missing; re-import the model from its GGUF file")
    return gguf_tokenizer(read_json(path), description, defaults, path)


def gguf_tokenizer(data: dict, description: dict, defaults: dict, path: str) -> BaseTokenizer:
    """The tokenizer of GGUF ``tokenizer.ggml.*`` metadata (``data``, read from ``path``)."""
    model = data.get("model")
    if "tokens" not in data:
        raise TokenizerError(f"{path} has no vocabulary (tokenizer.ggml.tokens); the GGUF file carried none")
    common = dict(bos_id=description.get("bos_id", data.get("bos_id", defaults.get("bos_id"))),
                  eos_id=description.get("eos_id", data.get("eos_id", defaults.get("eos_id"))),
                  pad_id=description.get("pad_id", data.get("pad_id", defaults.get("pad_id"))),
                  chat_template=description.get("chat_template") or data.get("chat_template"),
                  kind="gguf", description=description)
    if model == "gpt2":
        return HFTokenizer(build_gguf_bpe(data), add_bos=data.get("add_bos", False), **common)
    if model == "llama":
        processor, special = build_gguf_sentencepiece(data)
        return SentencePieceTokenizer(processor, add_bos=data.get("add_bos", True), special_tokens=special, **common)
    raise TokenizerError(f"{path}: GGUF tokenizer model {model!r} is not supported (supported: gpt2, llama)")
