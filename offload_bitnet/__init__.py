"""offload_bitnet: fine-tune LLaMA-family and BitNet b1.58 models larger than memory, one block at a time."""
from .api import open_for_training, open_model
from .config import ModelConfig, config_for_size
from .create import create_model, write_store
from .engine import EngineOptions, StepStats, StreamingEngine
from .optim import AdamWConfig
from .store import BlockStore, StoreError, StoreSettings

__all__ = [
    "AdamWConfig", "BlockStore", "EngineOptions", "ModelConfig", "StepStats", "StoreError", "StoreSettings",
    "StreamingEngine", "config_for_size", "create_model", "open_for_training", "open_model", "write_store",
]
__version__ = "0.1.0"
