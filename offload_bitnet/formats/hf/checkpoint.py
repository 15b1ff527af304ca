"""Reading Hugging Face safetensors checkpoints: the files memory-mapped, the validated import plan, and the
units of the store as they stream (packed BitNet projections as latent weights or as their exact codes)."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors import safe_open

from offload_bitnet.formats.hf.config import (ARCHITECTURES, CONFIG, HFFormatError, bitnet_quantization, dtype_name,
                                              hf_architecture, key_owners, read_config_json, unit_keys)
from offload_bitnet.io.safetensors import TORCH_DTYPES
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.model.ternary import PackedTernary, latent_weight
from offload_bitnet.store.units import is_projection, unit_names, unit_shapes

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Non-parameter buffers some older checkpoints carry; recomputed from the config, so safe to drop.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def detect(path: str) -> bool:
    """A folder holding ``config.json`` and at least one ``*.safetensors`` file."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))
            and any(name.endswith(".safetensors") for name in os.listdir(path)))



def is_packed_checkpoint(path: str) -> bool:
    """Whether ``path`` is a Hugging Face BitNet folder with packed ternary weights (no master weights)."""
    if not detect(path):
        return False
    config_json = read_config_json(path)
    return (ARCHITECTURES.get(hf_architecture(config_json), None) == "bitnet"
            and bitnet_quantization(config_json)["weights"] == "packed")



class Checkpoint:
    """The safetensors files of a folder, opened memory-mapped: which file holds which tensor, and how
    the files were laid out (kept so that export can write the same layout)."""

    def __init__(self, folder: str):
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
        if code not in TORCH_DTYPES:
            raise HFFormatError(f"tensor {key} in {self.where(key)} has dtype {code}, which is not supported")
        return TORCH_DTYPES[code]

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
            for name, key in unit_keys(config, unit).items():
                if is_projection(unit, name):
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
    float_dtypes = Counter()
    for key, (unit, name) in needed.items():
        if not checkpoint.has(key):
            continue
        shape, dtype = checkpoint.shape(key), checkpoint.dtype(key)
        expected = (1,) if name.endswith(".scale") else unit_shapes(config, unit)[name]
        if packed and is_projection(unit, name):
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
            if packed and is_projection(unit, name) and packed_only:
                tensors[name] = PackedTernary(checkpoint.load(key),
                                              packed_gamma(checkpoint.load(key + "_scale"), quant["convention"]))
            elif packed and is_projection(unit, name):
                tensors[name] = latent_from_packed(checkpoint.load(key), checkpoint.load(key + "_scale"),
                                                   quant["convention"])
            else:
                tensors[name] = checkpoint.load(key).float()
        yield unit, tensors
