import os

import pytest
import torch

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests compare exact numbers; keep intra-op threading fixed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy test, left out of CI (run with -m slow)")


@pytest.fixture(scope="module")
def eager_transformers_quantizers():
    """transformers wraps its BitNet (un)packing and quantizers in torch.compile (~35 s to compile on CPU);
    run them eagerly: the same arithmetic (tests/test_ternary.py)."""
    import torch._dynamo

    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous
