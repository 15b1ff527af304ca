"""The tensors of a Hugging Face export and the safetensors files they go to, written tensor by tensor."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from offload_bitnet.formats.hf.checkpoint import INDEX, SINGLE_FILE
from offload_bitnet.formats.hf.config import HFFormatError, key_owners, parse_dtype, unit_keys
from offload_bitnet.io.safetensors import SAFETENSORS_DTYPES
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.model.ternary import pack_weight
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.layout import Layout
from offload_bitnet.store.units import is_projection, unit_names, unit_shapes

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


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
                header[spec.key] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
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
    for unit in unit_names(config):
        for name, key in unit_keys(config, unit).items():
            shape = tuple(unit_shapes(config, unit)[name])
            if packed and is_projection(unit, name):
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
            shape = tuple(unit_shapes(store.config, unit)[name])
            if packed and is_projection(unit, name):
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
