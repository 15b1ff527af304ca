"""The public entry points: open a model for evaluation or training."""
from __future__ import annotations

from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine
from offload_bitnet.formats import ensure_store
from offload_bitnet.formats.merge import load_adapters
from offload_bitnet.store.blockstore import BlockStore


def open_model(path: str, device: str = "cpu", adapter: str | None = None, **engine_options) -> StreamingEngine:
    """Open a model read-only for streamed evaluation: ``.logits(input_ids)`` and ``.loss(input_ids, labels)``.

    ``device``: a torch device, or ``"mlx"`` for the Apple MLX backend (``pip install -e ".[mlx]"``).
    ``path`` is a store, or any importable model (HF folder, Meta folder, .gguf), which is imported into a
    cache folder on first use (see ``formats.ensure_store``). ``adapter``: a LoRA adapter folder (a LoRA run's
    ``RUN_DIR/adapter``, or any PEFT LoRA folder) applied on top of the base without merging.
    """

    store = BlockStore(ensure_store(path), writable=False)
    try:
        if adapter is not None:
            # Evaluation only reads the adapters: the same in-RAM AdapterSet training uses, without a checkpoint
            # to commit to (so the engine only applies them).
            engine_options["adapters"] = load_adapters(adapter, store.config)
        return StreamingEngine(store, EngineOptions(device=device, **engine_options))
    except BaseException:
        store.close()
        raise


def open_for_training(path: str, **engine_options) -> StreamingEngine:
    """Open a store for training (takes its write lock; cleans up after a crashed run). A packed-only store
    trains only LoRA adapters (``lora=LoRAConfig(...)``); it has no master weights for anything else."""
    store = BlockStore(path, writable=True)
    try:
        if engine_options.get("lora") is None:
            store.require_master_weights()
        return StreamingEngine(store, EngineOptions(**engine_options))
    except BaseException:
        store.close()
        raise
