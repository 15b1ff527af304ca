"""offload_bitnet: fine-tune LLaMA-family and BitNet b1.58 models larger than memory, one block at a time."""
import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # Streaming allocates and frees block-sized tensors all the time; torch then backs allocations of 2 MiB and
    # more with transparent huge pages, which cut page faults (and ~15% of a step's time) where THP is "madvise".
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
from offload_bitnet.api import open_for_training, open_model
from offload_bitnet.model.config import ModelConfig, config_for_size
from offload_bitnet.store.write import create_model, write_store
from offload_bitnet.engine.streaming import EngineOptions, StepStats, StreamingEngine
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.store.blockstore import BlockStore, StoreError, StoreSettings
from offload_bitnet.formats import export_model, import_model

__all__ = [
    "AdamWConfig", "BlockStore", "EngineOptions", "ModelConfig", "StepStats", "StoreError", "StoreSettings",
    "StreamingEngine", "config_for_size", "create_model", "export_model", "import_model", "open_for_training",
    "open_model", "write_store",
]
__version__ = "0.1.0"
