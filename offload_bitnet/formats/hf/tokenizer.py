"""The tokenizer files of a Hugging Face export, whatever tokenizer the store carries.

``transformers.AutoTokenizer.from_pretrained(export)`` must give the same ids and the same chat prompt as the
store's own tokenizer (``offload_bitnet.tokenizers.runtime``). What each store kind gets:

* ``hf`` (imported from a Hugging Face folder): its files as they were; ``generation_config.json`` is added
  when the source had none.
* ``sentencepiece`` (Meta ``tokenizer.model``, or ``--tokenizer`` of one): ``tokenizer.model`` and a
  ``tokenizer_config.json`` for ``LlamaTokenizer`` (special tokens, ``add_bos_token``, chat template).
* ``gguf`` with a ``gpt2`` (byte-level BPE) vocabulary: the rebuilt ``tokenizers`` tokenizer saved as
  ``tokenizer.json``, with a post-processor that adds BOS when the GGUF says ``add_bos_token``.
* ``gguf`` with a ``llama`` (sentencepiece) vocabulary: the rebuilt sentencepiece model as ``tokenizer.model``.
* ``tiktoken`` (Meta's Llama 3 ``tokenizer.model``): the rebuilt BPE as ``tokenizer.json``.
* ``byte`` (demo and blank models): no tokenizer files, since transformers has no byte tokenizer of this
  layout; only ``generation_config.json`` (BOS 256, EOS 257, PAD 258), and a note says so.

Every export gets ``generation_config.json`` with ``eos_token_id`` listing EOS and the end-of-turn ids
(``<|im_end|>``, ``<|eot_id|>``...), so ``model.generate`` stops where ``test_gen.py`` stops.
"""
from __future__ import annotations

import json
import os
import shutil

import sentencepiece
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from offload_bitnet.formats.hf.config import CONFIG, HFFormatError
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.notices import warn
from offload_bitnet.tokenizers.base import TOKENIZER_DIR, BaseTokenizer
from offload_bitnet.tokenizers.hf import HFTokenizer
from offload_bitnet.tokenizers.runtime import load_tokenizer
from offload_bitnet.tokenizers.spm import SentencePieceTokenizer

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPACE = "\u2581"  # sentencepiece's whitespace mark
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


def write_tokenizer_files(store, out_dir: str, progress: bool = True) -> list[str]:
    """Write the tokenizer files of ``store`` (a BlockStore) into ``out_dir``; returns the names written."""
    description = store.extra.get("tokenizer") or {"kind": "byte"}
    kind = description.get("kind", "byte")
    source_dir = os.path.join(store.path, description.get("dir") or TOKENIZER_DIR)
    if kind == "byte":
        if progress:
            warn("note: this store uses the built-in byte tokenizer, which transformers has no class for: the "
                 "export carries no tokenizer files (encode text as UTF-8 bytes, ids 0-255; BOS 256, EOS 257, "
                 "PAD 258), only generation_config.json")
        written = _copy_source_files(source_dir, out_dir, (GENERATION_CONFIG,))
        if GENERATION_CONFIG not in written:
            _write_json(out_dir, GENERATION_CONFIG, _generation_config(store.config, None))
            written.append(GENERATION_CONFIG)
        return written
    if kind == "hf":  # the source's own files; loaded only when a file transformers needs has to be written
        written = _copy_source_files(source_dir, out_dir, TOKENIZER_FILES)
        if TOKENIZER_CONFIG not in written and "tokenizer.json" in written:  # special tokens, chat template
            _write_json(out_dir, TOKENIZER_CONFIG,
                        _fast_tokenizer_config(load_tokenizer(store.path, description), store.config))
            written.append(TOKENIZER_CONFIG)
        if GENERATION_CONFIG not in written:
            _write_json(out_dir, GENERATION_CONFIG, _generation_config(store.config,
                                                                       load_tokenizer(store.path, description)))
            written.append(GENERATION_CONFIG)
        return written
    tokenizer = load_tokenizer(store.path, description)
    if isinstance(tokenizer, SentencePieceTokenizer):  # tokenizer.model, or a GGUF llama vocabulary
        # tokenizer.model for sentencepiece users (and llama.cpp's converter); tokenizer.json so that
        # transformers needs neither sentencepiece nor protobuf to convert it, and splits text as we do.
        with open(os.path.join(out_dir, "tokenizer.model"), "wb") as handle:
            handle.write(tokenizer.sp.serialized_model_proto())
        _with_bos_processor(tokenizer, sentencepiece_backend(tokenizer)).save(os.path.join(out_dir, "tokenizer.json"))
        _write_json(out_dir, TOKENIZER_CONFIG, _fast_tokenizer_config(tokenizer, store.config))
        written = ["tokenizer.model", "tokenizer.json", TOKENIZER_CONFIG]
    elif isinstance(tokenizer, HFTokenizer):  # gguf gpt2 vocabulary, tiktoken: a rebuilt tokenizers BPE
        _with_bos_processor(tokenizer, tokenizer.backend).save(os.path.join(out_dir, "tokenizer.json"))
        _write_json(out_dir, TOKENIZER_CONFIG, _fast_tokenizer_config(tokenizer, store.config))
        written = ["tokenizer.json", TOKENIZER_CONFIG]
    else:
        raise ValueError(f"store {store.path}: no Hugging Face form for tokenizer kind {kind!r}")
    if GENERATION_CONFIG not in written:
        _write_json(out_dir, GENERATION_CONFIG, _generation_config(store.config, tokenizer))
        written.append(GENERATION_CONFIG)
    return written


def _copy_source_files(source_dir: str, out_dir: str, names) -> list[str]:
    written = []
    for name in names:
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out_dir, name))
            written.append(name)
    return written


def _write_json(out_dir: str, name: str, data: dict):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def _generation_config(config, tokenizer: BaseTokenizer | None) -> dict:
    """bos/pad ids and every stop id (EOS first, then the end-of-turn tokens) as transformers reads them."""
    if tokenizer is None:
        bos, eos, pad, stops = config.bos_id, config.eos_id, config.pad_id, set()
    else:
        bos, eos, pad, stops = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, set(tokenizer.stop_ids)
    ids = ([eos] if eos is not None else []) + sorted(stops - {eos})
    data = {"_from_model_config": False}
    if bos is not None:
        data["bos_token_id"] = bos
    if ids:
        data["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if pad is not None:
        data["pad_token_id"] = pad
    return data


def _special_tokens(tokenizer: BaseTokenizer, unk_id: int | None) -> dict:
    # Only special (control) tokens are named: transformers treats a named token as special, so naming an
    # ordinary vocabulary entry would change how text containing it is split. (sentencepiece's <unk> is no
    # control token but is matched by the model itself, not in text.)
    tokens = {key: tokenizer.token_text(token_id) for key, token_id in (
        ("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id))}
    tokens["unk_token"] = _piece(tokenizer, unk_id)
    return tokens


def _piece(tokenizer: BaseTokenizer, token_id: int | None) -> str | None:
    """The text of a token id that is not among the special (control) tokens, e.g. sentencepiece's ``<unk>``."""
    if token_id is None:
        return None
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.sp.id_to_piece(token_id)
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.backend.id_to_token(token_id)
    return None


def _common_config(tokenizer: BaseTokenizer, config, unk_id: int | None) -> dict:
    data = {**_special_tokens(tokenizer, unk_id), "add_bos_token": tokenizer.add_bos, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": config.max_seq_len}
    if tokenizer.chat_template:
        data["chat_template"] = tokenizer.chat_template
    return data


def _fast_tokenizer_config(tokenizer: BaseTokenizer, config) -> dict:
    if isinstance(tokenizer, SentencePieceTokenizer):
        unk = tokenizer.sp.unk_id()
        added = [(index, text, True) for text, index in tokenizer.special_tokens.items()]
    else:
        unk = None
        added = [(index, token.content, token.special)
                 for index, token in tokenizer.backend.get_added_tokens_decoder().items()]
    unk = unk if unk is not None and unk >= 0 else None
    data = {"tokenizer_class": "PreTrainedTokenizerFast", **_common_config(tokenizer, config, unk)}
    data["added_tokens_decoder"] = {
        str(index): {"content": text, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                     "special": special} for index, text, special in sorted(added)}
    return data


def sentencepiece_backend(tokenizer: SentencePieceTokenizer):
    """A ``tokenizers`` BPE equal to the sentencepiece BPE model of ``tokenizer`` (transformers' LlamaConverter
    recipe: the pieces and scores as vocabulary, merges of every split of a piece into two pieces ranked by
    the merged piece's score, byte fallback), with the control tokens matched whole in text and each text
    segment between them given its own dummy-prefix space, as ``SentencePieceTokenizer.encode`` does."""
    sp = tokenizer.sp
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    merges = []
    for index in range(size):
        if sp.is_unknown(index) or sp.is_control(index) or sp.is_byte(index):
            continue
        piece, score = sp.id_to_piece(index), sp.get_score(index)
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = sp.unk_id()
    byte_fallback = any(sp.is_byte(i) for i in range(size))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                                   unk_token=sp.id_to_piece(unk) if unk >= 0 else None, fuse_unk=True,
                                   byte_fallback=byte_fallback))
    dummy_prefix = sp.encode_as_pieces("a")[0].startswith(SPACE)
    # A normalizer, not a Metaspace pre-tokenizer: Metaspace adds no prefix to text that starts with a space,
    # where sentencepiece always adds it.
    steps = [normalizers.Prepend(SPACE)] if dummy_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " ")] + ([decoders.ByteFallback()] if byte_fallback else []) + [decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                for text, _ in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])])
    return backend


def _with_bos_processor(tokenizer: BaseTokenizer, backend):
    """A copy of the backend whose post-processor adds BOS exactly when our tokenizer adds it to plain text,
    so ``AutoTokenizer(...)(text)`` gives the ids ``tokenizer.encode(text, bos=tokenizer.add_bos)`` gives."""
    backend = Tokenizer.from_str(backend.to_str())
    bos = tokenizer.token_text(tokenizer.bos_id) or _piece(tokenizer, tokenizer.bos_id)
    if tokenizer.add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)])
    elif isinstance(tokenizer, HFTokenizer):
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


# ---------------------------------------------------------------------------------------------- source folders
def tokenizer_files(folder: str) -> list[str]:
    return [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))]


def describe_tokenizer(folder: str) -> dict | None:
    """``manifest["extra"]["tokenizer"]`` for the tokenizer files of ``folder`` (None when it has none)."""
    files = tokenizer_files(folder)
    if "tokenizer.json" in files:
        kind = "hf"
    elif "tokenizer.model" in files:
        kind = "sentencepiece"
    else:
        return None
    description = {"kind": kind, "dir": "tokenizer", "files": files}
    if kind == "sentencepiece":
        description["model"] = "tokenizer.model"
    return description


def tokenizer_token_count(folder: str) -> tuple[int, str] | None:
    """How many token ids the tokenizer of ``folder`` can produce (highest id + 1) and the file that says so;
    None when there is no tokenizer or its size cannot be read here (its loader reports that later)."""
    json_path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(json_path):
        try:
            with open(json_path, encoding="utf-8") as handle:
                data = json.load(handle)
            vocab = (data.get("model") or {}).get("vocab") or {}
            # BPE/WordPiece/WordLevel map token -> id; Unigram lists [piece, score] by id.
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
            ids += [token["id"] for token in data.get("added_tokens") or [] if isinstance(token, dict)]
            ids = [i for i in ids if isinstance(i, int)]
        except (OSError, ValueError, AttributeError, TypeError, KeyError):
            return None
        return (max(ids) + 1, json_path) if ids else None
    model_path = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(model_path):
        try:
            return sentencepiece.SentencePieceProcessor(model_file=model_path).get_piece_size(), model_path
        except Exception:  # noqa: BLE001 - not a sentencepiece model: its loader reports that
            return None
    return None


def check_tokenizer_fits(folder: str, config: ModelConfig):
    """Refuse a tokenizer that produces ids past the embedding: they would index outside it in training and
    generation. (A tokenizer smaller than the embedding is normal: vocabularies are often padded.)"""
    found = tokenizer_token_count(folder)
    if found and found[0] > config.vocab_size:
        count, path = found
        raise HFFormatError(f"{path} has {count} tokens (ids up to {count - 1}), but {CONFIG} in {folder} gives the "
                            f"model only vocab_size={config.vocab_size} embedding rows: the tokenizer does not belong "
                            "to these weights. Use the tokenizer files that came with the model, or resize the "
                            "embedding (model.resize_token_embeddings) and save the model again.")



def copy_tokenizer(src_folder: str, dst_folder: str, files: list[str]):
    os.makedirs(dst_folder, exist_ok=True)
    for name in files:
        shutil.copyfile(os.path.join(src_folder, name), os.path.join(dst_folder, name))
