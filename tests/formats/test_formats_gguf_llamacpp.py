"""Our GGUF exports run by llama.cpp itself (llama-cpp-python): its next-token log-probabilities on real text
against our engine's, its tokenizer against ours, its chat template rendering against ours.

Skipped when llama-cpp-python is not installed (``pip install llama-cpp-python``: it builds llama.cpp from
source, about 15 minutes on 2 cores; pip caches the wheel afterwards). The ternary test trains a model first and
is marked slow (run it with ``-m slow``).
"""
import math
import os

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from offload_bitnet.api import open_model  # noqa: E402
from offload_bitnet.formats import export_model, import_model  # noqa: E402
from offload_bitnet.store.blockstore import BlockStore  # noqa: E402
from offload_bitnet.tokenizers.runtime import load_tokenizer  # noqa: E402

from test_formats_gguf import smollm2_store  # noqa: E402  (the session's one SmolLM2 import)
from repo_paths import REPO

GPL = "/usr/share/common-licenses/GPL-3"


def real_text(chars: int = 6000) -> str:
    """The GPL-3 (Debian's copy), else CPython's pydoc topics: real English prose."""
    if os.path.isfile(GPL):
        with open(GPL, encoding="utf-8") as handle:
            return handle.read()[:chars]
    from pydoc_data.topics import topics

    return topics["specialnames"][:chars]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def llama_cpp_logprobs(path: str, ids: list[int]) -> np.ndarray:
    """llama.cpp's log-probabilities ``[T, vocab]`` of the next token after each position of ``ids``."""
    model = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=len(ids) + 8, n_batch=len(ids), verbose=False)
    try:
        model.reset()
        model.eval(ids)
        return log_softmax(np.array(model.scores[:len(ids)]))
    finally:
        model.close()


def our_logprobs(store: str, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return log_softmax(open_model(store).logits(torch.tensor([ids]))[0].numpy())


def compare(store: str, gguf_path: str, ids: list[int]) -> dict:
    """Perplexities of ``ids`` (each token predicted from those before it) and the top-1 agreement."""
    ours, theirs = our_logprobs(store, ids), llama_cpp_logprobs(gguf_path, ids)
    targets = np.array(ids[1:])
    rows = np.arange(len(targets))
    result = {"ours": math.exp(-ours[rows, targets].mean()), "llama.cpp": math.exp(-theirs[rows, targets].mean()),
              "top1": float((ours[:-1].argmax(-1) == theirs[:-1].argmax(-1)).mean())}
    result["relative"] = abs(result["llama.cpp"] - result["ours"]) / result["ours"]
    return result


def check_tokenizer_and_chat(store: str, gguf_path: str, text: str):
    """llama.cpp tokenizes ``text`` to our ids and renders a chat with the GGUF's template as we do."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokenizer = load_tokenizer(store, BlockStore(store).extra["tokenizer"])
    model = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    try:
        assert model.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text, bos=False)
        template = model.metadata["tokenizer.chat_template"]
        assert (model.token_bos(), model.token_eos()) == (tokenizer.bos_id, tokenizer.eos_id)
        bos = model.detokenize([model.token_bos()], special=True).decode()
        eos = model.detokenize([model.token_eos()], special=True).decode()
        eot = model._model.token_eot() if hasattr(model._model, "token_eot") else None
    finally:
        model.close()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages).prompt
    assert rendered == tokenizer.apply_chat_template(messages)
    if eot is not None and eot >= 0:  # llama.cpp's end of turn is one our generation stops at
        assert eot in tokenizer.stop_ids


def smollm2_ids(store: str, count: int = 256) -> list[int]:
    tokenizer = load_tokenizer(store, BlockStore(store).extra["tokenizer"])
    return tokenizer.encode(real_text(), bos=False)[:count]


def test_smollm2_from_gguf_exported_as_f16_matches_in_llama_cpp(tmp_path_factory, monkeypatch, tmp_path):
    """(a) SmolLM2-135M imported from its Q4_1 GGUF and exported again as F16: perplexities within 0.5%."""
    store = smollm2_store(tmp_path_factory, monkeypatch)
    path = export_model(store, str(tmp_path / "gguf"), format="gguf", gguf_type="f16", progress=False)
    check_tokenizer_and_chat(store, path, real_text(1500))
    result = compare(store, path, smollm2_ids(store))
    print(f"SmolLM2 GGUF -> store -> F16 GGUF, 256 GPL-3 tokens: perplexity ours {result['ours']:.4f}, llama.cpp "
          f"{result['llama.cpp']:.4f} (relative {result['relative']:.5f}), top-1 agreement {result['top1']:.4f}")
    assert result["relative"] < 0.005
    # Chat through llama.cpp's own chat handling (the GGUF's template), stopping at the end-of-turn token.
    model = llama_cpp.Llama(model_path=path, n_ctx=256, verbose=False)
    try:
        reply = model.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                             max_tokens=32, temperature=0)["choices"][0]
    finally:
        model.close()
    assert "Paris" in reply["message"]["content"] and reply["finish_reason"] == "stop", reply


def test_smollm2_through_hf_and_back_exports_a_gguf_llama_cpp_agrees_with(tmp_path_factory, monkeypatch, tmp_path):
    """(b) SmolLM2 exported to HF, imported from that folder and exported to GGUF: the HF BPE vocabulary path
    (llama.cpp's pre-tokenizer found from tokenizer.json) and perplexities within 0.5%."""
    from offload_bitnet.tokenizers.gguf_rebuild import build_gguf_bpe

    store = smollm2_store(tmp_path_factory, monkeypatch)
    hf = export_model(store, str(tmp_path / "hf"), format="hf")
    if not os.path.isfile(os.path.join(hf, "tokenizer.json")):
        # HF exports carry their tokenizer once the exports issue's HF part lands; until then, write the one
        # our importer rebuilt from the GGUF, and its chat template and special tokens, as that export will.
        import json

        description = BlockStore(store).extra["tokenizer"]
        with open(os.path.join(store, "tokenizer", description["file"])) as handle:
            data = json.load(handle)
        build_gguf_bpe(data).save(os.path.join(hf, "tokenizer.json"))
        with open(os.path.join(hf, "tokenizer_config.json"), "w") as handle:
            json.dump({"bos_token": data["tokens"][data["bos_id"]], "eos_token": data["tokens"][data["eos_id"]],
                       "chat_template": data["chat_template"], "add_bos_token": False}, handle)
    again = import_model(hf, str(tmp_path / "again"), progress=False)
    assert BlockStore(again).extra["tokenizer"]["kind"] == "hf"
    path = export_model(again, str(tmp_path / "gguf"), format="gguf", progress=False)
    assert llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False).metadata["tokenizer.ggml.pre"] == "smollm"
    check_tokenizer_and_chat(again, path, real_text(1500))
    result = compare(again, path, smollm2_ids(again))
    print(f"SmolLM2 -> HF -> store -> F16 GGUF, 256 GPL-3 tokens: perplexity ours {result['ours']:.4f}, llama.cpp "
          f"{result['llama.cpp']:.4f} (relative {result['relative']:.5f}), top-1 agreement {result['top1']:.4f}")
    assert result["relative"] < 0.005


LLAMA2_SPM = os.path.join(REPO, "..", "shared", "data",
                          "llama2-tokenizer.model")


@pytest.mark.parametrize("vocabulary", ["byte", "sentencepiece"])
def test_llama_cpp_tokenizes_our_other_vocabularies_as_we_do(vocabulary, tmp_path):
    """The byte tokenizer of created models and a sentencepiece tokenizer.model (Llama 2's), through the GGUF
    metadata into llama.cpp's tokenizer: the same ids as ours, BOS included."""
    from offload_bitnet.store.write import create_model
    from offload_bitnet.tokenizers.loaders import install_tokenizer

    if vocabulary == "sentencepiece" and not os.path.isfile(LLAMA2_SPM):
        pytest.skip("../shared/data/llama2-tokenizer.model is absent")
    store = create_model(str(tmp_path / "store"), size="demo", arch="llama", n_layers=1,
                         **({"vocab_size": 32000} if vocabulary == "sentencepiece" else {}))
    if vocabulary == "sentencepiece":
        (tmp_path / "spm").mkdir()
        (tmp_path / "spm" / "tokenizer.model").write_bytes(open(LLAMA2_SPM, "rb").read())
        install_tokenizer(store, str(tmp_path / "spm" / "tokenizer.model"))
    path = export_model(store, str(tmp_path / "gguf"), format="gguf", progress=False)
    tokenizer = load_tokenizer(store, BlockStore(store).extra.get("tokenizer"))
    text = real_text(3000)
    model = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        assert model.tokenize(text.encode(), add_bos=True, special=False) == tokenizer.encode(text, bos=True)
        assert model.token_bos() == tokenizer.bos_id and model.token_eos() == tokenizer.eos_id
    finally:
        model.close()


@pytest.fixture(scope="module")
def trained_ternary(tmp_path_factory) -> str:
    """A LLaMA-architecture ternary (qat) model whose dims are multiples of 256 (TQ blocks span whole rows), with
    the byte tokenizer, trained for 80 steps on the first 2 KB of the GPL-3 until its predictions are peaked
    (perplexity about 9 on the bytes it saw, from 260 untrained and about 20 at the byte-frequency plateau).

    LLaMA, not BitNet: llama.cpp's bitnet graph hard-codes SiLU where our BitNet computes relu², so the llama
    graph (SiLU, no sub-norms) with ternary TQ weights is what llama.cpp runs correctly for a model we train."""
    from offload_bitnet.store.write import create_model
    from offload_bitnet.train.trainer import main

    folder = tmp_path_factory.mktemp("ternary")
    text = folder / "gpl.txt"
    text.write_text(real_text(2048))
    store = create_model(str(folder / "store"), size="demo", arch="llama", mode="qat", dim=256, hidden_dim=512,
                         n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=512, seed=0)
    assert main([store, "--data", str(text), "--runs-dir", str(folder / "runs"), "--experiment", "t",
                 "--num-train-iters", "80", "--batch-size", "8", "--max-seq-len", "256", "--lr", "5e-3",
                 "--val-fraction", "0", "--eval-every", "0", "--generate-every", "0", "--no-plot"]) == 0
    return store


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["tq2_0", "tq1_0"])
def test_trained_ternary_model_in_tq_types_matches_in_llama_cpp(trained_ternary, gguf_type, tmp_path):
    """(c) llama.cpp quantizes activations per 256-value block (Q8_K) where BitNet uses per-token absmax, so
    top-1 agreement >= 95% and perplexity within 3%."""
    path = export_model(trained_ternary, str(tmp_path / gguf_type), format="gguf", gguf_type=gguf_type,
                        progress=False)
    ids = list(real_text(512).encode("utf-8"))
    result = compare(trained_ternary, path, ids)
    print(f"ternary LLaMA (dim 256, 2 layers, trained 80 steps) as {gguf_type.upper()}, 512 GPL-3 bytes: "
          f"perplexity ours {result['ours']:.4f}, llama.cpp {result['llama.cpp']:.4f} "
          f"(relative {result['relative']:.4f}), top-1 agreement {result['top1']:.4f}")
    assert result["ours"] < 12, "the model did not learn the text: its predictions are not peaked"
    assert result["top1"] >= 0.95
    assert result["relative"] < 0.03
