"""A store's tokenizer as GGUF ``tokenizer.ggml.*`` metadata, so llama.cpp tokenizes and chats as we do.

``gguf_vocabulary`` gives the same plain dict the GGUF importer keeps in ``STORE/tokenizer/gguf_tokenizer.json``
(``formats.gguf.TOKENIZER_KEYS`` names), whatever the store's tokenizer is:

* ``gguf``: the metadata it was imported with, as it is;
* ``sentencepiece`` (``tokenizer.model``): llama.cpp's ``llama`` model, pieces with scores and token types, as
  llama.cpp's ``convert_hf_to_gguf`` writes them;
* ``hf`` / ``tiktoken`` (a ``tokenizers`` byte-level BPE): llama.cpp's ``gpt2`` model with the vocabulary, merges
  and token types; the pre-tokenizer name is found as llama.cpp's converter finds it (``gguf_pre``);
* ``byte`` (demo and blank models): a ``gpt2`` vocabulary of the 256 byte symbols and no merges, which llama.cpp
  encodes to exactly our byte ids.

BOS, EOS, PAD, the end-of-turn token, ``add_bos`` and the chat template are the ones our own tokenizer uses.
``write_vocabulary`` puts such a dict into a ``gguf.GGUFWriter``.
"""
from __future__ import annotations

import hashlib
import json
import os

from offload_bitnet.formats.gguf_pre import CHECK_TEXT, PRE_TOKENIZERS
from offload_bitnet.tokenizers.base import END_OF_TURN_TOKENS, TOKENIZER_DIR, ByteTokenizer, TokenizerError
from offload_bitnet.tokenizers.gguf_rebuild import bytes_to_unicode
from offload_bitnet.tokenizers.hf import HFTokenizer
from offload_bitnet.tokenizers.runtime import load_tokenizer
from offload_bitnet.tokenizers.spm import SentencePieceTokenizer

# gguf.TokenType values (the GGUF spec's), kept as ints so the dict stays plain JSON.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gguf_vocabulary(store) -> tuple[dict, list[str]]:
    """``(metadata dict, notes)`` for the tokenizer of ``store`` (a BlockStore); TokenizerError when llama.cpp
    has no vocabulary model for it."""
    description = dict(store.extra.get("tokenizer") or {"kind": "byte"})
    kind = description.get("kind", "byte")
    notes: list[str] = []
    if kind == "byte" and store.config.vocab_size != ByteTokenizer.vocab_size:
        load_tokenizer(store.path, description)  # raises the message that says how to give a tokenizer
    tokenizer = ByteTokenizer() if kind == "byte" else load_tokenizer(store.path, description)
    if kind == "gguf":
        with open(os.path.join(store.path, description.get("dir") or TOKENIZER_DIR,
                               description.get("file", "gguf_tokenizer.json"))) as handle:
            data = json.load(handle)
    elif kind == "byte":
        data = _byte_vocabulary()
    elif isinstance(tokenizer, SentencePieceTokenizer):
        data = _sentencepiece_vocabulary(tokenizer, store.config.vocab_size)
    elif isinstance(tokenizer, HFTokenizer):
        data = _bpe_vocabulary(tokenizer, store.config.vocab_size, notes)
    else:
        raise TokenizerError(f"store {store.path}: a {kind} tokenizer cannot be written as GGUF metadata")
    for key, value in _specials(tokenizer).items():
        # An imported GGUF's own flags stand; the ids and template are ours (a description may override them).
        if kind != "gguf" or key in ("bos_id", "eos_id", "pad_id", "chat_template") or key not in data:
            data[key] = value
    if len(data["tokens"]) < store.config.vocab_size:  # llama.cpp wants one token per embedding row
        pad = store.config.vocab_size - len(data["tokens"])
        data["tokens"] = data["tokens"] + [f"[PAD{i}]" for i in range(len(data["tokens"]), store.config.vocab_size)]
        if "token_type" in data:
            data["token_type"] = data["token_type"] + [UNUSED] * pad
        if "scores" in data:
            data["scores"] = data["scores"] + [-1000.0] * pad
    return data, notes


def _specials(tokenizer) -> dict:
    """The special ids and template our tokenizer uses (what generation stops at is what llama.cpp stops at)."""
    data = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "add_bos": bool(tokenizer.add_bos), "add_eos": False}
    data = {key: value for key, value in data.items() if value is not None}
    turn = [tokenizer.special_tokens[t] for t in END_OF_TURN_TOKENS if t in tokenizer.special_tokens]
    if turn:
        data["eot_id"] = turn[0]
    if tokenizer.chat_template:
        data["chat_template"] = tokenizer.chat_template
    return data


def _byte_vocabulary() -> dict:
    spelling = bytes_to_unicode()
    # llama.cpp refuses a gpt2 vocabulary without merges. This one merge never applies: BPE starts from single
    # characters and no other merge builds "<s>" or "</s>" (the control tokens are cut out before BPE), so every
    # byte stays its own token, as in ours. Its result takes the unused id 259.
    tokens = [spelling[b] for b in range(256)] + ["<s>", "</s>", "<pad>", "<s></s>"]
    types = [NORMAL] * 256 + [CONTROL, CONTROL, CONTROL, UNUSED]
    return {"model": "gpt2", "pre": "default", "tokens": tokens, "token_type": types, "merges": ["<s> </s>"]}


def _sentencepiece_vocabulary(tokenizer: SentencePieceTokenizer, vocab_size: int) -> dict:
    """llama.cpp's ``llama`` (SPM) vocabulary, as ``convert_hf_to_gguf``'s ``_create_vocab_sentencepiece``."""
    sp = tokenizer.sp
    tokens, scores, types = [], [], []
    for index in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(index))
        scores.append(float(sp.get_score(index)))
        types.append(UNKNOWN if sp.is_unknown(index) else CONTROL if sp.is_control(index) else
                     UNUSED if sp.is_unused(index) else BYTE if sp.is_byte(index) else NORMAL)
    extra = {i: t for t, i in tokenizer.special_tokens.items() if i >= len(tokens)}
    for index in range(len(tokens), min(vocab_size, max(extra, default=-1) + 1)):
        tokens.append(extra.get(index, f"[PAD{index}]"))
        scores.append(-1000.0)
        types.append(CONTROL if index in extra else UNUSED)
    data = {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "token_type": types,
            "add_space_prefix": _adds_dummy_prefix(sp)}
    if sp.unk_id() >= 0:
        data["unk_id"] = sp.unk_id()
    return data


def _adds_dummy_prefix(sp) -> bool:
    """Whether the sentencepiece model prepends a space to the text (``normalizer_spec.add_dummy_prefix``)."""
    ids = sp.encode("a")
    return bool(ids) and sp.id_to_piece(ids[0]).startswith("\u2581")


def _bpe_vocabulary(tokenizer: HFTokenizer, vocab_size: int, notes: list[str]) -> dict:
    """llama.cpp's ``gpt2`` vocabulary of a byte-level BPE, as ``convert_hf_to_gguf``'s ``get_vocab_base``."""
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise TokenizerError(f"the tokenizer is a {model.get('type')} model without byte-level pre-tokenization; "
                             "llama.cpp reads such vocabularies from a sentencepiece tokenizer.model: install one "
                             "with offload-bitnet import SRC OUT --tokenizer PATH/tokenizer.model")
    vocab = backend.get_vocab(with_added_tokens=True)
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    by_id = {index: token for token, index in vocab.items()}
    size = max(vocab_size, max(by_id, default=-1) + 1)
    tokens, types = [], []
    for index in range(size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(CONTROL if added[index].get("special") else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    digest = hashlib.sha256(str(backend.encode(CHECK_TEXT).ids).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        pre = "default"
        notes.append("llama.cpp knows no pre-tokenizer for this vocabulary (its converter would not either); it "
                     "splits text with its default rules, so a few texts may tokenize differently there")
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges}


def write_vocabulary(writer, data: dict):
    """Write a vocabulary dict (``gguf_vocabulary``'s, or an imported GGUF's) into a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(data.get("model", "llama"))
    if "pre" in data:
        writer.add_tokenizer_pre(data["pre"])
    writer.add_token_list(data["tokens"])
    if "token_type" in data:
        writer.add_token_types(data["token_type"])
    if "scores" in data:
        writer.add_token_scores(data["scores"])
    if "merges" in data:
        writer.add_token_merges(data["merges"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id),
                     ("eot_id", writer.add_eot_token_id), ("eom_id", writer.add_eom_token_id)):
        if data.get(key) is not None:
            add(int(data[key]))
    for key, add in (("add_bos", writer.add_add_bos_token), ("add_eos", writer.add_add_eos_token),
                     ("add_space_prefix", writer.add_add_space_prefix)):
        if key in data:
            add(bool(data[key]))
    if data.get("chat_template"):
        writer.add_chat_template(data["chat_template"])
