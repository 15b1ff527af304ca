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
