"""Meta's original llama checkpoint format: ``params.json`` + ``consolidated.NN.pth`` + ``tokenizer.model``.

A checkpoint saved by ``N`` model-parallel ranks holds one ``consolidated.NN.pth`` per rank. Each rank keeps
its slice of every weight, cut the way fairscale's layers cut them in Meta's llama code:

================================================  ==========================  ===========================
Meta key (per layer ``layers.N.``)                 fairscale layer            split dimension
================================================  ==========================  ===========================
``attention.wq/wk/wv``, ``feed_forward.w1/w3``     ColumnParallelLinear       0 (output features)
``attention.wo``, ``feed_forward.w2``              RowParallelLinear          1 (input features)
``output.weight``                                  ColumnParallelLinear       0
``tok_embeddings.weight``                          ParallelEmbedding (llama   1 (embedding dim); 0 (vocab)
                                                   1/2), VocabParallel (3)     in Llama 3, found from shapes
``attention_norm``, ``ffn_norm``, ``norm``         replicated                 -
================================================  ==========================  ===========================

Meta applies rotary embeddings to interleaved (real, imaginary) pairs; our block math (like transformers)
rotates the two halves of each head. ``wq``/``wk`` rows are permuted on import exactly as transformers'
``convert_llama_weights_to_hf.py`` does, and permuted back on export.

Files are opened with ``torch.load(mmap=True, weights_only=True)``: nothing in them is executed, and a tensor
is only read from disk when its unit is imported, so import holds one unit in memory (plus at most
``ShardSet.REMAP_BYTES`` of clean, reclaimable mapped pages).
"""
from offload_bitnet.formats.meta.checkpoint import (BLOCK_KEYS, EMBED_KEY,  # noqa: F401 - the names other modules use
                                                    NORM_KEY, OUTPUT_KEY, PARAMS, SHARD_PATTERN, TOKENIZER,
                                                    MetaFormatError, ShardSet, canonical_keys, config_from_params,
                                                    detect, full_shapes, import_to_store, inspect_checkpoint,
                                                    load_shard, permute_rope, read_config, read_params, read_source,
                                                    shard_files, split_dims, tokenizer_info, unit_keys, unpermute_rope)
from offload_bitnet.formats.meta.export import export_from_store, params_for_config  # noqa: F401
