"""``--device mlx`` against transformers on the parity fixtures of ``test_parity_transformers`` (tiny Llama and
BitNet, tied and untied): logits within 1e-4, and generation through the MLX backend's KV cache gives the same
tokens as the torch backend."""
import pytest
import torch

pytest.importorskip("mlx.core")

from offload_bitnet.api import open_model  # noqa: E402
from offload_bitnet.generate import Generator, SamplingOptions  # noqa: E402
from test_parity_transformers import (LOGITS_ATOL, LOSS_ATOL, batch, bitnet_folder, import_fp32,  # noqa: E402
                                      llama_folder, needs_accelerate)


@pytest.fixture(autouse=True, scope="module")
def _eager(eager_transformers_quantizers):
    yield


def check_mlx_logits(reference_model, store_path) -> float:
    ids, labels = batch()
    with torch.no_grad():
        reference = reference_model(input_ids=ids, labels=labels)
    with open_model(store_path, device="mlx") as engine:
        assert engine.backend.name == "mlx"
        logits = engine.logits(ids)
        loss = engine.loss(ids, labels)
    error = (logits - reference.logits).abs().max().item()
    print(f"mlx logits max abs error vs transformers: {error:.2e}")
    assert error <= LOGITS_ATOL, f"logits differ by {error}"
    assert loss == pytest.approx(reference.loss.item(), abs=LOSS_ATOL)
    return error


@pytest.mark.parametrize("case", ["untied-gqa", "tied-mha"])
def test_llama_logits_on_mlx_match_transformers(tmp_path, case):
    model, folder = llama_folder(tmp_path, case)
    check_mlx_logits(model, import_fp32(folder, tmp_path, "full"))


@needs_accelerate
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_bitnet_logits_on_mlx_match_transformers(tmp_path, tie):
    model, folder = bitnet_folder(tmp_path, tie)
    check_mlx_logits(model, import_fp32(folder, tmp_path, "qat"))


def test_generation_on_mlx_gives_the_torch_tokens_with_and_without_padding(tmp_path):
    """Greedy decoding with the per-block KV cache (MLX arrays) and left-padded batches (the boolean mask)."""
    _, folder = llama_folder(tmp_path, "untied-gqa")
    store_path = import_fp32(folder, tmp_path, "full")
    prompts = [[5, 9, 17, 3, 8], [11, 4, 7]]
    options = SamplingOptions(max_new_tokens=6, temperature=0.0)
    tokens = {}
    for device in ["cpu", "mlx"]:
        generator = Generator(store_path, device)
        tokens[device] = (generator.generate(prompts[:1], options, stop_ids=[]).tokens,
                          generator.generate(prompts, options, stop_ids=[]).tokens)
        generator.close()
    assert tokens["mlx"] == tokens["cpu"]
    assert all(len(row) == 6 for row in tokens["mlx"][1])


def test_smollm2_answers_paris_through_test_gen_on_mlx(tmp_path, capsys, monkeypatch):
    """~30 s here: the GGUF's import (~20 s) and MLX's CPU prefill."""
    import os
    import sys

    from real_models import smollm2_or_skip

    gguf = smollm2_or_skip()
    monkeypatch.setenv("OFFLOAD_BITNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.modules.pop("test_gen", None)
    import test_gen

    code = test_gen.main([gguf, "mlx", "--chat", "--prompt", "What is the capital of France?",
                          "--max-new-tokens", "40"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Paris" in out and "stopped by: stop" in err
