"""Writing a store as a Meta checkpoint: ``consolidated.NN.pth`` + ``params.json`` (+ ``tokenizer.model``)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch

from offload_bitnet.formats.meta.checkpoint import (PARAMS, SHARD_PATTERN, TOKENIZER, MetaFormatError, canonical_keys,
                                                    full_shapes, shard_shape, split_dims, unit_keys, unpermute_rope)
from offload_bitnet.model.config import ModelConfig, llama_hidden_dim
from offload_bitnet.progress import Progress
from offload_bitnet.store.blockstore import DTYPES, BlockStore
from offload_bitnet.store.layout import Layout

SCRATCH_ALIGN = 64


def params_for_config(config: ModelConfig) -> dict:
    """A ``params.json`` describing ``config`` (for stores that did not come from a Meta checkpoint)."""
    if config.head_dim * config.n_heads != config.dim:
        raise MetaFormatError(f"head_dim {config.head_dim} x n_heads {config.n_heads} != dim {config.dim}: Meta's "
                              "format cannot describe this model; export it as hf instead")
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size}
    # Meta derives the MLP width from (multiple_of, ffn_dim_multiplier); find values that give ours.
    base = int(2 * 4 * config.dim / 3)
    candidates = [(config.multiple_of, config.ffn_dim_multiplier)]
    candidates += [(1, (config.hidden_dim + nudge) / base) for nudge in (0.0, 0.25, 0.5)]
    for multiple_of, multiplier in candidates:
        if llama_hidden_dim(config.dim, multiple_of, multiplier) == config.hidden_dim:
            params["multiple_of"] = multiple_of
            if multiplier is not None:
                params["ffn_dim_multiplier"] = multiplier
            break
    else:
        raise MetaFormatError(f"hidden_dim {config.hidden_dim} cannot be expressed with Meta's multiple_of / "
                              "ffn_dim_multiplier rule; export as hf instead")
    params.update(norm_eps=config.norm_eps, rope_theta=config.rope_theta)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
        if scaling.get("factor", 8.0) != 8.0:
            params["rope_scaling_factor"] = scaling["factor"]
    elif scaling:
        raise MetaFormatError(f"rope scaling {scaling} has no Meta params.json equivalent; export as hf instead")
    params["max_seq_len"] = config.max_seq_len
    return params


def export_from_store(store: BlockStore, out_dir: str, n_shards: int | None = None, dtype: str | None = None,
                      embed_split_dim: int | None = None, progress: bool = True) -> str:
    """Write ``store`` as a Meta checkpoint: ``consolidated.NN.pth`` + ``params.json`` (+ ``tokenizer.model``).

    Defaults reproduce the imported checkpoint (shard count, dtype, key order, split dims, params.json text).
    Memory stays at about one unit: a single pass over the store appends every shard's slice of each tensor
    to a per-shard scratch file in ``out_dir``; each shard is then saved from a memory map of its scratch file
    (so the store is read once, not once per shard) and the scratch file deleted. Temporary disk: one copy of
    the exported model, shrinking as shards complete.
    """
    config = store.config
    if config.arch != "llama":
        raise MetaFormatError(f"store {store.path} holds a {config.arch} model (relu² MLP and sub-norms); Meta's "
                              "llama format cannot hold it. Export it with format='hf-bitnet' instead.")
    source = store.extra.get("source", {})
    if source.get("format") != "meta":
        source = {}
    n_shards = n_shards or source.get("n_shards", 1)
    embed_split = source.get("embed_split_dim", 1) if embed_split_dim is None else embed_split_dim
    main_dtype = dtype or source.get("dtype") or store.settings.shadow_dtype
    if main_dtype not in DTYPES:
        raise MetaFormatError(f"dtype must be one of {sorted(DTYPES)}, got {main_dtype!r}")
    key_dtypes = {} if dtype else dict(source.get("dtypes", {}))
    params_text = source.get("params_text") or json.dumps(params_for_config(config)) + "\n"
    if config.head_dim * config.n_heads != config.dim:
        raise MetaFormatError(f"head_dim x n_heads != dim in store {store.path}; export it as hf instead")
    shapes, splits = full_shapes(config), split_dims(config, embed_split)
    uneven = sorted({key.split(".", 2)[-1] for key, shape in shapes.items()
                     if shard_shape(shape, splits[key], n_shards) is None})
    if uneven or config.n_kv_heads % n_shards:
        raise MetaFormatError(f"cannot cut this model into {n_shards} shards: {uneven or ['n_kv_heads']} "
                              "do not divide evenly; choose another n_shards")
    os.makedirs(out_dir, exist_ok=True)
    clash = [n for n in os.listdir(out_dir) if SHARD_PATTERN.match(n) or n == PARAMS]
    if clash:
        raise MetaFormatError(f"{out_dir} already holds {clash[0]}; export into an empty or new folder")
    extra_tensors = source.get("extra_tensors", {})
    keys = source.get("keys") or canonical_keys(config.n_layers) + list(extra_tensors)
    layout = Layout(store.settings)

    scratch_dir = os.path.join(out_dir, ".export-scratch")
    os.makedirs(scratch_dir, exist_ok=True)
    scratch_paths = [os.path.join(scratch_dir, f"shard{s:02d}.bin") for s in range(n_shards)]
    index: list[dict[str, tuple[int, tuple, str]]] = [{} for _ in range(n_shards)]
    bar = Progress(len(store.units) + n_shards, f"exporting {store.path} to Meta format") if progress else None
    try:
        handles = [open(path, "wb") for path in scratch_paths]
        try:
            for done, unit in enumerate(store.units):
                weights = store.read(unit, "weights")
                shadow = store.read(unit, "shadow") if store.has_part(unit, "shadow") else None
                # As stored (16-bit or fp32), without an fp32 copy of the whole unit; qat: the shadow holds the
                # trained weights (the packed codes are derived from it); packed-only: their latent weights.
                masters = layout.masters(unit, weights, shadow, "cpu", dtype=None)
                targets = [unit] + (["head"] if unit == "embed" and config.tie_embeddings else [])
                for target in targets:  # a tied embedding is written as both tok_embeddings and output
                    for name, (key, split) in unit_keys(config, target, embed_split).items():
                        key_dtype = key_dtypes.get(key, main_dtype)
                        tensor = masters[name].to(DTYPES[key_dtype])
                        if name == "q_proj":
                            tensor = unpermute_rope(tensor, config.n_heads)
                        elif name == "k_proj":
                            tensor = unpermute_rope(tensor, config.n_kv_heads)
                        pieces = [tensor] * n_shards if split is None else tensor.chunk(n_shards, dim=split)
                        for shard, piece in enumerate(pieces):
                            data = piece.contiguous().view(torch.uint8).numpy()
                            handle = handles[shard]
                            offset = -handle.tell() % SCRATCH_ALIGN
                            handle.write(b"\0" * offset)
                            index[shard][key] = (handle.tell(), tuple(piece.shape), key_dtype)
                            handle.write(data)  # the array's buffer, no bytes copy
                        del tensor, pieces
                del weights, shadow, masters
                if bar:
                    bar.update(done + 1, unit)
        finally:
            for handle in handles:
                handle.close()
        for shard in range(n_shards):
            _save_shard(out_dir, shard, scratch_paths[shard], index[shard], keys, extra_tensors)
            os.remove(scratch_paths[shard])
            if bar:
                bar.update(len(store.units) + shard + 1, f"consolidated.{shard:02d}.pth")
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    with open(os.path.join(out_dir, PARAMS), "w", encoding="utf-8") as handle:
        handle.write(params_text)
    tokenizer = store.extra.get("tokenizer") or {}
    if tokenizer.get("file"):
        path = os.path.join(store.path, "tokenizer", tokenizer["file"])
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out_dir, TOKENIZER))
    return out_dir


def _save_shard(out_dir: str, shard: int, scratch: str, index: dict, keys: list[str], extra_tensors: dict):
    """Save one ``consolidated.NN.pth`` from its scratch file, one storage per tensor as Meta's files have."""
    mapped = np.memmap(scratch, dtype=np.uint8, mode="c") if os.path.getsize(scratch) else None
    state = {}
    for key in keys:
        if key in index:
            offset, shape, dtype_name = index[key]
            dtype = DTYPES[dtype_name]
            nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            # from_numpy of a slice gives each tensor its own storage over the mapping: no copy in memory, and
            # torch.save writes one record per tensor.
            state[key] = torch.from_numpy(mapped[offset:offset + nbytes]).view(dtype).view(shape)
        elif key in extra_tensors:
            spec = extra_tensors[key]
            state[key] = torch.tensor(spec["values"], dtype=torch.float32).to(DTYPES[spec["dtype"]]).reshape(spec["shape"])
        else:
            raise MetaFormatError(f"the store's source record lists tensor {key!r}, which the store does not hold")
    name = f"consolidated.{shard:02d}.pth"
    # Saved under its final name in a private folder (torch names the archive after the file), then moved in.
    tmp_dir = os.path.join(out_dir, f".tmp-{name}")
    os.makedirs(tmp_dir, exist_ok=True)
    try:
        torch.save(state, os.path.join(tmp_dir, name))
        del state, mapped
        os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
