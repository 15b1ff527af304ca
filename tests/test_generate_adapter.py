"""Generation with LoRA adapters applied by the engine, without merging (test_gen.py --adapter, open_model)."""
import json
import os

import pytest
import torch

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, create_model, open_model
from offload_bitnet.formats import detect_format
from offload_bitnet.generate import Generator, SamplingOptions
from offload_bitnet.model.lora import LoRAConfig
from offload_bitnet.formats.merge import load_adapters, merge_lora


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fp32 Llama, LoRA adapters trained on one repeated sequence until they change its greedy output,
    and the merged store."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gen-adapter")
    base = create_model(str(root / "base"), size="demo", arch="llama", n_layers=2, shadow_dtype="fp32")
    adapter_dir = str(root / "run" / "adapter")
    lora = LoRAConfig(rank=4, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))
    engine = StreamingEngine(BlockStore(base), EngineOptions(lora=lora, adapter_dir=adapter_dir, seed=0,
                                                             optim=AdamWConfig(lr=3e-2)))
    text = torch.tensor([list(b"Ahoy matey! Ahoy matey! Ahoy matey!")])
    for _ in range(12):
        engine.train_step([(text, None)])
    engine.close()
    merged = merge_lora(base, adapter_dir, str(root / "merged"), progress=False, shadow_dtype="fp32")
    return {"root": root, "base": base, "adapter": adapter_dir, "merged": merged, "prompt": list(b"Ahoy ma")}


def _generate(store, prompt, adapters=None, tokens=24):
    generator = Generator(store, adapters=adapters, memory_budget=0)  # streamed: the adapters apply per unit read
    try:
        logits = generator._step(torch.tensor([prompt]), torch.arange(len(prompt)), None,
                                 [{} for _ in range(generator.config.n_layers)])
        result = generator.generate([prompt], SamplingOptions(max_new_tokens=tokens), stop_ids=set())
    finally:
        generator.close()
    return result.tokens[0], logits


def test_adapters_generate_as_the_merged_store(trained):
    base = BlockStore(trained["base"])
    adapters = load_adapters(trained["adapter"], base.config)
    with_adapters, adapter_logits = _generate(base, trained["prompt"], adapters)
    merged, merged_logits = _generate(BlockStore(trained["merged"]), trained["prompt"])
    plain, plain_logits = _generate(base, trained["prompt"])
    assert with_adapters == merged  # greedy tokens identical
    assert (adapter_logits - merged_logits).abs().max().item() < 1e-4
    assert with_adapters != plain  # the adapters were trained enough to change the output
    assert (adapter_logits - plain_logits).abs().max().item() > 0.1


def test_open_model_with_adapter_matches_merged(trained):
    ids = torch.tensor([trained["prompt"]])
    with open_model(trained["base"], adapter=trained["adapter"]) as engine:
        adapted = engine.logits(ids)
    with open_model(trained["merged"]) as engine:
        merged = engine.logits(ids)
    assert (adapted - merged).abs().max().item() < 1e-4


def test_test_gen_adapter_option(trained, capsys):
    import test_gen

    prompt = bytes(trained["prompt"]).decode()
    assert test_gen.main([trained["base"], "--adapter", trained["adapter"], "--prompt", prompt,
                          "--max-new-tokens", "12", "--tokenizer", "byte"]) == 0
    adapted = capsys.readouterr()
    assert "applying LoRA adapters" in adapted.err
    assert test_gen.main([trained["merged"], "--prompt", prompt, "--max-new-tokens", "12",
                          "--tokenizer", "byte"]) == 0
    assert capsys.readouterr().out == adapted.out


def test_adapter_folder_given_as_model_names_the_adapter_option(trained):
    with pytest.raises(ValueError, match="--adapter"):
        detect_format(trained["adapter"])
    with open(os.path.join(trained["adapter"], "adapter_config.json")) as handle:
        assert json.load(handle)["r"] == 4


def test_wrong_adapter_folder_is_refused_clearly(trained, tmp_path):
    import test_gen

    assert test_gen.main([trained["base"], "--adapter", str(tmp_path), "--prompt", "x", "--tokenizer", "byte"]) == 1


def test_adapters_on_a_ternary_base_generate_as_the_engine_computes(tmp_path):
    """A qat BitNet base (quantized forward): the generator with adapters gives the engine's logits."""
    base = create_model(str(tmp_path / "base"), size="demo", arch="bitnet", n_layers=2)
    adapter_dir = str(tmp_path / "adapter")
    engine = StreamingEngine(BlockStore(base), EngineOptions(lora=LoRAConfig(rank=4, alpha=8), adapter_dir=adapter_dir,
                                                             optim=AdamWConfig(lr=3e-2)))
    text = torch.tensor([list(b"Ahoy matey! Ahoy matey!")])
    for _ in range(3):
        engine.train_step([(text, None)])
    engine.close()
    prompt = list(b"Ahoy ma")
    store = BlockStore(base)
    _, generated = _generate(store, prompt, load_adapters(adapter_dir, store.config), tokens=1)
    with open_model(base, adapter=adapter_dir) as engine:
        expected = engine.logits(torch.tensor([prompt]))[:, -1]
    with open_model(base) as engine:
        plain = engine.logits(torch.tensor([prompt]))[:, -1]
    assert (generated - expected).abs().max().item() < 1e-4
    assert (expected - plain).abs().max().item() > 1e-3
