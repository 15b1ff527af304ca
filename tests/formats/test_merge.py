"""merge_lora: the merged store computes what the base plus adapters computed.

Measured on these tiny models (demo size, 2 layers, 3 LoRA steps at lr 1e-2; logits are about 1 in size, the
adapters move them by about 0.6-1.3):

* Llama, fp32 base: merged store vs engine with adapters: max |diff| ~5e-7 (fp32 rounding only).
* Llama, fp16 base: the merged weights are rounded to fp16: ~4e-4 vs the engine; 0 vs a reference whose
  merged weights are rounded to fp16 the same way.
* BitNet qat base: the merged full-precision model does not quantize activations, the adapter-trained one
  did (its base BitLinear path sees 8-bit activations): ~1.8e-2 vs the engine with adapters. Against an
  explicit reference (dequantized ternary W + B A * scaling, activations unquantized) it is ~9e-7 with an
  fp32 merged store, and 0 for the default fp16 store vs the same reference with fp16-rounded merged weights
  (~5e-4 against the unrounded one).
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StoreError, StreamingEngine, create_model, open_model
from offload_bitnet.store.layout import Layout
from offload_bitnet.model.lora import LoRAConfig
from offload_bitnet.formats.merge import merge_lora
from offload_bitnet.model.block import block_forward, rms_norm, rope_tables
from offload_bitnet.store.units import block_unit

LORA = LoRAConfig(rank=4, alpha=8, dropout=0.05)


def _train(base, adapter_dir, steps=3, lora=LORA):
    """A LoRA engine on ``base`` after ``steps`` steps, and fixed evaluation ids."""
    engine = StreamingEngine(BlockStore(base), EngineOptions(lora=lora, adapter_dir=adapter_dir, seed=0,
                                                             optim=AdamWConfig(lr=1e-2)))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        engine.train_step([(torch.randint(0, 256, (2, 16), generator=generator), None)])
    return engine, torch.randint(0, 256, (2, 12), generator=generator)


def _logits(path, ids):
    with open_model(path) as engine:
        return engine.logits(ids)


def _reference(base, adapters, ids, quantize, merged_dtype=None):
    """Logits computed here from the base's forward tensors (dequantized ternary for qat) and the adapters.

    ``merged_dtype`` None: the adapters run beside the base projections, as in the engine. Otherwise W + B A s
    is formed in fp32 and rounded to ``merged_dtype``, as a merged store holds it."""
    store = BlockStore(base)
    layout, cfg = Layout(store.settings), store.config
    unit = lambda name: layout.forward_tensors(name, store.read(name, "weights"), torch.float32, "cpu")  # noqa: E731
    x = F.embedding(ids, unit("embed")["weight"])
    cos, sin = rope_tables(cfg, torch.arange(ids.shape[1]))
    for layer in range(cfg.n_layers):
        params = unit(block_unit(layer))
        if merged_dtype is None:
            params.update(adapters.block_adapters(layer, "cpu"))
        else:
            for name in adapters.lora.targets:
                params[name] = adapters.merged_weight(layer, name, params[name]).to(merged_dtype).float()
        x = block_forward(params, x, cfg, cos, sin, quantize=quantize)
    x = rms_norm(x, unit("norm")["weight"], cfg.norm_eps)
    head = unit("embed" if cfg.tie_embeddings else "head")["weight"]
    store.close()
    return F.linear(x, head)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_merged_llama_equals_engine_with_adapters(tmp_path):
    base = create_model(str(tmp_path / "base"), size="demo", arch="llama", n_layers=2, shadow_dtype="fp32")
    engine, ids = _train(base, str(tmp_path / "adapter"))
    with_adapters = engine.logits(ids)
    merged = merge_lora(base, str(tmp_path / "adapter"), str(tmp_path / "merged"), progress=False)
    store = BlockStore(merged)
    assert (store.config, store.settings.mode, store.settings.shadow_dtype) == (engine.config, "full", "fp32")
    merged_logits = _logits(merged, ids)
    assert _max_diff(merged_logits, with_adapters) < 1e-4  # measured ~5e-7
    assert _max_diff(merged_logits, _logits(base, ids)) > 0.1  # the adapters did change the model


def test_merged_16bit_llama_rounds_the_merged_weights(tmp_path):
    base = create_model(str(tmp_path / "base"), size="demo", arch="llama", n_layers=2, shadow_dtype="fp16")
    engine, ids = _train(base, str(tmp_path / "adapter"))
    merged = merge_lora(base, str(tmp_path / "adapter"), str(tmp_path / "merged"), progress=False)
    assert BlockStore(merged).settings.shadow_dtype == "fp16"  # the base's dtype by default
    merged_logits = _logits(merged, ids)
    rounded = _reference(base, engine.adapters, ids, 0.0, merged_dtype=torch.float16)
    assert _max_diff(merged_logits, rounded) < 1e-5  # measured 0: only the fp16 rounding of W + B A s
    assert _max_diff(merged_logits, engine.logits(ids)) < 2e-3  # measured ~4e-4: that rounding's effect


def test_merged_qat_bitnet_uses_the_ternary_weights(tmp_path):
    base = create_model(str(tmp_path / "base"), size="demo", arch="bitnet", n_layers=2, shadow_dtype="fp16")
    engine, ids = _train(base, str(tmp_path / "adapter"))
    adapter_dir = str(tmp_path / "adapter")
    exact = merge_lora(base, adapter_dir, str(tmp_path / "merged32"), progress=False, shadow_dtype="fp32")
    default = merge_lora(base, adapter_dir, str(tmp_path / "merged16"), progress=False)
    for path, dtype in ((exact, "fp32"), (default, "fp16")):
        store = BlockStore(path)
        assert (store.config.arch, store.settings.mode, store.settings.shadow_dtype) == ("bitnet", "full", dtype)
        store.close()

    # The merged weight is codes * scale + B A s, not the latent shadow + B A s.
    source, merged = BlockStore(base), BlockStore(exact)
    ternary = Layout(source.settings).forward_tensors("block.001", source.read("block.001", "weights"),
                                                      torch.float32, "cpu")["up_proj"]
    shadow = source.read("block.001", "shadow")["up_proj"].float()
    expected = engine.adapters.merged_weight(1, "up_proj", ternary)
    stored = merged.read("block.001", "weights")["up_proj"]
    assert torch.equal(stored, expected)
    assert not torch.allclose(stored, engine.adapters.merged_weight(1, "up_proj", shadow), atol=1e-3)

    # The merged model runs without activation quantization: equal to that explicit reference ...
    unquantized = _reference(base, engine.adapters, ids, quantize=0.0)
    assert _max_diff(_logits(exact, ids), unquantized) < 1e-4  # measured ~9e-7
    rounded = _reference(base, engine.adapters, ids, 0.0, merged_dtype=torch.float16)
    assert _max_diff(_logits(default, ids), rounded) < 1e-5
    # ... while the engine with adapters quantized the base path's activations (explicit reference, quantize=1).
    with_adapters = engine.logits(ids)
    assert _max_diff(with_adapters, _reference(base, engine.adapters, ids, quantize=1.0)) < 1e-5
    gap = _max_diff(_logits(exact, ids), with_adapters)
    assert 1e-3 < gap < 0.1, gap  # measured ~1.8e-2 (logits ~1): the activation quantization, nothing else


def test_merge_keeps_source_tokenizer_and_records_the_merge(tmp_path):
    from offload_bitnet.formats.hf import export_from_store, import_to_store

    for arch, keeps_source in (("llama", True), ("bitnet", False)):
        work = tmp_path / arch
        created = create_model(str(work / "created"), size="demo", arch=arch, n_layers=1)
        hf = export_from_store(BlockStore(created), str(work / "hf"), source=False, progress=False)
        with open(os.path.join(hf, "tokenizer_config.json"), "w") as handle:
            json.dump({"marker": arch}, handle)
        with open(os.path.join(hf, "tokenizer.json"), "w") as handle:
            json.dump({"model": {"type": "BPE"}}, handle)
        base = import_to_store(hf, str(work / "base"), progress=False)
        _train(base, str(work / "adapter"), steps=1)
        merged = merge_lora(base, str(work / "adapter"), str(work / "merged"), progress=False)
        before, after = BlockStore(base).extra, BlockStore(merged).extra
        assert after["tokenizer"] == before["tokenizer"]
        with open(os.path.join(merged, "tokenizer", "tokenizer_config.json")) as handle:
            assert json.load(handle) == {"marker": arch}
        assert after["lora_merge"]["rank"] == LORA.rank and after["lora_merge"]["adapter_step"] == 1
        if keeps_source:  # a dense Llama source: exports keep its layout
            assert after["source"] == before["source"]
        else:  # a quantized BitNet source would re-quantize the merged weights on export
            assert "source" not in after and after["base_source"] == before["source"]
            exported = export_from_store(BlockStore(merged), str(work / "export"), progress=False)
            with open(os.path.join(exported, "config.json")) as handle:
                assert "quantization_config" not in json.load(handle)


def test_merge_errors_are_clear(tmp_path):
    base = create_model(str(tmp_path / "base"), size="demo", arch="llama", n_layers=2)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        merge_lora(base, str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")

    deeper = create_model(str(tmp_path / "deeper"), size="demo", arch="llama", n_layers=3)
    _train(deeper, str(tmp_path / "deeper_adapter"), steps=1)
    with pytest.raises(ValueError, match="no place for .*layers.2"):
        merge_lora(base, str(tmp_path / "deeper_adapter"), str(tmp_path / "out"), progress=False)
    wider = create_model(str(tmp_path / "wider"), size="demo", arch="llama", n_layers=2, hidden_dim=384)
    _train(wider, str(tmp_path / "wider_adapter"), steps=1)
    with pytest.raises(ValueError, match="gate_proj.lora_B.weight has shape"):
        merge_lora(base, str(tmp_path / "wider_adapter"), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")

    _train(base, str(tmp_path / "adapter"), steps=1)
    with pytest.raises(ValueError, match="shadow_dtype must be one of"):
        merge_lora(base, str(tmp_path / "adapter"), str(tmp_path / "out"), progress=False, shadow_dtype="int8")
    os.makedirs(tmp_path / "taken")
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        merge_lora(base, str(tmp_path / "adapter"), str(tmp_path / "taken"), progress=False)
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
