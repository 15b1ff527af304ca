"""Our LoRA adapters in PEFT, and PEFT's adapters in our merge.

Measured (demo-size Llama, 2 layers, fp32): PeftModel over the exported base vs our engine with adapters:
max |logit diff| 0 (same fp32 ops); peft ``merge_and_unload`` vs our merged store: ~5e-7; a PEFT-saved
rsLoRA adapter merged by us vs by peft: ~5e-7.
"""
import json
import os
import shutil
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, create_model, open_model  # noqa: E402
from offload_bitnet.formats.hf import export_from_store  # noqa: E402
from offload_bitnet.model.lora import ADAPTER_CONFIG, AdapterSet, LoRAConfig, lora_config_from_peft  # noqa: E402
from offload_bitnet.formats.merge import merge_lora  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fp32 Llama store, its HF export, adapters trained by our engine, their logits on fixed ids."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("peft")
    base = create_model(str(root / "base"), size="demo", arch="llama", n_layers=2, shadow_dtype="fp32")
    hf = export_from_store(BlockStore(base), str(root / "hf"), source=False, progress=False)
    adapter_dir = str(root / "adapter")
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"))
    engine = StreamingEngine(BlockStore(base), EngineOptions(lora=lora, adapter_dir=adapter_dir, seed=0,
                                                             optim=AdamWConfig(lr=1e-2)))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        engine.train_step([(torch.randint(0, 256, (2, 16), generator=generator), None)])
    ids = torch.randint(0, 256, (2, 12), generator=generator)
    logits = engine.logits(ids)
    engine.close()
    return {"root": root, "base": base, "hf": hf, "adapter": adapter_dir, "ids": ids, "logits": logits}


def _hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _peft_warnings(caught):
    return [str(w.message) for w in caught if f"{os.sep}peft{os.sep}" in w.filename]


def _store_logits(path, ids):
    with open_model(path) as engine:
        return engine.logits(ids)


def test_peft_loads_our_adapters_exactly(trained):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(_hf_model(trained["hf"]), trained["adapter"])
    assert _peft_warnings(caught) == []
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 8, 0.05, False)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # Every adapter tensor found its module: load once more under another name and look at the key report.
    report = model.load_adapter(trained["adapter"], adapter_name="again")
    assert [k for k in report.missing_keys if "lora_" in k] == [] and report.unexpected_keys == []
    model.set_adapter("default")
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        peft_logits = model(trained["ids"]).logits
    assert (peft_logits - trained["logits"]).abs().max().item() < 1e-4  # measured 0

    merged = merge_lora(trained["base"], trained["adapter"], str(trained["root"] / "merged"), progress=False)
    model.delete_adapter("again")
    unloaded = model.merge_and_unload()
    with torch.no_grad():
        unloaded_logits = unloaded(trained["ids"]).logits
    assert (unloaded_logits - _store_logits(merged, trained["ids"])).abs().max().item() < 1e-4  # measured ~5e-7
    assert (unloaded_logits - peft_logits).abs().max().item() < 1e-4


def test_adapter_saved_by_peft_merges_as_peft_merges(trained):
    """A foreign adapter (rsLoRA, two targets, random B) written by peft, merged by us and by peft."""
    model = _hf_model(trained["hf"])
    config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["v_proj", "q_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = trained["hf"]
    saved = str(trained["root"] / "peft_saved")
    peft_model.save_pretrained(saved)
    adapters = AdapterSet.from_peft(saved, BlockStore(trained["base"]).config)
    assert adapters.lora.targets == ("q_proj", "v_proj")
    assert adapters.lora.scaling == pytest.approx(6 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)

    merged = merge_lora(trained["base"], saved, str(trained["root"] / "merged_peft"), progress=False)
    with torch.no_grad():
        expected = peft_model.eval().merge_and_unload()(trained["ids"]).logits
    ours = _store_logits(merged, trained["ids"])
    assert (ours - expected).abs().max().item() < 1e-4  # measured ~5e-7
    assert (ours - _store_logits(trained["base"], trained["ids"])).abs().max().item() > 1e-2  # B is not zero


def test_peft_options_we_cannot_merge_are_refused(trained, tmp_path):
    with open(os.path.join(trained["adapter"], ADAPTER_CONFIG)) as handle:
        ours = json.load(handle)
    assert lora_config_from_peft(ours) == LoRAConfig(rank=4, alpha=8, dropout=0.05)
    for change, message in (({"use_dora": True}, "use_dora"), ({"target_modules": "all-linear"}, "target_modules"),
                            ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
                            ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"peft_type": "IA3"}, "LORA")):
        with pytest.raises(ValueError, match=message):
            lora_config_from_peft({**ours, **change})
    # A folder with only peft's files is read through the same checks.
    folder = tmp_path / "dora"
    shutil.copytree(trained["adapter"], folder, ignore=shutil.ignore_patterns("adapter_state.json"))
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**ours, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        merge_lora(trained["base"], str(folder), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")
