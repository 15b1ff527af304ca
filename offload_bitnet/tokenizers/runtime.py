"""Tokenizers a store can carry. The store keeps its tokenizer files in ``STORE/tokenizer/`` and describes
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
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys
from datetime import datetime

TOKENIZER_DIR = "tokenizer"

# Tokens that end a turn in common chat formats; generation stops at these besides EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                      "<|eom_id|>", "</s>", "<EOT>")


class TokenizerError(ValueError):
    """A store's tokenizer cannot be loaded or used; the message says which file and what to do."""


class BaseTokenizer:
    """What every tokenizer shares: special ids, stop tokens, chat templates."""

    kind = "base"
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    vocab_size = 0
    add_bos = True
    chat_template: str | None = None
    special_tokens: dict[str, int] = {}
    extra_stop_ids: frozenset[int] = frozenset()  # e.g. generation_config.json's eos_token_id list

    def token_text(self, token_id: int | None) -> str | None:
        """The text of a special token id (as a chat template writes it), or None."""
        if token_id is None:
            return None
        for text, index in self.special_tokens.items():
            if index == token_id:
                return text
        return None

    @property
    def stop_ids(self) -> set[int]:
        """EOS plus the end-of-turn tokens (``<|im_end|>``, ``<|eot_id|>``...) the vocabulary has."""
        stops = {self.eos_id} if self.eos_id is not None else set()
        stops |= {self.special_tokens[t] for t in END_OF_TURN_TOKENS if t in self.special_tokens}
        return stops | set(self.extra_stop_ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the model's own chat template (jinja2)."""
        if not self.chat_template:
            raise TokenizerError("this model carries no chat template, so it cannot format a chat; give a plain "
                                 "prompt instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.token_text(self.bos_id) or "",
                                    eos_token=self.token_text(self.eos_id) or "",
                                    pad_token=self.token_text(self.pad_id), **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered chat, with BOS added only when the template did not write it already."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        bos_text = self.token_text(self.bos_id)
        add = self.add_bos and not (bos_text and text.startswith(bos_text))
        return self.encode(text, bos=add)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        suffix = [self.eos_id] if eos and self.eos_id is not None else []
        return prefix + list(ids) + suffix


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes as tokens 0..255, then BOS 256, EOS 257, PAD 258 (vocab padded to 260).

    Used by the demo and by blank models, which have no trained tokenizer.
    """

    kind = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 260
    chat_template = None
    special_tokens = {"<s>": 256, "</s>": 257, "<pad>": 258}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str):
        os.makedirs(directory, exist_ok=True)

    def describe(self) -> dict:
        return {"kind": self.kind}


# ---------------------------------------------------------------------------------------------- chat templates
def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render a Hugging Face style chat template the way transformers does (sandboxed jinja2, trim_blocks,
    lstrip_blocks, ``tojson``, ``raise_exception``, ``strftime_now``)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"the model's chat template rejected the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as error:
        raise TokenizerError(f"the model's chat template failed to render: {error}") from None


# ---------------------------------------------------------------------------------------------- tokenizers (hf)
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


def _token_content(value) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from None


def _hf_chat_template(directory: str, config: dict) -> str | None:
    """The chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path) as handle:
            return handle.read()
    json_path = os.path.join(directory, "chat_template.json")
    template = _read_json(json_path).get("chat_template") if os.path.isfile(json_path) else config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {item.get("name"): item.get("template") for item in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _special_id(lookup, config: dict, key: str, fallback):
    text = _token_content(config.get(key))
    token_id = lookup(text) if text else None
    return token_id if token_id is not None else fallback


def load_hf(directory: str, description: dict, defaults: dict) -> BaseTokenizer:
    """``tokenizer.json`` (or, without it, ``tokenizer.model``) with its ``tokenizer_config.json``."""
    from tokenizers import Tokenizer

    config_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    special_map_path = os.path.join(directory, "special_tokens_map.json")
    if os.path.isfile(special_map_path):
        config = {**_read_json(special_map_path), **config}
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
        bos_id=description.get("bos_id", _special_id(lookup, config, "bos_token", defaults.get("bos_id"))),
        eos_id=description.get("eos_id", _special_id(lookup, config, "eos_token", defaults.get("eos_id"))),
        pad_id=description.get("pad_id", _special_id(lookup, config, "pad_token", defaults.get("pad_id"))),
        add_bos=description.get("add_bos", config.get("add_bos_token")),
        chat_template=description.get("chat_template") or _hf_chat_template(directory, config),
        kind="hf", description=description)
    tokenizer.extra_stop_ids = _generation_stop_ids(directory)
    return tokenizer


def _generation_stop_ids(directory: str) -> frozenset[int]:
    """``eos_token_id`` of generation_config.json (an id or a list: Llama 3 Instruct stops at several)."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return frozenset()
    value = _read_json(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return frozenset(int(v) for v in values if isinstance(v, int))


# ---------------------------------------------------------------------------------------------- sentencepiece
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
    import sentencepiece

    model_path = os.path.join(directory, description.get("model") or description.get("file") or "tokenizer.model")
    if not os.path.isfile(model_path):
        raise TokenizerError(f"{model_path} is missing; re-import the model or copy its tokenizer.model there")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.load(model_path)
    except Exception as error:
        raise TokenizerError(f"cannot load sentencepiece model {model_path}: {error}") from None
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}

    def lookup(text):
        index = processor.piece_to_id(text)
        return None if index == processor.unk_id() and text != processor.id_to_piece(index) else index

    def special(key: str, own_id: int):
        """The description's id, else tokenizer_config.json's token, else the model's own (-1: none), else the
        store config's."""
        fallback = own_id if own_id >= 0 else defaults.get(f"{key}_id")
        return description.get(f"{key}_id", _special_id(lookup, config, f"{key}_token", fallback))

    tokenizer = SentencePieceTokenizer(
        processor, bos_id=special("bos", processor.bos_id()), eos_id=special("eos", processor.eos_id()),
        pad_id=special("pad", processor.pad_id()),
        add_bos=description.get("add_bos", config.get("add_bos_token", True)),
        chat_template=description.get("chat_template") or _hf_chat_template(directory, config),
        kind="sentencepiece", description=description)
    tokenizer.extra_stop_ids = _generation_stop_ids(directory)
    return tokenizer


# ---------------------------------------------------------------------------------------------- GGUF metadata
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
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

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
    import sentencepiece

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
    return gguf_tokenizer(_read_json(path), description, defaults, path)


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


# ---------------------------------------------------------------------------------------------- tiktoken (Llama 3)
# Meta's Llama 3.1 tokenizer: 256 special tokens follow the BPE ranks, in this order, then reserved ones.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                        "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def build_tiktoken_bpe(ranks: dict[bytes, int], special: list[str], split: str = LLAMA3_SPLIT):
    """A ``tokenizers`` BPE equal to tiktoken's rank-ordered merging: every split (left, right) of a token
    whose halves are tokens becomes a merge, ranked by the merged token's rank (transformers'
    TikTokenConverter does the same)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = bytes_to_unicode()
    spell = lambda b: "".join(spelling[c] for c in b)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend((rank, ranks[a], ranks[b], a, b) for a, b in pairs)
    merges.sort()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(spell(a), spell(b)) for *_, a, b in merges],
                                   fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    base = len(ranks)
    for index, text in enumerate(special):  # appended in order, so they get ids base, base+1, ...
        backend.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if backend.token_to_id(text) != base + index:
            raise TokenizerError(f"special token {text} did not get id {base + index}")
    return backend


def load_tiktoken(directory: str, description: dict, defaults: dict) -> BaseTokenizer:
    """A Llama 3 ``tokenizer.model`` (tiktoken ranks: base64 token and rank per line) with Meta's special tokens
    and the Llama 3 chat format (Meta's folders carry no chat template)."""
    import base64

    path = os.path.join(directory, description.get("file", "tokenizer.model"))
    ranks, number = {}, 0
    try:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{path} is not a readable tiktoken rank file (line {number}: {error})") from None
    count = int(description.get("special_count", 256))
    special = LLAMA3_SPECIAL + [f"<|reserved_special_token_{2 + i}|>" for i in range(count - len(LLAMA3_SPECIAL))]
    backend = build_tiktoken_bpe(ranks, special[:count])
    base = len(ranks)
    fallback = lambda key, value: value if defaults.get(key) is None else defaults[key]  # noqa: E731
    return HFTokenizer(backend, bos_id=description.get("bos_id", fallback("bos_id", base)),
                       eos_id=description.get("eos_id", fallback("eos_id", base + 1)),
                       pad_id=description.get("pad_id", defaults.get("pad_id")), add_bos=True,
                       chat_template=description.get("chat_template", LLAMA3_CHAT_TEMPLATE), kind="tiktoken",
                       description=description)


# ---------------------------------------------------------------------------------------------- entry point
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
    print(f"warning: using the built-in byte tokenizer (UTF-8 bytes as ids 0-255; BOS, EOS, PAD 256-258) for "
          f"{store_path}: {reason}; --tokenizer PATH gives another", file=sys.stderr, flush=True)
    return ByteTokenizer()
