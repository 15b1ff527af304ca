"""``config.json`` <-> ModelConfig: architectures, RoPE, BitNet quantization settings, the state-dict key of
every tensor of a unit, and dtype names."""
from __future__ import annotations

import json
import os

import torch

from offload_bitnet.model.config import ConfigError, ModelConfig
from offload_bitnet.store.blockstore import DTYPES
from offload_bitnet.store.units import block_index, unit_names

CONFIG = "config.json"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "BitNetForCausalLM": "bitnet"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "bitnet": "BitNetForCausalLM"}
ACTIVATIONS = {"llama": "silu", "bitnet": "relu2"}
# Where each block tensor lives in a transformers state dict (without the "model.layers.N." prefix).
BLOCK_KEYS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj", "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm", "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}


class HFFormatError(ValueError):
    """A Hugging Face folder cannot be read or written; the message names the file or tensor."""



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
