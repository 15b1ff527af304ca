"""Hugging Face model folders (``config.json`` + ``*.safetensors``) in and out of block stores.

Supported architectures: ``LlamaForCausalLM``, ``MistralForCausalLM`` (the same math; the sliding window is
not applied, see ``config_from_hf``) and ``BitNetForCausalLM`` (latent weights, or packed ternary weights in
either of transformers' conventions).

Import reads one tensor at a time from memory-mapped safetensors files and hands the store one unit at a
time; export writes every shard's header first and then each tensor at its offset as its unit streams by, so
neither direction ever holds more than one unit of the model in memory.

Packed BitNet checkpoints hold uint8 ``[out/4, in]`` codes and a per-tensor ``weight_scale``:

* ``linear_class: autobitlinear`` (offline): ``W = codes * weight_scale``;
* ``linear_class: bitlinear`` (e.g. microsoft/bitnet-b1.58-2B-4T): ``W = codes / weight_scale``.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections import Counter
from dataclasses import dataclass

import torch

from offload_bitnet.model.config import ConfigError, ModelConfig
from offload_bitnet.store.write import default_mode
from offload_bitnet.store.layout import Layout
from offload_bitnet.progress import Progress
from offload_bitnet.store.blockstore import DTYPES, BlockStore, StoreSettings
from offload_bitnet.store.units import block_index, is_block, is_projection, unit_names
from offload_bitnet.model.ternary import PackedTernary, latent_weight, pack_weight, unpack_codes
from offload_bitnet.tokenizers.runtime import load_tokenizer
from offload_bitnet.formats.hf_tokenizer import write_tokenizer_files
from offload_bitnet.formats.importing import check_target, import_units

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "BitNetForCausalLM": "bitnet"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "bitnet": "BitNetForCausalLM"}
ACTIVATIONS = {"llama": "silu", "bitnet": "relu2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
# Non-parameter buffers some older checkpoints carry; recomputed from the config, so safe to drop.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Where each block tensor lives in a transformers state dict (without the "model.layers.N." prefix).
BLOCK_KEYS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj", "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm", "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                      "BOOL": torch.bool}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
SHADOW_FOR_DTYPE = {torch.float32: "fp32", torch.float64: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class HFFormatError(ValueError):
    """A Hugging Face folder cannot be read or written; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------- config
def config_from_hf(config_json: dict, source: str = CONFIG) -> ModelConfig:
    """The ``ModelConfig`` of a transformers ``config.json`` dict.

    Reads GQA (``num_key_value_heads``), ``head_dim``, ``tie_word_embeddings``, RoPE (``rope_theta`` and
    ``rope_scaling``, or transformers 5's ``rope_parameters``; default, linear and llama3 types) and token ids.
    Mistral's ``sliding_window`` is not applied (attention is fully causal, identical for sequences no longer
    than the window); it is kept in ``extra["sliding_window"]``. Raises ConfigError naming ``source``.
    """
    architecture = hf_architecture(config_json, source)
    arch = ARCHITECTURES[architecture]

    def need(key):
        if config_json.get(key) is None:
            raise ConfigError(f"{source}: {architecture} config has no {key!r}; the file is incomplete")
        return config_json[key]

    activation = config_json.get("hidden_act", ACTIVATIONS[arch])
    if activation != ACTIVATIONS[arch]:
        raise ConfigError(f"{source}: {architecture} with hidden_act {activation!r} is not supported "
                          f"(only {ACTIVATIONS[arch]!r})")
    for flag in ("attention_bias", "mlp_bias"):
        if config_json.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported (the engine has no bias terms)")
    if arch == "bitnet":
        bitnet_quantization(config_json, source)  # raises on quantization settings the engine cannot run
    elif config_json.get("quantization_config"):
        method = config_json["quantization_config"].get("quant_method")
        raise ConfigError(f"{source}: quantized {architecture} checkpoints ({method}) are not supported; "
                          "give the full-precision model")
    default_theta = 500000.0 if arch == "bitnet" else 10000.0
    rope_theta, rope_scaling = _rope_from_hf(config_json, default_theta, source)
    eos = config_json.get("eos_token_id")
    extra = {}
    if isinstance(eos, list):
        extra["eos_ids"] = list(eos)
        eos = eos[0] if eos else None
    if config_json.get("sliding_window") is not None:
        extra["sliding_window"] = config_json["sliding_window"]
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    return ModelConfig(
        arch=arch, vocab_size=need("vocab_size"), dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=config_json.get("num_key_value_heads") or n_heads, hidden_dim=need("intermediate_size"),
        head_dim=config_json.get("head_dim") or dim // n_heads,
        norm_eps=config_json.get("rms_norm_eps", 1e-5 if arch == "bitnet" else 1e-6),
        rope_theta=float(rope_theta), rope_scaling=rope_scaling,
        tie_embeddings=bool(config_json.get("tie_word_embeddings", False)),
        max_seq_len=config_json.get("max_position_embeddings", 2048),
        bos_id=config_json.get("bos_token_id"), eos_id=eos, pad_id=config_json.get("pad_token_id"),
        extra=extra,
    )


def hf_architecture(config_json: dict, source: str = CONFIG) -> str:
    """The supported architecture name a config.json declares; ConfigError naming it otherwise."""
    names = config_json.get("architectures") or []
    if not names and config_json.get("model_type") in MODEL_TYPES:
        names = [MODEL_TYPES[config_json["model_type"]]]
    if not names:
        raise ConfigError(f"{source} names no architecture (no 'architectures' or known 'model_type'); "
                          f"supported: {', '.join(ARCHITECTURES)}")
    for name in names:
        if name in ARCHITECTURES:
            return name
    raise ConfigError(f"{source}: architecture {', '.join(map(str, names))} is not supported; "
                      f"supported: {', '.join(ARCHITECTURES)}")


def bitnet_quantization(config_json: dict, source: str = CONFIG) -> dict:
    """How a BitNet checkpoint stores its projections: ``{"weights": "latent"|"packed", "convention": ...}``."""
    quant = config_json.get("quantization_config")
    if not quant:
        return {"weights": "latent", "convention": None}
    if quant.get("quant_method", "bitnet") != "bitnet":
        raise ConfigError(f"{source}: quantization method {quant.get('quant_method')!r} is not supported for "
                          "BitNet (only 'bitnet')")
    if quant.get("use_rms_norm"):
        raise ConfigError(f"{source}: quantization_config use_rms_norm=true is not supported "
                          "(it adds a norm before every projection)")
    for module in quant.get("modules_to_not_convert") or []:
        if "proj" in module or "layers" in module:
            raise ConfigError(f"{source}: modules_to_not_convert lists {module!r}; every projection must be "
                              "ternary in this engine")
    convention = quant.get("linear_class", "bitlinear")
    if convention not in ("bitlinear", "autobitlinear"):
        raise ConfigError(f"{source}: unknown BitNet linear_class {convention!r}")
    if convention == "autobitlinear" and quant.get("quantization_mode", "offline") == "online":
        return {"weights": "latent", "convention": convention}
    return {"weights": "packed", "convention": convention}


def is_packed_checkpoint(path: str) -> bool:
    """Whether ``path`` is a Hugging Face BitNet folder with packed ternary weights (no master weights)."""
    if not detect(path):
        return False
    config_json = read_config_json(path)
    return (ARCHITECTURES.get(hf_architecture(config_json), None) == "bitnet"
            and bitnet_quantization(config_json)["weights"] == "packed")


def _rope_from_hf(config_json: dict, default_theta: float, source: str) -> tuple[float, dict | None]:
    params = config_json.get("rope_parameters")
    scaling = dict(params) if isinstance(params, dict) else dict(config_json.get("rope_scaling") or {})
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be a dict")
    theta = scaling.pop("rope_theta", None) or config_json.get("rope_theta") or default_theta
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ConfigError(f"{source}: RoPE scaling type {rope_type!r} is not supported (default, linear, llama3)")
    if rope_type == "llama3":
        # transformers' default for a missing original length is max_position_embeddings
        scaling.setdefault("original_max_position_embeddings", config_json.get("max_position_embeddings", 8192))
    return theta, {"rope_type": rope_type, **scaling}


# ---------------------------------------------------------------------------------------------- names
def unit_keys(config: ModelConfig, unit: str) -> dict[str, str]:
    """transformers state-dict key of every tensor of one unit (``.weight`` keys)."""
    if unit == "embed":
        return {"weight": "model.embed_tokens.weight"}
    if unit == "norm":
        return {"weight": "model.norm.weight"}
    if unit == "head":
        return {"weight": "lm_head.weight"}
    layer = block_index(unit)
    names = list(config.projection_shapes) + list(config.norm_shapes)
    return {name: f"model.layers.{layer}.{BLOCK_KEYS[name]}.weight" for name in names}


def key_owners(config: ModelConfig) -> dict[str, tuple[str, str]]:
    """transformers key -> (unit, tensor name); ``lm_head.weight`` maps to the embedding when tied."""
    owners = {}
    for unit in unit_names(config):
        for name, key in unit_keys(config, unit).items():
            owners[key] = (unit, name)
    if config.tie_embeddings:
        owners["lm_head.weight"] = ("embed", "weight")
    return owners


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(value) -> torch.dtype:
    """A torch dtype from a dtype, ``"bfloat16"``/``"torch.float16"`` or a store name (``"bf16"``)."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name in DTYPES:
        return DTYPES[name]
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise HFFormatError(f"unknown floating dtype {value!r}; use float32, float16 or bfloat16")
    return dtype


# ---------------------------------------------------------------------------------------------- reading
def detect(path: str) -> bool:
    """A folder holding ``config.json`` and at least one ``*.safetensors`` file."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))
            and any(name.endswith(".safetensors") for name in os.listdir(path)))


def read_config_json(folder: str) -> dict:
    """The parsed ``config.json`` of ``folder``, with errors that say what is wrong."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise HFFormatError(f"{folder} has no {CONFIG}: a Hugging Face model folder needs its {CONFIG} next to "
                            "the *.safetensors files (download it with the weights, or write it with "
                            "model.save_pretrained)")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise HFFormatError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise HFFormatError(f"{path} does not hold a JSON object")
    return data


def read_config(folder: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder, from its ``config.json`` alone (no weights are read)."""
    return config_from_hf(read_config_json(folder), os.path.join(folder, CONFIG))


class Checkpoint:
    """The safetensors files of a folder, opened memory-mapped: which file holds which tensor, and how
    the files were laid out (kept so that export can write the same layout)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index_path = os.path.join(folder, INDEX)
        self.index_metadata = None
        if os.path.isfile(index_path):
            try:
                with open(index_path) as handle:
                    index = json.load(handle)
                weight_map = index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise HFFormatError(f"cannot read {index_path} (expected a 'weight_map'): {error}") from error
            self.index_metadata = index.get("metadata") or {}
            self.layout: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                self.layout.setdefault(file, []).append(key)
        else:
            files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
            if not files:
                raise HFFormatError(f"{folder} has no *.safetensors files; only safetensors weights are read "
                                    "(re-save the model with save_pretrained(..., safe_serialization=True))")
            self.layout = {file: None for file in files}
        self.handles = {}
        self.key_file: dict[str, str] = {}
        for file in self.layout:
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise HFFormatError(f"{INDEX} in {folder} lists {file}, which is missing; download it again")
            try:
                handle = safe_open(path, framework="pt")
            except Exception as error:  # safetensors raises its own error type for damaged files
                raise HFFormatError(f"{path} is not a readable safetensors file ({error}); it is probably "
                                    "truncated or damaged: download or copy it again") from error
            self.handles[file] = handle
            keys = list(handle.keys())
            if self.layout[file] is None:
                self.layout[file] = keys
            else:
                missing = sorted(set(self.layout[file]) - set(keys))
                if missing:
                    raise HFFormatError(f"{INDEX} says {path} holds {missing[0]}, but it does not; the index and "
                                        "the shard do not belong together")
            for key in self.layout[file]:
                if key in self.key_file:
                    raise HFFormatError(f"tensor {key} is in both {self.key_file[key]} and {file}")
                self.key_file[key] = file

    def close(self):
        """Release the memory maps."""
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles = {}

    def has(self, key: str) -> bool:
        return key in self.key_file

    def where(self, key: str) -> str:
        return os.path.join(self.folder, self.key_file[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.key_file[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        code = self.handles[self.key_file[key]].get_slice(key).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise HFFormatError(f"tensor {key} in {self.where(key)} has dtype {code}, which is not supported")
        return SAFETENSORS_DTYPES[code]

    def load(self, key: str) -> torch.Tensor:
        try:
            return self.handles[self.key_file[key]].get_tensor(key)
        except Exception as error:
            raise HFFormatError(f"cannot read tensor {key} from {self.where(key)}: {error}") from error


@dataclass
class ImportPlan:
    """What import found in a checkpoint, validated before any store file is written."""

    quant: dict | None
    main_dtype: torch.dtype
    dtype_overrides: dict[str, str]
    skipped: list[str]
    layout: dict[str, list[str]]


def plan_import(checkpoint: Checkpoint, config: ModelConfig, quant: dict | None) -> ImportPlan:
    """Check every tensor the config needs is present with the right shape; find the source dtype."""
    owners = key_owners(config)
    packed = quant is not None and quant["weights"] == "packed"
    needed = dict(owners)
    if packed:
        for unit in unit_names(config):
            if is_block(unit):
                for name, key in unit_keys(config, unit).items():
                    if name.endswith("_proj"):
                        needed[key + "_scale"] = (unit, name + ".scale")
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    for key in needed:
        if key not in optional and not checkpoint.has(key):
            raise HFFormatError(f"tensor {key} is missing from the checkpoint in {checkpoint.folder}; "
                                f"{CONFIG} describes a model that needs it")
    skipped = [k for k in checkpoint.key_file if k not in needed]
    unknown = [k for k in skipped if not k.endswith(IGNORED_SUFFIXES)]
    if unknown:
        raise HFFormatError(f"tensor {unknown[0]} in {checkpoint.where(unknown[0])} is not part of the model "
                            f"{CONFIG} describes ({len(unknown)} such tensors); it cannot be imported")
    shapes = config.block_shapes
    float_dtypes = Counter()
    for key, (unit, name) in needed.items():
        if not checkpoint.has(key):
            continue
        shape, dtype = checkpoint.shape(key), checkpoint.dtype(key)
        if name.endswith(".scale"):
            expected = (1,)
        elif is_block(unit):
            expected = shapes[name]
        elif unit == "norm":
            expected = (config.dim,)
        else:
            expected = (config.vocab_size, config.dim)
        if packed and name.endswith("_proj"):
            if dtype != torch.uint8:
                raise HFFormatError(f"tensor {key} in {checkpoint.where(key)} is {dtype_name(dtype)}; a packed "
                                    "BitNet checkpoint stores projections as uint8")
            expected = (expected[0] // 4, expected[1])
        elif not dtype.is_floating_point:
            raise HFFormatError(f"tensor {key} in {checkpoint.where(key)} has dtype {dtype_name(dtype)}; "
                                "expected a floating-point tensor")
        else:
            float_dtypes[dtype] += 1
        if shape != tuple(expected) and not (name.endswith(".scale") and shape == ()):
            raise HFFormatError(f"tensor {key} in {checkpoint.where(key)} has shape {list(shape)}, but {CONFIG} "
                                f"implies {list(expected)}; the weights and the config do not match")
    main_dtype = float_dtypes.most_common(1)[0][0]
    overrides = {}
    for key in needed:
        if checkpoint.has(key):
            dtype = checkpoint.dtype(key)
            if dtype.is_floating_point and dtype != main_dtype:
                overrides[key] = dtype_name(dtype)
    layout = {file: [k for k in keys if k in needed] for file, keys in checkpoint.layout.items()}
    return ImportPlan(quant, main_dtype, overrides, skipped, {f: ks for f, ks in layout.items() if ks})


def latent_from_packed(packed: torch.Tensor, weight_scale: torch.Tensor, convention: str) -> torch.Tensor:
    """A latent (shadow) weight whose BitNet quantization gives back exactly these codes and scale
    (``ternary.latent_weight``), from a checkpoint's ``weight_scale`` in its ``convention``."""
    return latent_weight(packed, packed_gamma(weight_scale, convention))


def packed_gamma(weight_scale: torch.Tensor, convention: str) -> torch.Tensor:
    """The fp32 gamma [1] (``W = codes * gamma``) of a checkpoint's ``weight_scale`` in its ``convention``."""
    scale = weight_scale.float().reshape(1)
    return scale if convention == "autobitlinear" else 1.0 / scale


def read_units(checkpoint: Checkpoint, config: ModelConfig, quant: dict | None, packed_only: bool = False):
    """Yield ``(unit, {name: fp32 tensor})`` in store order, one unit in memory at a time. Packed projections
    come as latent weights, or (``packed_only``: for a packed-only store) as the checkpoint's own codes and
    scale (``PackedTernary``), kept exactly."""
    packed = quant is not None and quant["weights"] == "packed"
    for unit in unit_names(config):
        tensors = {}
        for name, key in unit_keys(config, unit).items():
            if packed and name.endswith("_proj") and packed_only:
                tensors[name] = PackedTernary(checkpoint.load(key),
                                              packed_gamma(checkpoint.load(key + "_scale"), quant["convention"]))
            elif packed and name.endswith("_proj"):
                tensors[name] = latent_from_packed(checkpoint.load(key), checkpoint.load(key + "_scale"),
                                                   quant["convention"])
            else:
                tensors[name] = checkpoint.load(key).float()
        yield unit, tensors


# ---------------------------------------------------------------------------------------------- tokenizer
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
            import sentencepiece

            return sentencepiece.SentencePieceProcessor(model_file=model_path).get_piece_size(), model_path
        except Exception:  # noqa: BLE001 - not a sentencepiece model (or no sentencepiece): checked on load
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


def read_source(folder: str):
    """``(ModelConfig, tokenizer or None)``: what an import of ``folder`` would give its store, from
    ``config.json`` and the tokenizer files in the folder (no weights are read)."""
    description = describe_tokenizer(folder)
    tokenizer = load_tokenizer(folder, {**description, "dir": "."}) if description else None
    return read_config(folder), tokenizer


def copy_tokenizer(src_folder: str, dst_folder: str, files: list[str]):
    os.makedirs(dst_folder, exist_ok=True)
    for name in files:
        shutil.copyfile(os.path.join(src_folder, name), os.path.join(dst_folder, name))


# ---------------------------------------------------------------------------------------------- import
def import_to_store(src: str, out_dir: str, settings: StoreSettings | None = None, progress: bool = True) -> str:
    """Import a Hugging Face folder into a new store at ``out_dir``; returns the store path.

    Everything is validated (config, tensor names, shapes, dtypes, readable files) before the store is
    created. Default settings: mode ``qat`` for BitNet and ``full`` for Llama (``create.default_mode``) with
    the source's floating dtype as shadow dtype, so the import is lossless. A packed BitNet source (no master
    weights) becomes a packed-only store holding its codes and scales exactly; with explicit qat settings it
    gets latent shadow weights reconstructed from them (``latent_from_packed``; use an fp32 shadow so that
    they reproduce each scale to fp32 rounding).
    """
    check_target(out_dir)
    config_json = read_config_json(src)
    config = config_from_hf(config_json, os.path.join(src, CONFIG))
    quant = bitnet_quantization(config_json) if config.arch == "bitnet" else None
    check_tokenizer_fits(src, config)
    checkpoint = Checkpoint(src)
    try:
        return _import_checkpoint(src, out_dir, settings, progress, checkpoint, config, config_json, quant)
    finally:
        checkpoint.close()


def _import_checkpoint(src, out_dir, settings, progress, checkpoint, config, config_json, quant) -> str:
    architecture = hf_architecture(config_json)
    plan = plan_import(checkpoint, config, quant)
    packed_source = quant is not None and quant["weights"] == "packed"
    if settings is None:
        # A packed checkpoint has no master weights: by default it becomes a packed-only store (its codes and
        # scales as they are, embeddings in the source's dtype).
        settings = StoreSettings(mode=default_mode(config), shadow_dtype=SHADOW_FOR_DTYPE[plan.main_dtype],
                                 packed_only=packed_source)
    notes = []
    if "sliding_window" in config.extra:
        notes.append(f"sliding_window={config.extra['sliding_window']} is not applied: attention is fully causal "
                     "(identical for sequences up to the window)")
    if plan.skipped:
        notes.append(f"dropped {len(plan.skipped)} non-parameter buffers ({plan.skipped[0]}, ...)")
    source = {
        "format": "hf",
        "path": os.path.abspath(src),  # the folder peft loads as the base of this store's adapters
        "architecture": architecture,
        "dtype": dtype_name(plan.main_dtype),
        "dtype_overrides": plan.dtype_overrides,
        "weights": quant["weights"] if quant else "dense",
        "packed_convention": quant["convention"] if quant and quant["weights"] == "packed" else None,
        "shard_layout": plan.layout,
        "index_metadata": checkpoint.index_metadata,
        "config": config_json,
        "skipped": plan.skipped,
        "notes": notes,
    }
    extra = {"source": source}
    tokenizer = describe_tokenizer(src)
    if tokenizer:
        extra["tokenizer"] = tokenizer
    if progress:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    files = tokenizer_files(src)

    def add_tokenizer(folder: str):
        if files:  # generation_config.json travels along even without a tokenizer
            copy_tokenizer(src, os.path.join(folder, "tokenizer"), files)

    units = read_units(checkpoint, config, quant, packed_only=settings.packed_only)
    return import_units(out_dir, config, units, settings, extra,
                        f"importing {os.path.basename(os.path.abspath(src))}: units", add_tokenizer, progress)


# ---------------------------------------------------------------------------------------------- writing
@dataclass
class TensorSpec:
    """One tensor of an export: its key, where its value comes from, and how it is stored."""

    key: str
    unit: str
    name: str
    kind: str  # dense | packed | scale (autobitlinear: gamma) | inv_scale (bitlinear: 1 / gamma)
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Safetensors files written tensor by tensor: every header is written first (the shapes and dtypes are
    known), then each tensor goes to its offset whenever its unit comes by. Files appear under their final
    names only when complete."""

    def __init__(self, out_dir: str, files: dict[str, list[TensorSpec]]):
        self.slots = {}
        self.files = {}
        for file, specs in files.items():
            header, offset = {}, 0
            for spec in specs:
                header[spec.key] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                    "data_offsets": [offset, offset + spec.nbytes]}
                offset += spec.nbytes
            header["__metadata__"] = {"format": "pt"}
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # 8-byte aligned tensor data, as safetensors writes it
            path = os.path.join(out_dir, file)
            handle = open(path + ".partial", "wb")
            handle.write(struct.pack("<Q", len(blob)) + blob)
            handle.truncate(8 + len(blob) + offset)
            self.files[file] = (handle, path)
            start = 8 + len(blob)
            for spec in specs:
                self.slots[spec.key] = (handle, start, spec)
                start += spec.nbytes
        self.pending = set(self.slots)

    def write(self, key: str, tensor: torch.Tensor):
        handle, position, spec = self.slots[key]
        tensor = tensor.detach().to("cpu", spec.dtype).contiguous()
        if tuple(tensor.shape) != spec.shape:
            raise HFFormatError(f"internal: tensor {key} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        handle.seek(position)
        handle.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.pending.discard(key)

    def finish(self):
        if self.pending:
            raise HFFormatError(f"internal: export wrote no value for {sorted(self.pending)[:3]}")
        for handle, path in self.files.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(path + ".partial", path)

    def abort(self):
        for handle, path in self.files.values():
            handle.close()
            if os.path.exists(path + ".partial"):
                os.remove(path + ".partial")


def split_shards(specs: list[TensorSpec], count: int | None, max_bytes: int) -> dict[str, list[TensorSpec]]:
    """Group tensors, in order, into ``count`` files of about equal size (or files of at most ``max_bytes``),
    named as transformers names them."""
    total = sum(spec.nbytes for spec in specs)
    if count is None:
        count = max(1, -(-total // max_bytes))
    count = max(1, min(count, len(specs)))
    groups, current, done = [], [], 0
    for spec in specs:
        # close the group once it reaches its share of the total, keeping enough tensors for the rest
        if current and done >= total * len(groups + [current]) / count and len(groups) < count - 1:
            groups.append(current)
            current = []
        current.append(spec)
        done += spec.nbytes
    groups.append(current)
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": group for i, group in enumerate(groups)}


def write_index(out_dir: str, files: dict[str, list[TensorSpec]], metadata: dict | None):
    weight_map = {spec.key: file for file, specs in files.items() for spec in specs}
    metadata = dict(metadata or {})
    metadata["total_size"] = sum(spec.nbytes for specs in files.values() for spec in specs)
    with open(os.path.join(out_dir, INDEX), "w") as handle:
        json.dump({"metadata": metadata, "weight_map": weight_map}, handle, indent=2)
        handle.write("\n")


def generic_specs(config: ModelConfig, dtype: torch.dtype, packed: bool) -> list[TensorSpec]:
    """Every tensor of a transformers Llama/BitNet state dict, in transformers' order."""
    specs = []
    shapes = config.block_shapes
    for unit in unit_names(config):
        for name, key in unit_keys(config, unit).items():
            if is_block(unit):
                shape = tuple(shapes[name])
            elif unit == "norm":
                shape = (config.dim,)
            else:
                shape = (config.vocab_size, config.dim)
            if packed and name.endswith("_proj"):
                specs.append(TensorSpec(key, unit, name, "packed", torch.uint8, (shape[0] // 4, shape[1])))
                specs.append(TensorSpec(key + "_scale", unit, name, "scale", dtype, (1,)))
            else:
                specs.append(TensorSpec(key, unit, name, "dense", dtype, shape))
    return specs


def source_specs(store: BlockStore, dtype: torch.dtype | None) -> list[TensorSpec]:
    """The tensors of the checkpoint the store was imported from, in its recorded file order."""
    source = store.extra["source"]
    owners = key_owners(store.config)
    main = dtype or parse_dtype(source["dtype"])
    overrides = {} if dtype else source.get("dtype_overrides", {})
    packed = source.get("weights") == "packed"
    shapes = store.config.block_shapes
    specs = []
    for keys in source["shard_layout"].values():
        for key in keys:
            spec_dtype = parse_dtype(overrides[key]) if key in overrides else main
            if key.endswith("_scale"):
                unit, name = owners[key[: -len("_scale")]]
                kind = "scale" if source["packed_convention"] == "autobitlinear" else "inv_scale"
                specs.append(TensorSpec(key, unit, name, kind, spec_dtype, (1,)))
                continue
            unit, name = owners[key]
            if is_block(unit):
                shape = tuple(shapes[name])
            elif unit == "norm":
                shape = (store.config.dim,)
            else:
                shape = (store.config.vocab_size, store.config.dim)
            if packed and name.endswith("_proj"):
                specs.append(TensorSpec(key, unit, name, "packed", torch.uint8, (shape[0] // 4, shape[1])))
            else:
                specs.append(TensorSpec(key, unit, name, "dense", spec_dtype, shape))
    return specs


def unit_values(store: BlockStore, layout: Layout, unit: str, need_packed: bool):
    """fp32 masters of a unit and, for ternary projections, (packed codes, gamma) as the forward uses them."""
    weights = store.read(unit, "weights")
    shadow = store.read(unit, "shadow") if store.has_part(unit, "shadow") else None
    masters = layout.masters(unit, weights, shadow, "cpu")
    packed = {}
    if need_packed:
        for name, master in masters.items():
            if f"{name}.packed" in weights:
                packed[name] = (weights[f"{name}.packed"], weights[f"{name}.scale"].float())
            elif is_projection(unit, name):
                packed[name] = pack_weight(master)  # a full-mode store: quantize on the way out
    return masters, packed


def spec_value(spec: TensorSpec, masters: dict, packed: dict) -> torch.Tensor:
    if spec.kind == "dense":
        return masters[spec.name]
    codes, gamma = packed[spec.name]
    if spec.kind == "packed":
        return codes
    return gamma.reshape(1) if spec.kind == "scale" else 1.0 / gamma.reshape(1)


# ---------------------------------------------------------------------------------------------- export
def hf_config(config: ModelConfig, dtype: torch.dtype, quantization: dict | None = None) -> dict:
    """A transformers ``config.json`` dict for a store's config (Llama, or BitNet for ``arch="bitnet"``)."""
    architecture = "BitNetForCausalLM" if config.arch == "bitnet" else "LlamaForCausalLM"
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        scaling = dict(config.rope_scaling)
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
        if scaling["rope_type"] == "llama3":
            # transformers requires every llama3 field; write the defaults model.rope_inverse_frequencies uses
            for key, value in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                               ("original_max_position_embeddings", 8192)):
                scaling.setdefault(key, value)
        rope.update(scaling)
    eos = config.extra.get("eos_ids", config.eos_id)
    data = {
        "architectures": [architecture],
        "model_type": "bitnet" if config.arch == "bitnet" else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": ACTIVATIONS[config.arch],
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # read by transformers 4; transformers 5 reads rope_parameters
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_id,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),
    }
    if config.rope_scaling:
        data["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if config.arch == "llama":
        data["mlp_bias"] = False
    if quantization is not None:
        data["quantization_config"] = quantization
    return data


def export_from_store(store: BlockStore, out_dir: str, bitnet: bool = False, dtype=None, shards: int | None = None,
                      source: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = True) -> str:
    """Write a store as a Hugging Face folder at ``out_dir``; returns ``out_dir``.

    What is written:

    * ``bitnet=True``: ``BitNetForCausalLM`` with packed ternary projections in transformers' offline
      ``autobitlinear`` layout (uint8 ``[out/4, in]`` + ``weight_scale`` [1], ``W = codes * weight_scale``),
      the exact codes and scales the engine's forward uses. Needs an ``arch="bitnet"`` store.
    * otherwise, a store imported from Hugging Face (and ``source=True``): the source format back: the same
      architecture, ``config.json``, key names, dtypes and file/index layout (packed sources packed again, in
      their own convention).
    * otherwise, full precision: ``LlamaForCausalLM`` for a Llama store; for a BitNet store
      ``BitNetForCausalLM`` with its latent weights and an ``online`` ``autobitlinear`` quantization_config
      (transformers then quantizes on the fly, as this engine does; a packed-only store writes the latent weights
      of its codes, ``ternary.latent_weight``, which quantize back to them). A Llama store in ``qat`` mode exports its
      latent (shadow) weights as they are: the trained model is their ternary quantization, which
      ``LlamaForCausalLM`` does not apply, so its outputs differ (a note says so).

    ``dtype`` overrides the floating dtype (default: the source's, else the store's shadow dtype); ``shards``
    sets the number of safetensors files (default: the source's layout, else files of ``max_shard_bytes``).
    Tensors are streamed unit by unit into pre-sized shard files; the tokenizer files transformers loads are
    written along (``formats.hf_tokenizer``: tokenizer.json or tokenizer.model, tokenizer_config.json,
    generation_config.json), whatever the store was imported from.
    ``formats.export_model`` formats ``source`` and ``hf`` both arrive here without options, so a store
    imported from Hugging Face gets its source layout either way; ``source=False`` forces the generic export.
    """
    config = store.config
    dtype = parse_dtype(dtype) if dtype is not None else None
    from_source = "source" in store.extra and store.extra["source"].get("format") == "hf" and source and not bitnet
    if bitnet and config.arch != "bitnet":
        raise HFFormatError(f"store {store.path} is a {config.arch} model; a packed BitNetForCausalLM export needs "
                            "an arch='bitnet' store (export it without bitnet=True for LlamaForCausalLM)")
    if config.arch == "llama" and store.settings.mode == "qat" and progress:
        print("note: this qat store is exported with its latent (shadow) weights in full precision; "
              "LlamaForCausalLM does not apply the ternary quantization the store was trained with",
              file=sys.stderr)
    if from_source:
        recorded = store.extra["source"]
        specs = source_specs(store, dtype)
        if shards is None:
            by_key = {spec.key: spec for spec in specs}
            files = {file: [by_key[k] for k in keys] for file, keys in recorded["shard_layout"].items()}
            index_metadata = recorded.get("index_metadata")
        else:
            files = split_shards(specs, shards, max_shard_bytes)
            index_metadata = {}
        config_json = dict(recorded["config"])
        if dtype is not None:
            for key in ("dtype", "torch_dtype"):
                if key in config_json:
                    config_json[key] = dtype_name(dtype)
        write_index_file = index_metadata is not None or len(files) > 1
    else:
        dtype = dtype or DTYPES[store.settings.shadow_dtype]
        quantization = None
        if config.arch == "bitnet" and (bitnet or store.settings.mode == "qat"):
            quantization = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                            "quantization_mode": "offline" if bitnet else "online",
                            "modules_to_not_convert": ["lm_head"], "use_rms_norm": False, "rms_norm_eps": 1e-6}
        specs = generic_specs(config, dtype, packed=bitnet)
        files = split_shards(specs, shards, max_shard_bytes)
        config_json = hf_config(config, dtype, quantization)
        index_metadata = {}
        write_index_file = len(files) > 1

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise HFFormatError(f"{out_dir} exists and is not empty; export into a new or empty folder")
    os.makedirs(out_dir, exist_ok=True)
    by_unit: dict[str, list[TensorSpec]] = {}
    for specs_of_file in files.values():
        for spec in specs_of_file:
            by_unit.setdefault(spec.unit, []).append(spec)
    layout = Layout(store.settings)
    writer = ShardWriter(out_dir, files)
    bar = Progress(len(store.units), f"exporting to {out_dir}: units") if progress else None
    try:
        for done, unit in enumerate(store.units, 1):
            unit_specs = by_unit.get(unit, [])
            need_packed = any(spec.kind != "dense" for spec in unit_specs)
            masters, packed = unit_values(store, layout, unit, need_packed)
            for spec in unit_specs:
                writer.write(spec.key, spec_value(spec, masters, packed))
            del masters, packed
            if bar:
                bar.update(done, unit)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    if write_index_file:
        write_index(out_dir, files, index_metadata)
    with open(os.path.join(out_dir, CONFIG), "w") as handle:
        json.dump(config_json, handle, indent=2)
        handle.write("\n")
    write_tokenizer_files(store, out_dir, progress)
    return out_dir
