"""A LoRA run's adapters in peft (AutoPeftModelForCausalLM) and llama.cpp (adapter GGUF), without merging."""
import json
import os

import pytest
import torch

from offload_bitnet import BlockStore, create_model, open_model
from offload_bitnet.cli import main as cli_main
from offload_bitnet.formats.adapters import AdapterExportError, export_adapter, resolve_adapter
from offload_bitnet.model.lora import ADAPTER_CONFIG
from offload_bitnet.train.trainer import main as finetune
from repo_paths import REPO

TEST_DATA = os.path.join(REPO, "test_data")


def lora_run(model, runs, experiment, *extra):
    args = [model, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(runs), "--experiment",
            experiment, "--mode", "lora", "--lora-rank", "4", "--num-train-iters", "3", "--batch-size", "2",
            "--max-seq-len", "64", "--lr", "2e-2", "--no-plot", "--seed", "0", *extra]
    assert finetune(args) == 0
    return os.path.join(str(runs), experiment)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A tiny fp32 Llama written by transformers (byte-sized vocabulary, so the byte tokenizer fits), and a LoRA
    run on it through finetune.py."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf-run")
    os.environ["OFFLOAD_BITNET_CACHE"] = str(root / "cache")
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    source = root / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(str(source))
    try:
        run = lora_run(str(source), root / "runs", "hf-lora")
    finally:
        os.environ.pop("OFFLOAD_BITNET_CACHE")
    return {"root": root, "source": str(source), "run": run, "adapter": os.path.join(run, "adapter")}


def test_run_records_the_hf_folder_as_peft_base(hf_run):
    with open(os.path.join(hf_run["adapter"], ADAPTER_CONFIG)) as handle:
        assert json.load(handle)["base_model_name_or_path"] == os.path.abspath(hf_run["source"])


def test_auto_peft_model_loads_the_run_adapter(hf_run):
    peft = pytest.importorskip("peft")
    model = peft.AutoPeftModelForCausalLM.from_pretrained(hf_run["adapter"], dtype=torch.float32).eval()
    ids = torch.tensor([list(b"The light of the lamp was dim.")])
    with torch.no_grad():
        theirs = model(ids).logits
    _, store = resolve_adapter(hf_run["run"])
    with open_model(store, adapter=hf_run["adapter"]) as engine:
        ours = engine.logits(ids)
    with open_model(store) as engine:
        base = engine.logits(ids)
    assert (theirs - ours).abs().max().item() < 1e-4
    assert (ours - base).abs().max().item() > 1e-3  # the adapters changed the model


def test_export_adapter_peft_exports_a_base_peft_can_load(tmp_path):
    peft = pytest.importorskip("peft")
    store = create_model(str(tmp_path / "base"), size="demo", arch="llama", n_layers=2, shadow_dtype="fp32")
    run = lora_run(store, tmp_path / "runs", "demo-lora")
    out = str(tmp_path / "peft")
    assert cli_main(["export-adapter", run, out, "--format", "peft"]) == 0
    with open(os.path.join(out, ADAPTER_CONFIG)) as handle:
        assert json.load(handle)["base_model_name_or_path"] == os.path.join(out, "base")
    model = peft.AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([list(b"Ahoy there")])
    with torch.no_grad():
        theirs = model(ids).logits
    with open_model(store, adapter=os.path.join(run, "adapter")) as engine:
        assert (theirs - engine.logits(ids)).abs().max().item() < 1e-4
    with pytest.raises(AdapterExportError, match="not empty"):
        export_adapter(run, out)


def test_gguf_adapter_layout(tmp_path):
    gguf = pytest.importorskip("gguf")
    from offload_bitnet.formats.gguf import permute_qk
    from offload_bitnet.formats.merge import load_adapters

    store = create_model(str(tmp_path / "base"), size="demo", arch="llama", n_layers=2, shadow_dtype="fp32")
    run = lora_run(store, tmp_path / "runs", "demo-lora")
    path = export_adapter(run, str(tmp_path / "lora.gguf"), format="gguf")
    reader = gguf.GGUFReader(path)

    def value(key):
        field = reader.fields[key]
        return field.contents()

    assert (value("general.architecture"), value("general.type"), value("adapter.type")) == ("llama", "adapter",
                                                                                           "lora")
    assert value("adapter.lora.alpha") == 16.0
    config = BlockStore(store).config
    adapters = load_adapters(os.path.join(run, "adapter"), config)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * config.n_layers * 7
    q_a, q_b = tensors["blk.1.attn_q.weight.lora_a"], tensors["blk.1.attn_q.weight.lora_b"]
    assert list(q_a.shape) == [config.dim, 4] and list(q_b.shape) == [4, config.n_heads * config.head_dim]
    mats = adapters.weights[(1, "q_proj")]
    assert torch.equal(torch.from_numpy(q_a.data.copy()), mats["lora_A"])
    assert torch.equal(torch.from_numpy(q_b.data.copy()), permute_qk(mats["lora_B"], config.n_heads))
    k_b = tensors["blk.0.attn_k.weight.lora_b"]
    assert torch.equal(torch.from_numpy(k_b.data.copy()), permute_qk(adapters.weights[(0, "k_proj")]["lora_B"],
                                                                     config.n_kv_heads))
    v_b = tensors["blk.0.attn_v.weight.lora_b"]
    assert torch.equal(torch.from_numpy(v_b.data.copy()), adapters.weights[(0, "v_proj")]["lora_B"])


def test_gguf_adapter_of_a_bitnet_base_is_refused(tmp_path):
    store = create_model(str(tmp_path / "base"), size="demo", arch="bitnet", n_layers=1)
    run = lora_run(store, tmp_path / "runs", "bitnet-lora", "--num-train-iters", "1")
    assert cli_main(["export-adapter", run, str(tmp_path / "a.gguf"), "--format", "gguf"]) == 1


def test_export_adapter_refuses_a_folder_without_adapters(tmp_path, capsys):
    assert cli_main(["export-adapter", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "neither a LoRA run folder" in capsys.readouterr().err
