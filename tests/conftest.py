import os
import sys

import pytest
import torch


# Some tests share fixtures' builders across folders (a packed BitNet checkpoint, the tiny GGUF): every test
# folder is importable, whichever tests are selected.
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _folder in sorted(os.listdir(_TESTS)):
    if os.path.isdir(os.path.join(_TESTS, _folder)) and not _folder.startswith(("_", ".")):
        if os.path.join(_TESTS, _folder) not in sys.path:
            sys.path.append(os.path.join(_TESTS, _folder))


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
    run them eagerly: the same arithmetic (tests/model/test_ternary.py). Plain assignment, not monkeypatch: since
    pytest 9.2, monkeypatch's undo deletes an attribute it did not find in the module's __dict__, and torch's
    config module then loses ``disable`` for every later test."""
    import torch._dynamo

    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous
