"""Hugging Face import/export: config translation, lossless round trips, loading exports in transformers,
packed BitNet in both conventions, and clear errors on bad folders."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from offload_bitnet.model.config import ConfigError  # noqa: E402
from offload_bitnet.store.write import create_model  # noqa: E402
from offload_bitnet.engine.streaming import StreamingEngine  # noqa: E402
from offload_bitnet.formats import detect_format, export_model, hf  # noqa: E402
from offload_bitnet.store.blockstore import BlockStore  # noqa: E402

VOCAB = 128
# transformers refuses to load BitNet-quantized checkpoints without accelerate (BitNetHfQuantizer).
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers loads BitNet checkpoints only with accelerate installed")
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _eager(eager_transformers_quantizers):
    yield


# ---------------------------------------------------------------------------------------------- helpers
def _randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def tiny_llama(tie=False, cls_name="LlamaForCausalLM", **overrides):
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config)
    _randomize(model)
    return model.eval()


def write_tokenizer(folder, kind="hf"):
    if kind == "hf":
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
        (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    else:
        (folder / "tokenizer.model").write_bytes(b"\x0a\x03abc")


def read_folder(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
    return tensors


def shard_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))


def engine_logits(store_path, ids):
    engine = StreamingEngine(BlockStore(store_path))
    try:
        return engine.logits(ids)
    finally:
        engine.close()


def ids_batch(seed=1):
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def bitnet_packed_folder(folder, convention: str, tie=False):
    """A packed BitNet checkpoint made with transformers' own quantization arithmetic and ``pack_weights``
    (independent of offload_bitnet.model.ternary). Returns the latent model it was made from."""
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import pack_weights

    config = BitNetConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = BitNetForCausalLM(config)
    _randomize(model)
    model.save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(folder, "model.safetensors"))
    packed = {}
    for key, value in state.items():
        if "_proj." in key:
            inverse = 1.0 / value.abs().mean().clamp(min=1e-5)  # transformers' WeightQuant
            codes = (value * inverse).round().clamp(-1, 1)
            packed[key] = pack_weights(codes.clone())
            gamma = 1.0 / inverse
            packed[key + "_scale"] = (gamma if convention == "autobitlinear" else 1.0 / gamma).reshape(1)
        else:
            packed[key] = value
    save_file(packed, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config_json = json.loads((folder / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "bitnet", "linear_class": convention,
                                          "quantization_mode": "offline"}
    (folder / "config.json").write_text(json.dumps(config_json))
    return model


def load_bitnet(folder):
    from transformers import BitNetForCausalLM

    return BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------- config
def test_config_from_hf_reads_llama_fields():
    config = hf.config_from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "bos_token_id": 128000, "eos_token_id": [128001, 128009],
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert (config.arch, config.n_kv_heads, config.head_dim, config.hidden_dim) == ("llama", 2, 64, 512)
    assert config.tie_embeddings and config.rope_theta == 500000.0 and config.max_seq_len == 4096
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert (config.bos_id, config.eos_id, config.extra["eos_ids"]) == (128000, 128001, [128001, 128009])


def test_config_from_hf_legacy_rope_mistral_and_bitnet_defaults():
    legacy = hf.config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
                                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                                "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy.rope_theta == 1e6 and legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert legacy.n_kv_heads == 4 and legacy.head_dim == 16 and not legacy.tie_embeddings
    mistral = hf.config_from_hf({"architectures": ["MistralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
                                 "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                                 "num_key_value_heads": 1, "head_dim": None, "sliding_window": 4096})
    assert mistral.arch == "llama" and mistral.head_dim == 16 and mistral.extra["sliding_window"] == 4096
    bitnet = hf.config_from_hf({"model_type": "bitnet", "vocab_size": 100, "hidden_size": 64,
                                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4})
    assert bitnet.arch == "bitnet" and bitnet.rope_theta == 500000.0


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"hidden_size": None}, "'hidden_size'"),
])
def test_config_from_hf_rejects_what_it_cannot_run(change, message):
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match="config.json") as error:
        hf.config_from_hf({**base, **change})
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tie,dtype,shard", [(False, torch.float32, "40KB"), (True, torch.bfloat16, None),
                                             (False, torch.float16, "60KB")],
                         ids=["untied-fp32-sharded", "tied-bf16-single", "untied-fp16-sharded"])
def test_llama_round_trip_is_identical(tmp_path, tie, dtype, shard):
    src = tmp_path / "src"
    model = tiny_llama(tie).to(dtype)
    model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    write_tokenizer(src)
    store_path = hf.import_to_store(str(src), str(tmp_path / "store"), progress=False)
    store = BlockStore(store_path)
    assert store.settings.mode == "full"
    assert store.settings.shadow_dtype == {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    source = store.extra["source"]
    assert (source["format"], source["architecture"], source["dtype"]) == ("hf", "LlamaForCausalLM",
                                                                          str(dtype).split(".")[1])
    assert source["config"] == json.loads((src / "config.json").read_text())
    assert store.extra["tokenizer"]["kind"] == "hf"
    assert sorted(os.listdir(os.path.join(store_path, "tokenizer"))) == ["generation_config.json", "tokenizer.json",
                                                                        "tokenizer_config.json"]

    out = tmp_path / "out"
    export_model(store_path, str(out))  # format "source"
    assert shard_files(out) == shard_files(src)
    if shard:
        assert len(shard_files(src)) > 2
        original = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == original
        assert source["shard_layout"] == {f: [k for k, v in original.items() if v == f] for f in set(original.values())}
    else:
        assert not (out / "model.safetensors.index.json").exists()
    expected, got = read_folder(src), read_folder(out)
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_full_precision_export_of_a_created_store_loads_in_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 32}
    store_path = create_model(str(tmp_path / "store"), size="demo", arch="llama", shadow_dtype="fp32", n_layers=2,
                              rope_scaling=scaling)
    out = tmp_path / "out"
    export_model(store_path, str(out), format="hf", shards=3, progress=False)
    assert len(shard_files(out)) == 3 and (out / "model.safetensors.index.json").exists()
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    assert (engine_logits(store_path, ids) - expected).abs().max() <= ATOL


def test_mistral_imports_and_matches_transformers(tmp_path, capsys):
    model = tiny_llama(cls_name="MistralForCausalLM", sliding_window=32)
    model.save_pretrained(tmp_path / "src")
    store_path = hf.import_to_store(str(tmp_path / "src"), str(tmp_path / "store"), progress=True)
    assert "sliding_window=32 is not applied" in capsys.readouterr().err
    ids = ids_batch()  # 11 tokens: inside the window, where full causal attention is exact
    with torch.no_grad():
        expected = model(ids).logits
    assert (engine_logits(store_path, ids) - expected).abs().max() <= ATOL
    export_model(store_path, str(tmp_path / "out"), progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_export_progress_and_dtype_override(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "src")
    store_path = hf.import_to_store(str(tmp_path / "src"), str(tmp_path / "store"), progress=False)
    hf.export_from_store(BlockStore(store_path), str(tmp_path / "out"), dtype="bfloat16", progress=True)
    err = capsys.readouterr().err
    assert "exporting" in err and "units 5/5 head" in err and "ETA" in err
    tensors = read_folder(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------- BitNet
@needs_accelerate
@pytest.mark.parametrize("convention", ["autobitlinear", "bitlinear"])
def test_packed_bitnet_imports_exports_and_loads_in_transformers(tmp_path, convention):
    src = tmp_path / "src"
    bitnet_packed_folder(src, convention)
    reference = load_bitnet(src)
    ids = ids_batch()
    with torch.no_grad():
        expected = reference(ids).logits

    store_path = hf.import_to_store(str(src), str(tmp_path / "store"), progress=False)
    store = BlockStore(store_path)
    assert store.settings.mode == "qat" and store.extra["source"]["weights"] == "packed"
    assert store.extra["source"]["packed_convention"] == convention
    assert (engine_logits(store_path, ids) - expected).abs().max() <= ATOL

    # back to the source: identical codes and config, scales equal to fp32 rounding
    export_model(store_path, str(tmp_path / "same"), progress=False)
    original, again = read_folder(src), read_folder(tmp_path / "same")
    assert list(again) == list(original)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype, key
        if key.endswith("_scale"):
            assert torch.allclose(again[key], tensor, rtol=1e-6, atol=0), key
        else:
            assert torch.equal(again[key], tensor), key
    assert json.loads((tmp_path / "same" / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    # packed autobitlinear export, whatever the source convention
    export_model(store_path, str(tmp_path / "packed"), format="hf-bitnet", progress=False)
    config_json = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config_json["quantization_config"]["linear_class"] == "autobitlinear"
    assert config_json["quantization_config"]["quantization_mode"] == "offline"
    packed = read_folder(tmp_path / "packed")
    assert packed["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8
    assert packed["model.layers.0.mlp.down_proj.weight"].shape == (16, 96)
    assert packed["model.layers.0.mlp.down_proj.weight_scale"].shape == (1,)
    with torch.no_grad():
        got = load_bitnet(tmp_path / "packed")(ids).logits
    assert (got - expected).abs().max() <= ATOL


@needs_accelerate
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_bitnet_qat_store_exports_packed_and_latent(tmp_path, tie):
    store_path = create_model(str(tmp_path / "store"), size="demo", arch="bitnet", shadow_dtype="fp32", n_layers=2,
                              tie_embeddings=tie)
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = engine_logits(store_path, ids)
    hf.export_from_store(BlockStore(store_path), str(tmp_path / "packed"), bitnet=True, progress=False)
    hf.export_from_store(BlockStore(store_path), str(tmp_path / "latent"), progress=False)
    latent_config = json.loads((tmp_path / "latent" / "config.json").read_text())
    assert latent_config["quantization_config"]["quantization_mode"] == "online"
    assert ("lm_head.weight" in read_folder(tmp_path / "packed")) != tie
    for folder in ("packed", "latent"):
        model = load_bitnet(tmp_path / folder)
        assert model.config.tie_word_embeddings == tie
        with torch.no_grad():
            assert (model(ids).logits - ours).abs().max() <= ATOL, folder


@needs_accelerate
def test_a_16_bit_packed_export_loads_in_its_own_dtype(tmp_path):
    """The default (fp16 shadow) store: config.json names the dtype its float tensors are written in, and
    transformers loads it so (dtype="auto"). dtype=torch.float32 fails inside transformers (its
    BitNetDeserialize leaves unpacked tensors uncast; README, "hf-bitnet and dtypes")."""
    from safetensors import safe_open
    from transformers import BitNetForCausalLM

    store_path = create_model(str(tmp_path / "store"), size="demo", arch="bitnet", n_layers=2)
    ids = torch.randint(0, 260, (1, 10), generator=torch.Generator().manual_seed(0))
    ours = engine_logits(store_path, ids)
    out = export_model(store_path, str(tmp_path / "packed"), format="hf-bitnet", progress=False)
    config_json = json.loads((tmp_path / "packed" / "config.json").read_text())
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as handle:
        float_dtypes = {str(handle.get_slice(k).get_dtype()) for k in handle.keys()} - {"U8"}
    assert config_json["torch_dtype"] == "float16" and float_dtypes == {"F16"}
    model = BitNetForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert model.model.embed_tokens.weight.dtype == torch.float16
    with torch.no_grad():
        theirs = model(ids).logits.float()
    assert (theirs - ours).abs().max() <= 0.05 * ours.abs().max()  # fp16 arithmetic against our fp32


def test_packed_export_of_a_llama_store_is_refused(tmp_path):
    store_path = create_model(str(tmp_path / "store"), size="demo", arch="llama", n_layers=1)
    with pytest.raises(ValueError, match="arch='bitnet'"):
        hf.export_from_store(BlockStore(store_path), str(tmp_path / "out"), bitnet=True, progress=False)


def test_sentencepiece_tokenizer_is_described(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    write_tokenizer(tmp_path / "src", kind="sentencepiece")
    store_path = hf.import_to_store(str(tmp_path / "src"), str(tmp_path / "store"), progress=False)
    description = BlockStore(store_path).extra["tokenizer"]
    assert description["kind"] == "sentencepiece" and description["model"] == "tokenizer.model"
    copied = os.path.join(store_path, "tokenizer", "tokenizer.model")
    assert open(copied, "rb").read() == (tmp_path / "src" / "tokenizer.model").read_bytes()


# ---------------------------------------------------------------------------------------------- errors
def test_detect(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    assert hf.detect(str(tmp_path / "src")) and detect_format(str(tmp_path / "src")) == "hf"
    os.remove(tmp_path / "src" / "config.json")
    assert not hf.detect(str(tmp_path / "src"))


def test_missing_config_json(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    os.remove(tmp_path / "src" / "config.json")
    with pytest.raises(hf.HFFormatError, match="has no config.json"):
        hf.import_to_store(str(tmp_path / "src"), str(tmp_path / "store"), progress=False)
    with pytest.raises(ValueError, match="config.json"):
        detect_format(str(tmp_path / "src"))
    assert not (tmp_path / "store").exists()


def test_unsupported_architecture(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    config_json = json.loads((tmp_path / "src" / "config.json").read_text())
    config_json["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ConfigError, match=r"config.json: architecture Qwen2ForCausalLM is not supported"):
        hf.import_to_store(str(tmp_path / "src"), str(tmp_path / "store"), progress=False)


def test_shape_mismatch_names_the_tensor(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    config_json = json.loads((tmp_path / "src" / "config.json").read_text())
    config_json["intermediate_size"] = 128
    (tmp_path / "src" / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(hf.HFFormatError, match=r"model.layers.0.mlp.gate_proj.weight in .*model.safetensors has "
                                               r"shape \[96, 64\], but config.json implies \[128, 64\]"):
        hf.import_to_store(str(tmp_path / "src"), str(tmp_path / "store"), progress=False)
    assert not (tmp_path / "store").exists()


def test_missing_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_llama().save_pretrained(tmp_path / "src")
    path = str(tmp_path / "src" / "model.safetensors")
    state = load_file(path)
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(hf.HFFormatError, match="model.layers.1.self_attn.v_proj.weight is missing"):
        hf.import_to_store(str(tmp_path / "src"), str(tmp_path / "store"), progress=False)


def test_truncated_safetensors(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src", max_shard_size="60KB")
    victim = shard_files(tmp_path / "src")[1]
    data = (tmp_path / "src" / victim).read_bytes()
    (tmp_path / "src" / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(hf.HFFormatError, match=rf"{victim} is not a readable safetensors file .* truncated"):
        hf.import_to_store(str(tmp_path / "src"), str(tmp_path / "store"), progress=False)
    assert not (tmp_path / "store").exists()
