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

Modules: ``config`` (config.json <-> ModelConfig, architectures, RoPE, quantization config, state-dict keys),
``checkpoint`` (reading safetensors checkpoints, the import plan, packed BitNet weights), ``load``
(``import_to_store``), ``shards`` (the tensors of an export and their safetensors files), ``export`` (one
exporter per output kind: ``export_hf``, ``export_hf_bitnet``, ``export_hf_source``) and ``tokenizer`` (the
tokenizer files of a checkpoint and of an export). The names other modules use are importable from here.
"""
from offload_bitnet.formats.hf.checkpoint import (IGNORED_SUFFIXES, INDEX, SINGLE_FILE, Checkpoint,  # noqa: F401
                                                  ImportPlan, detect, is_packed_checkpoint, latent_from_packed,
                                                  packed_gamma, plan_import, read_units)
from offload_bitnet.formats.hf.config import (ACTIVATIONS, ARCHITECTURES,  # noqa: F401 - the package's names
                                              BLOCK_KEYS, CONFIG, MODEL_TYPES, HFFormatError, bitnet_quantization,
                                              config_from_hf, dtype_name, hf_architecture, hf_config, key_owners,
                                              parse_dtype, read_config, read_config_json, unit_keys)
from offload_bitnet.formats.hf.export import (export_from_store, export_hf, export_hf_bitnet,  # noqa: F401
                                              export_hf_source, has_hf_source)
from offload_bitnet.formats.hf.load import SHADOW_FOR_DTYPE, import_to_store, read_source  # noqa: F401
from offload_bitnet.formats.hf.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, TensorSpec  # noqa: F401
from offload_bitnet.formats.hf.tokenizer import (TOKENIZER_FILES, check_tokenizer_fits, copy_tokenizer,  # noqa: F401
                                                 describe_tokenizer, tokenizer_files, tokenizer_token_count,
                                                 write_tokenizer_files)
