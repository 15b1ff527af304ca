"""GGUF (llama.cpp) import into a block store, and export back to GGUF.

Import reads a ``llama`` GGUF tensor by tensor through ``gguf.GGUFReader`` (the file is memory-mapped),
dequantizes each tensor with ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and
every other type that package can read), undoes llama.cpp's q/k row permutation, and hands one unit at a
time to the import skeleton (``formats.importing``). The tokenizer (vocabulary, merges, scores, special ids,
chat template) is copied verbatim from the metadata into ``STORE/tokenizer/gguf_tokenizer.json``;
``tokenizers.runtime`` rebuilds a working tokenizer from it.

Export (of any store, not only GGUF-imported ones) lives in ``gguf_export``; it reuses ``permute_qk`` here.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from importlib.metadata import version

import numpy as np
import torch

from offload_bitnet.formats.importing import check_target, import_units
from offload_bitnet.model.block import rope_inverse_frequencies
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.store.blockstore import StoreSettings
from offload_bitnet.store.units import block_unit
from offload_bitnet.tokenizers.runtime import load_tokenizer

TOKENIZER_FILE = "gguf_tokenizer.json"

# GGUF tensor name (inside ``blk.N.``) -> transformers short name used by the store.
BLOCK_TENSORS = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {"token_embd.weight": ("embed", "weight"), "output_norm.weight": ("norm", "weight"),
                  "output.weight": ("head", "weight")}
# Tensors the importer understands without storing them (llama3 rope factors become config.rope_scaling).
AUXILIARY_TENSORS = {"rope_freqs.weight"}

# tokenizer.ggml.* keys copied into the store's tokenizer file (key suffix -> our name).
TOKENIZER_KEYS = {
    "model": "model", "pre": "pre", "tokens": "tokens", "token_type": "token_type", "scores": "scores",
    "merges": "merges", "bos_token_id": "bos_id", "eos_token_id": "eos_id", "unknown_token_id": "unk_id",
    "padding_token_id": "pad_id", "eot_token_id": "eot_id", "eom_token_id": "eom_id",
    "add_bos_token": "add_bos", "add_eos_token": "add_eos", "add_space_prefix": "add_space_prefix",
}


class GGUFError(ValueError):
    """A GGUF file cannot be imported; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------- q/k permutation
def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation of q/k rows (``convert_hf_to_gguf.LlamaModel.permute``): within each head, the
    half-split rotary layout (transformers) becomes the interleaved-pairs layout (llama.cpp)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Exact inverse of ``permute_qk``: reshape to (head, pair, 2) and swap the last two row axes back."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


# ---------------------------------------------------------------------------------------------- reading
def detect(path: str) -> bool:
    """A file whose first four bytes are the GGUF magic."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def open_reader(path: str):
    """``gguf.GGUFReader`` over ``path``, with truncation and corruption turned into a GGUFError."""
    import gguf  # lazy (here and below): detect_format loads this module for every model path, gguf costs ~0.4 s

    name = os.path.basename(path)
    if not detect(path):
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # the reader raises ValueError, IndexError, KeyError... on damaged headers
        raise GGUFError(f"{path} is a damaged or truncated GGUF file ({type(error).__name__}: {error}); "
                        f"download {name} again") from None
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise GGUFError(f"{path} is truncated: tensor {tensor.name} needs bytes up to {end}, the file has "
                            f"{size}; download {name} again")
    return reader


def field_value(reader, key: str, default=None):
    """A metadata value as a Python scalar, string or list (strings decoded as UTF-8, bad bytes replaced)."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return default
    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if main == gguf.GGUFValueType.BOOL else value


def dequantized(path: str, tensor) -> torch.Tensor:
    """One GGUF tensor as fp32, shaped [rows, cols] as transformers stores it (GGUF lists dims reversed)."""
    from gguf import quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf "
                        f"{_gguf_version()} cannot dequantize; re-quantize the model to Q8_0, Q4_K or F16") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(values, dtype=np.float32)
    if values.size != math.prod(shape):
        raise GGUFError(f"{path}: tensor {tensor.name} holds {values.size} values, its shape {shape} needs "
                        f"{math.prod(shape)}; the file is damaged")
    result = torch.from_numpy(values.reshape(shape).copy())
    if not torch.isfinite(result).all():
        raise GGUFError(f"{path}: tensor {tensor.name} contains NaN or infinite values; the file is damaged")
    return result


def _gguf_version() -> str:
    try:
        return version("gguf")
    except Exception:
        return "(unknown version)"


# ---------------------------------------------------------------------------------------------- config
def read_config(path: str, reader=None) -> ModelConfig:
    """The ModelConfig the metadata of a llama GGUF describes (the header only: tensor data is not read)."""
    reader = reader if reader is not None else open_reader(path)
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path} holds a {arch!r} model; only the 'llama' architecture (LLaMA, Mistral, SmolLM, "
                        "TinyLlama...) can be imported from GGUF")

    def need(key):
        value = field_value(reader, f"llama.{key}")
        if value is None:
            raise GGUFError(f"{path} has no llama.{key} metadata; the file is incomplete")
        return value

    names = {t.name: t for t in reader.tensors}
    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = field_value(reader, "llama.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        if len(set(n_kv)) != 1:
            raise GGUFError(f"{path} has a different number of kv heads per layer ({sorted(set(n_kv))}); "
                            "this is not supported")
        n_kv = n_kv[0]
    head_dim = int(field_value(reader, "llama.attention.key_length", dim // n_heads))
    rope_dim = int(field_value(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"{path} rotates only {rope_dim} of {head_dim} head dimensions (partial rotary); "
                        "this is not supported")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab = field_value(reader, "llama.vocab_size")
    if vocab is None:
        vocab = int(names["token_embd.weight"].shape[1]) if "token_embd.weight" in names else len(tokens or [])
    hidden = need("feed_forward_length")
    if isinstance(hidden, list):
        hidden = hidden[0]
    config = ModelConfig(
        arch="llama", vocab_size=int(vocab), dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
        n_kv_heads=int(n_kv), hidden_dim=int(hidden), head_dim=head_dim,
        norm_eps=float(field_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field_value(reader, "llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(field_value(reader, "llama.context_length", 4096)),
        bos_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_id=field_value(reader, "tokenizer.ggml.padding_token_id"),
    )
    config.rope_scaling = read_rope_scaling(path, reader, config)
    if tokens is not None and len(tokens) > config.vocab_size:
        raise GGUFError(f"{path} has {len(tokens)} tokenizer tokens but only {config.vocab_size} embedding rows: "
                        "the file is inconsistent; re-convert it with llama.cpp")
    return config


def read_rope_scaling(path: str, reader, config: ModelConfig) -> dict | None:
    """``rope_scaling`` from ``llama.rope.scaling.*`` or, for Llama 3.x, from the ``rope_freqs`` tensor."""
    kind = field_value(reader, "llama.rope.scaling.type")
    if kind in ("linear",):
        return {"rope_type": "linear", "factor": float(field_value(reader, "llama.rope.scaling.factor", 1.0))}
    if kind not in (None, "none"):
        raise GGUFError(f"{path} uses rope scaling {kind!r}; supported: linear, llama3 (rope_freqs)")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is None:
        return None
    # llama.cpp divides each inverse frequency by the stored factor. Recover transformers' llama3 parameters
    # (factor = the largest factor; the usual 1/4/8192 shape) and accept them only if they reproduce it exactly.
    factors = dequantized(path, rope_freqs).reshape(-1)
    base = dict(config.to_dict(), rope_scaling=None)
    plain = rope_inverse_frequencies(ModelConfig(**base))
    original = int(field_value(reader, "llama.rope.scaling.original_context_length", 8192))
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    scaled = rope_inverse_frequencies(ModelConfig(**dict(base, rope_scaling=scaling)))
    if factors.shape != plain.shape or not torch.allclose(plain / factors, scaled, rtol=1e-4):
        raise GGUFError(f"{path} has rope_freqs factors that match no llama3 rope scaling this tool knows")
    return scaling


# ---------------------------------------------------------------------------------------------- tokenizer
def read_tokenizer(reader) -> dict:
    """Everything ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` say, in plain JSON types."""
    data = {}
    for key, name in TOKENIZER_KEYS.items():
        value = field_value(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            data[name] = value
    template = field_value(reader, "tokenizer.chat_template")
    if template is not None:
        data["chat_template"] = template
    return data


def tokenizer_description(data: dict) -> dict:
    """The manifest's ``extra["tokenizer"]`` for GGUF tokenizer metadata saved by ``write_tokenizer``."""
    return {"kind": "gguf", "file": TOKENIZER_FILE, "model": data.get("model"), "pre": data.get("pre")}


def write_tokenizer(store_dir: str, data: dict):
    """Save the tokenizer metadata as ``STORE/tokenizer/gguf_tokenizer.json``."""
    directory = os.path.join(store_dir, "tokenizer")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, TOKENIZER_FILE), "w") as handle:
        json.dump(data, handle)


def read_source(path: str):
    """``(ModelConfig, tokenizer)`` an import of ``path`` would give its store, from the header alone (one
    parse: a big vocabulary makes it take seconds). The tokenizer is saved and loaded as the import does, in a
    temporary folder."""
    reader = open_reader(path)
    data = read_tokenizer(reader)
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as folder:
        write_tokenizer(folder, data)
        return read_config(path, reader), load_tokenizer(folder, tokenizer_description(data))


# ---------------------------------------------------------------------------------------------- import
def check_tensor_names(path: str, reader, config: ModelConfig):
    """Raise GGUFError naming unexpected or missing tensors (biases, MoE experts, a missing layer...)."""
    present = {t.name for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not config.tie_embeddings else set())
    expected |= {f"blk.{i}.{name}.weight" for i in range(config.n_layers) for name in BLOCK_TENSORS}
    unknown = sorted(present - expected - AUXILIARY_TENSORS)
    missing = sorted(expected - present)
    if unknown:
        raise GGUFError(f"{path} has tensors a llama model does not ({', '.join(unknown[:5])}); "
                        "this variant is not supported")
    if missing:
        raise GGUFError(f"{path} lacks tensors {', '.join(missing[:5])}; the file is incomplete")


def gguf_units(path: str, reader, config: ModelConfig):
    """``(unit, {name: fp32 tensor})`` in store order, dequantizing one unit's tensors at a time."""
    tensors = {t.name: t for t in reader.tensors}
    load = lambda name: dequantized(path, tensors[name])  # noqa: E731
    yield "embed", {"weight": load("token_embd.weight")}
    for index in range(config.n_layers):
        unit = {}
        for gguf_name, short in BLOCK_TENSORS.items():
            value = load(f"blk.{index}.{gguf_name}.weight")
            if short == "q_proj":
                value = unpermute_qk(value, config.n_heads)
            elif short == "k_proj":
                value = unpermute_qk(value, config.n_kv_heads)
            unit[short] = value
        yield block_unit(index), unit
    yield "norm", {"weight": load("output_norm.weight")}
    if not config.tie_embeddings:
        yield "head", {"weight": load("output.weight")}


def import_to_store(src: str, out_dir: str, settings: StoreSettings | None = None, progress: bool = True) -> str:
    """Import the llama GGUF file ``src`` into a new store at ``out_dir`` (default mode ``full``), through a
    staging folder (``formats.importing``): an interrupted import leaves nothing at ``out_dir``."""
    check_target(out_dir, GGUFError)
    reader = open_reader(src)
    config = read_config(src, reader)
    check_tensor_names(src, reader, config)
    tokenizer = read_tokenizer(reader)
    source = {
        "format": "gguf", "file": os.path.basename(src), "path": os.path.abspath(src),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "name": field_value(reader, "general.name"), "file_type": field_value(reader, "general.file_type"),
    }
    extra = {"source": source, "tokenizer": tokenizer_description(tokenizer)}
    import_units(out_dir, config, gguf_units(src, reader, config), settings, extra,
                 f"importing {os.path.basename(src)}: units", lambda folder: write_tokenizer(folder, tokenizer),
                 progress, error=GGUFError)
    return out_dir
