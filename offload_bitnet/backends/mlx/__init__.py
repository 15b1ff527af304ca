"""Apple MLX compute backend: the streamed step's math (block forward, replayed backward, straight-through
quantization, chunked cross-entropy, AdamW) written over ``mlx.core`` arrays, mirroring the torch math of
``offload_bitnet.model``, ``ternary``, ``lora``, ``optim`` and the engine's cross-entropy.

Modules: ``arrays`` (torch/numpy <-> MLX), ``ternary`` (BitNet quantization and 2-bit packing), ``model`` (the
decoder block, its replay and the dropout keys), ``loss`` (chunked cross-entropy), ``optim`` (AdamW),
``reference`` (a whole model in memory: the ``mx.grad`` reference the streamed step is checked against).
Compute in fp32 on the CPU backend; functions that create arrays take a ``dtype`` for bf16 on a Mac's GPU.
"""
