"""Reading Meta checkpoints (shards, ``params.json``, ``tokenizer.model``, the key layout) and importing them
into a store. The format itself is described in ``formats.meta``."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile

import sentencepiece
import torch

from offload_bitnet.formats.importing import check_target, import_units
from offload_bitnet.model.config import ConfigError, ModelConfig
from offload_bitnet.store.blockstore import DTYPES, StoreSettings
from offload_bitnet.store.units import block_index, block_unit, unit_names
from offload_bitnet.tokenizers.runtime import load_tokenizer

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# our block tensor name -> (Meta key suffix, split dimension across shards; None = replicated)
BLOCK_KEYS = {
    "q_proj": ("attention.wq.weight", 0),
    "k_proj": ("attention.wk.weight", 0),
    "v_proj": ("attention.wv.weight", 0),
    "o_proj": ("attention.wo.weight", 1),
    "gate_proj": ("feed_forward.w1.weight", 0),
    "down_proj": ("feed_forward.w2.weight", 1),
    "up_proj": ("feed_forward.w3.weight", 0),
    "input_layernorm": ("attention_norm.weight", None),
    "post_attention_layernorm": ("ffn_norm.weight", None),
}
EMBED_KEY, NORM_KEY, OUTPUT_KEY = "tok_embeddings.weight", "norm.weight", "output.weight"
# Small tensors besides the weights that Meta's checkpoints carry (llama 1/2 save ``rope.freqs``); they are
# kept verbatim in the manifest so export writes them back. Anything larger is not a llama weight we know.
MAX_EXTRA_ELEMENTS = 1 << 16
UNSUPPORTED_PARAMS = ("moe_args", "n_experts", "num_experts", "vision_chunk_size", "vision_max_num_chunks")


class MetaFormatError(ValueError):
    """A Meta checkpoint folder cannot be read or written; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------- detection
def shard_files(path: str) -> list[str]:
    """``consolidated.NN.pth`` names in ``path``, in shard order (empty when none)."""
    if not os.path.isdir(path):
        return []
    found = {}
    for name in os.listdir(path):
        match = SHARD_PATTERN.match(name)
        if match:
            found[int(match.group(1))] = name
    return [found[index] for index in sorted(found)]


def detect(path: str) -> bool:
    """A folder holding ``consolidated.NN.pth`` files (``params.json`` is checked on import, with a clear
    error, rather than silently making the folder unrecognized)."""
    return bool(shard_files(path))


# ---------------------------------------------------------------------------------------------- reading
def load_shard(path: str) -> dict[str, torch.Tensor]:
    """Open one ``.pth`` memory-mapped, refusing anything but tensors (nothing in the file is executed)."""
    if not zipfile.is_zipfile(path):
        raise MetaFormatError(f"{path} is not a zip-format PyTorch checkpoint (torch >= 1.6 torch.save); it may be "
                              "truncated or saved in the legacy format. Re-download it, or load and re-save it "
                              "with torch.save in a trusted environment.")
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        # torch's message is a page long; the line naming the refused global says what the file tried to call.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else "")
        raise MetaFormatError(f"{path} contains Python code or objects other than tensors ({detail[:200]}); it was "
                              "not executed and cannot be imported. Only plain tensor checkpoints are accepted: "
                              "re-save it as a dict of tensors in a trusted environment, or use the model's "
                              "safetensors weights.") from None
    except (RuntimeError, OSError, EOFError) as error:
        raise MetaFormatError(f"cannot read {path}: {error}. The file may be truncated; re-download it.") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MetaFormatError(f"{path} does not hold a dict of named tensors, so it is not a Meta llama shard")
    return state


def read_params(src: str) -> tuple[dict, str]:
    """``params.json`` as a dict, and its exact text (export writes it back byte for byte)."""
    path = os.path.join(src, PARAMS)
    if not os.path.isfile(path):
        raise MetaFormatError(f"{src} has consolidated.*.pth files but no {PARAMS}; copy the params.json that came "
                              "with the checkpoint into the folder (it gives dim, n_layers, n_heads, ...)")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        params = json.loads(text)
    except ValueError as error:
        raise MetaFormatError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(params, dict):
        raise MetaFormatError(f"{path} must hold a JSON object, got {type(params).__name__}")
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int):
            raise MetaFormatError(f"{path} lacks integer {key!r}; it is not a llama params.json")
    unsupported = [key for key in UNSUPPORTED_PARAMS if params.get(key)]
    if unsupported:
        raise MetaFormatError(f"{path} describes a model with {unsupported} (mixture-of-experts or vision); "
                              "only dense llama decoders can be imported")
    return params, text


def tokenizer_info(path: str) -> dict:
    """What a ``tokenizer.model`` is: SentencePiece (llama 1/2, Code Llama) or tiktoken ranks (Llama 3)."""
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=path)
        pad = processor.pad_id()
        return {"kind": "sentencepiece", "file": TOKENIZER, "vocab_size": processor.vocab_size(),
                "bos_id": processor.bos_id(), "eos_id": processor.eos_id(), "pad_id": pad if pad >= 0 else None}
    except (RuntimeError, OSError):
        pass
    with open(path, "rb") as handle:
        lines = handle.read().splitlines()
    if lines and all(len(line.split()) == 2 and line.split()[1].isdigit() for line in lines[:100]):
        # Llama 3: base BPE ranks, then 256 special tokens starting with <|begin_of_text|>, <|end_of_text|>.
        base = len(lines)
        return {"kind": "tiktoken", "file": TOKENIZER, "vocab_size": base + 256, "bos_id": base, "eos_id": base + 1,
                "pad_id": None}
    raise MetaFormatError(f"{path} is neither a SentencePiece model nor a tiktoken rank file; remove it or "
                          "replace it with the tokenizer.model of this checkpoint")


def config_from_params(params: dict, vocab_size: int, tokenizer: dict | None) -> ModelConfig:
    """Our ModelConfig for a Meta ``params.json`` (vocab size taken from the embedding)."""
    rope_scaling = None
    max_seq_len = params.get("max_seq_len", 4096)
    if params.get("use_scaled_rope"):
        # Llama 3.1+: Meta's apply_scaling (factor 8 unless params say otherwise, low 1, high 4, 8192 context).
        rope_scaling = {"rope_type": "llama3", "factor": float(params.get("rope_scaling_factor") or 8.0),
                        "low_freq_factor": 1.0, "high_freq_factor": float(params.get("rope_high_freq_factor") or 4.0),
                        "original_max_position_embeddings": 8192}
        max_seq_len = params.get("max_seq_len", 131072)
    ids = tokenizer or {}
    try:
        return ModelConfig(arch="llama", vocab_size=vocab_size, dim=params["dim"], n_layers=params["n_layers"],
                           n_heads=params["n_heads"], n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                           multiple_of=params.get("multiple_of", 256),
                           ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                           norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 10000.0)),
                           rope_scaling=rope_scaling, tie_embeddings=False, max_seq_len=max_seq_len,
                           bos_id=ids.get("bos_id", 1), eos_id=ids.get("eos_id", 2), pad_id=ids.get("pad_id"))
    except ConfigError as error:
        raise MetaFormatError(f"{PARAMS}: {error}") from None


def read_config(src: str) -> ModelConfig:
    """The ModelConfig of a Meta folder: ``params.json`` plus the embedding's shape (the vocabulary size), read
    from the shards' headers by the import's own checks (memory-mapped; no weights are read)."""
    return inspect_checkpoint(src)["config"]


def read_source(src: str):
    """``(ModelConfig, tokenizer or None)``: what an import of ``src`` would give its store, from its metadata
    and ``tokenizer.model`` (no weights are read)."""
    path = os.path.join(src, TOKENIZER)
    tokenizer = None
    if os.path.isfile(path):
        tokenizer = load_tokenizer(src, {"kind": tokenizer_info(path)["kind"], "file": TOKENIZER, "dir": "."})
    return read_config(src), tokenizer


# ---------------------------------------------------------------------------------------------- key layout
def canonical_keys(n_layers: int) -> list[str]:
    """Key order of Meta's llama 2 shards (extra tensors such as ``rope.freqs`` follow)."""
    keys = [EMBED_KEY, NORM_KEY, OUTPUT_KEY]
    for layer in range(n_layers):
        keys += [f"layers.{layer}.{suffix}" for suffix, _ in BLOCK_KEYS.values()]
    return keys


def unit_keys(config: ModelConfig, unit: str, embed_split: int) -> dict[str, tuple[str, int | None]]:
    """Our tensor name -> (Meta key, split dimension) for one unit."""
    if unit == "embed":
        return {"weight": (EMBED_KEY, embed_split)}
    if unit == "norm":
        return {"weight": (NORM_KEY, None)}
    if unit == "head":
        return {"weight": (OUTPUT_KEY, 0)}
    layer = block_index(unit)
    return {name: (f"layers.{layer}.{suffix}", split) for name, (suffix, split) in BLOCK_KEYS.items()}


def full_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Unsplit shape of every Meta key."""
    shapes = {EMBED_KEY: (config.vocab_size, config.dim), NORM_KEY: (config.dim,),
              OUTPUT_KEY: (config.vocab_size, config.dim)}
    block = config.block_shapes
    for layer in range(config.n_layers):
        for name, (suffix, _) in BLOCK_KEYS.items():
            shapes[f"layers.{layer}.{suffix}"] = tuple(block[name])
    return shapes


def split_dims(config: ModelConfig, embed_split: int) -> dict[str, int | None]:
    """Split dimension of every Meta key (None: replicated)."""
    dims = {}
    for unit in ["embed", "norm", "head"] + [block_unit(i) for i in range(config.n_layers)]:
        dims.update({key: split for key, split in unit_keys(config, unit, embed_split).values()})
    return dims


def permute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> half-split rows (transformers' ``permute``)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_rope``: half-split rows -> Meta's interleaved rows."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def shard_shape(shape: tuple[int, ...], split: int | None, n_shards: int) -> tuple[int, ...] | None:
    """Shape of one shard's slice, or None when ``shape`` cannot be split evenly."""
    if split is None:
        return tuple(shape)
    if shape[split] % n_shards:
        return None
    return tuple(size // n_shards if dim == split else size for dim, size in enumerate(shape))


# ---------------------------------------------------------------------------------------------- import
def _describe(params: dict) -> str:
    return ", ".join(f"{k}={params[k]}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                                                   "ffn_dim_multiplier") if k in params)


def inspect_checkpoint(src: str) -> dict:
    """Read headers only (no tensor data): params, tokenizer, config, and a validated key/shape/dtype plan."""
    files = shard_files(src)
    if not files:
        raise MetaFormatError(f"{src} has no consolidated.NN.pth files")
    if [int(SHARD_PATTERN.match(f).group(1)) for f in files] != list(range(len(files))):
        raise MetaFormatError(f"{src}: shard files {files} are not numbered 00..{len(files) - 1:02d}; a shard is "
                              "missing, re-download the checkpoint")
    params, params_text = read_params(src)
    tokenizer_path = os.path.join(src, TOKENIZER)
    tokenizer = tokenizer_info(tokenizer_path) if os.path.isfile(tokenizer_path) else None
    n_shards = len(files)
    shards = [load_shard(os.path.join(src, f)) for f in files]
    first = shards[0]
    for name, shard in zip(files, shards):
        missing = [k for k in canonical_keys(params["n_layers"]) if k not in shard]
        if missing:
            raise MetaFormatError(f"{os.path.join(src, name)} has no tensor {missing[0]!r}"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                  f"params.json says n_layers={params['n_layers']}. The file is incomplete or "
                                  "belongs to another model.")
        if set(shard) != set(first):
            odd = sorted(set(shard) ^ set(first))
            raise MetaFormatError(f"{os.path.join(src, name)} and {files[0]} hold different tensors "
                                  f"(e.g. {odd[0]!r}); the shards come from different checkpoints")

    # The embedding's split: llama 1/2 cut the embedding dim, Llama 3 the vocabulary.
    embed_shape = tuple(first[EMBED_KEY].shape)
    dim = params["dim"]
    if len(embed_shape) != 2:
        raise MetaFormatError(f"{files[0]}: tensor {EMBED_KEY} has shape {embed_shape}, expected [vocab, {dim}]")
    if n_shards == 1 or embed_shape[1] * n_shards == dim:
        embed_split, vocab_size = 1, embed_shape[0]
    elif embed_shape[1] == dim:
        embed_split, vocab_size = 0, embed_shape[0] * n_shards
    else:
        raise MetaFormatError(f"{files[0]}: tensor {EMBED_KEY} has shape {embed_shape}; with dim={dim} and "
                              f"{n_shards} shards expected [vocab, {dim // n_shards}] or [vocab/{n_shards}, {dim}]")
    if isinstance(params.get("vocab_size"), int) and params["vocab_size"] > 0 and params["vocab_size"] != vocab_size:
        raise MetaFormatError(f"{files[0]}: tensor {EMBED_KEY} holds {vocab_size} tokens but params.json says "
                              f"vocab_size={params['vocab_size']}")
    config = config_from_params(params, vocab_size, tokenizer)
    if tokenizer and tokenizer["vocab_size"] > vocab_size:
        # Ids past the embedding would index outside it in training and generation.
        raise MetaFormatError(f"{tokenizer_path} has {tokenizer['vocab_size']} tokens, but {EMBED_KEY} in {files[0]} "
                              f"has only {vocab_size} rows: the tokenizer does not belong to this checkpoint. Use "
                              "the tokenizer.model that came with it.")

    shapes, splits = full_shapes(config), split_dims(config, embed_split)
    extra_keys = [k for k in first if k not in shapes]
    dtypes = {}
    for name, shard in zip(files, shards):
        for key, tensor in shard.items():
            if key in shapes:
                expected = shard_shape(shapes[key], splits[key], n_shards)
                if tuple(tensor.shape) != expected:
                    raise MetaFormatError(
                        f"{os.path.join(src, name)}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                        f"{expected} from params.json ({_describe(params)}) and {n_shards} shard(s). The "
                        "params.json does not belong to these weights, or a file is damaged.")
            elif tensor.numel() > MAX_EXTRA_ELEMENTS:
                raise MetaFormatError(f"{os.path.join(src, name)}: unexpected tensor {key} {tuple(tensor.shape)}; "
                                      "this importer reads dense llama checkpoints only")
            if tensor.dtype not in DTYPE_NAMES:
                raise MetaFormatError(f"{os.path.join(src, name)}: tensor {key} has dtype {tensor.dtype}; only "
                                      "float32, float16 and bfloat16 checkpoints can be imported")
            if dtypes.setdefault(key, DTYPE_NAMES[tensor.dtype]) != DTYPE_NAMES[tensor.dtype]:
                raise MetaFormatError(f"{os.path.join(src, name)}: tensor {key} is {tensor.dtype} but "
                                      f"{dtypes[key]} in {files[0]}")
    # The checkpoint's dtype is the matrices' dtype; keys that differ (e.g. fp32 norms) are listed.
    matrix_dtypes = [dtypes[k] for k in shapes if len(shapes[k]) == 2]
    main_dtype = max(set(matrix_dtypes), key=matrix_dtypes.count)
    extra_tensors = {key: {"dtype": dtypes[key], "shape": list(first[key].shape),
                           "values": first[key].float().reshape(-1).tolist()} for key in extra_keys}
    keys = list(first)
    source = {"format": "meta", "n_shards": n_shards, "dtype": main_dtype,
              "dtypes": {k: d for k, d in dtypes.items() if d != main_dtype}, "embed_split_dim": embed_split,
              "params": params, "params_text": params_text, "files": files, "extra_tensors": extra_tensors}
    if keys != canonical_keys(config.n_layers) + extra_keys:
        source["keys"] = keys  # only recorded when the order is not Meta's usual one
    return {"files": files, "config": config, "tokenizer": tokenizer, "source": source}


class ShardSet:
    """The shards of a checkpoint, memory-mapped, re-opened after every ``REMAP_BYTES`` read.

    Pages read through a mapping stay in this process's resident set (clean, reclaimable page cache) until
    the mapping goes away; re-opening bounds that to about ``REMAP_BYTES`` plus one unit. Opening a shard
    unpickles its index (~0.1 s for a 70B shard), so re-opening for every unit would cost too much.
    """

    REMAP_BYTES = 1 << 30

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.shards: list[dict] | None = None
        self.touched = 0

    def pieces(self, key: str) -> list[torch.Tensor]:
        """Every shard's tensor ``key`` (views of the mappings; nothing is copied)."""
        if self.shards is None or self.touched >= self.REMAP_BYTES:
            self.shards = None  # drop the old mappings before making new ones
            self.shards = [load_shard(path) for path in self.paths]
            self.touched = 0
        pieces = [shard[key] for shard in self.shards]
        self.touched += sum(p.numel() * p.element_size() for p in pieces)
        return pieces


def import_to_store(src: str, out_dir: str, settings: StoreSettings | None = None, progress: bool = True) -> str:
    """Stream a Meta checkpoint into a new store at ``out_dir`` (one unit in memory at a time), through a
    staging folder (``formats.importing``): an interrupted import leaves nothing at ``out_dir``.

    Without ``settings`` the store is ``full`` mode with the checkpoint's own dtype as shadow dtype, so a bf16
    checkpoint round-trips bit-exactly.
    """
    check_target(out_dir)
    plan = inspect_checkpoint(src)
    config, source, files = plan["config"], plan["source"], plan["files"]
    settings = settings or StoreSettings(mode="full", shadow_dtype=source["dtype"], state_dtype="fp32")
    extra = {"source": source}
    if plan["tokenizer"]:
        extra["tokenizer"] = {"kind": plan["tokenizer"]["kind"], "file": TOKENIZER}
    paths = [os.path.join(src, f) for f in files]

    def units():
        shards = ShardSet(paths)
        for unit in unit_names(config):
            tensors = {}
            for name, (key, split) in unit_keys(config, unit, source["embed_split_dim"]).items():
                pieces = shards.pieces(key)
                tensor = pieces[0] if split is None or len(pieces) == 1 else torch.cat(pieces, dim=split)
                if name == "q_proj":
                    tensor = permute_rope(tensor, config.n_heads)
                elif name == "k_proj":
                    tensor = permute_rope(tensor, config.n_kv_heads)
                tensors[name] = tensor
                del pieces
            yield unit, tensors
            # write_store keeps its own reference until the next unit arrives; emptying the dict frees this
            # unit's tensors before the next one is read, so only one unit is ever in memory.
            tensors.clear()

    def add_tokenizer(folder: str):
        if plan["tokenizer"]:
            os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
            shutil.copyfile(os.path.join(src, TOKENIZER), os.path.join(folder, "tokenizer", TOKENIZER))

    import_units(out_dir, config, units(), settings, extra, f"importing {src}: units", add_tokenizer, progress)
    return out_dir
