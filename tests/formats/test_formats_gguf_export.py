"""GGUF export of any store (formats/gguf_export.py, gguf_vocab.py, ollama.py): architectures and their refusals,
tensor types, every vocabulary kind, rope scaling, the CLI and finetune options. llama.cpp itself runs the
exports in test_formats_gguf_llamacpp.py."""
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from offload_bitnet.api import open_model  # noqa: E402
from offload_bitnet.store.write import create_model  # noqa: E402
from offload_bitnet.formats import export_model  # noqa: E402
from offload_bitnet.formats import gguf as gguf_format  # noqa: E402
from offload_bitnet.formats.gguf import GGUFError  # noqa: E402
from offload_bitnet.formats.gguf_export import gguf_tensor_name  # noqa: E402
from offload_bitnet.tokenizers.loaders import install_tokenizer  # noqa: E402
from offload_bitnet.store.blockstore import BlockStore, StoreSettings  # noqa: E402
from offload_bitnet.model.ternary import unpack_weight  # noqa: E402
from offload_bitnet.tokenizers.gguf_rebuild import build_gguf_bpe, bytes_to_unicode  # noqa: E402
from offload_bitnet.tokenizers.runtime import load_tokenizer
from repo_paths import REPO

ROOT = REPO
LLAMA2_SPM = os.path.join(ROOT, "..", "shared", "data", "llama2-tokenizer.model")
FP32 = StoreSettings(mode="full", shadow_dtype="fp32")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def metadata(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def dequantized(tensor) -> torch.Tensor:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.asarray(values, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape))))


def test_llama_store_with_byte_tokenizer_round_trips_through_f32(tmp_path):
    """A created (blank) LLaMA store: llama architecture, llama.cpp's own tensor names, the byte vocabulary, and
    import of the export gives back the same weights, logits and token ids."""
    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", shadow_dtype="fp32", n_layers=2, seed=3)
    path = export_model(store, str(tmp_path / "out"), format="gguf", gguf_type="f32", progress=False)
    assert os.path.basename(path) == "model.gguf" and not os.path.exists(path + ".partial")
    meta = metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.hidden_activation"] == "silu"
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.bos_token_id"] == 256
    names = set(tensors(path))
    arch_names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]}
    assert {n.rsplit(".", 1)[0].replace(".0.", ".{bid}.").replace(".1.", ".{bid}.") for n in names} <= arch_names
    assert "blk.1.attn_q.weight" in names and "output.weight" in names  # demo has an untied head
    back = gguf_format.import_to_store(path, str(tmp_path / "b"), FP32, progress=False)
    a, b = BlockStore(store), BlockStore(back)
    for unit in a.units:
        x, y = a.read(unit, "weights"), b.read(unit, "weights")
        assert all(torch.equal(x[n].float(), y[n].float()) for n in x), unit
    ids = torch.randint(0, 260, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(open_model(store).logits(ids), open_model(back).logits(ids), atol=1e-5)
    text = "Hello, wörld\n  x"
    assert load_tokenizer(back, b.extra["tokenizer"]).encode(text, bos=False) == list(text.encode())
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "</s>"' in modelfile


def test_qk_are_permuted_for_llama_rope(tmp_path):
    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", shadow_dtype="fp32", n_layers=1)
    path = export_model(store, str(tmp_path / "out"), format="gguf", gguf_type="f32", progress=False)
    block = BlockStore(store).read("block.000", "weights")
    written = tensors(path)
    config = BlockStore(store).config
    assert torch.equal(dequantized(written["blk.0.attn_q.weight"]), gguf_format.permute_qk(block["q_proj"], 4))
    assert torch.equal(dequantized(written["blk.0.attn_k.weight"]),
                       gguf_format.permute_qk(block["k_proj"], config.n_kv_heads))
    assert torch.equal(dequantized(written["blk.0.attn_v.weight"]), block["v_proj"])


@pytest.mark.parametrize("gguf_type", ["tq2_0", "tq1_0"])
def test_ternary_store_exports_its_codes_exactly(tmp_path, gguf_type, capsys):
    """A qat store's projections are its codes times its scale, exact up to the fp16 block scale; embedding F16,
    norms F32; a projection whose rows are not a multiple of 256 falls back to F16 with a note."""
    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", mode="qat", dim=256, hidden_dim=384,
                         n_heads=4, n_kv_heads=2, n_layers=1, seed=1)
    options = {} if gguf_type == "tq2_0" else {"gguf_type": gguf_type}  # tq2_0 is the default for qat
    path = export_model(store, str(tmp_path / "out"), format="gguf", **options)
    out = capsys.readouterr().out
    assert "note: blk.0.ffn_down.weight: rows of 384 values are not a multiple of 256" in out
    written = tensors(path)
    assert metadata(path)["general.file_type"] == getattr(gguf.LlamaFileType, "MOSTLY_" + gguf_type.upper())
    weights = BlockStore(store).read("block.000", "weights")
    for name in PROJECTIONS:
        tensor = written[gguf_tensor_name("llama", "block.000", name)]
        expected = unpack_weight(weights[f"{name}.packed"], weights[f"{name}.scale"])
        if name in ("q_proj", "k_proj"):
            expected = gguf_format.permute_qk(expected, 4 if name == "q_proj" else 2)
        assert tensor.tensor_type == (Q.F16 if name == "down_proj" else getattr(Q, gguf_type.upper())), name
        got = dequantized(tensor)
        assert torch.equal(torch.sign(got), torch.sign(expected)), name  # every code survives
        scale = float(weights[f"{name}.scale"])
        assert torch.allclose(got, expected, rtol=0, atol=scale * 1e-3), name  # fp16 rounding of the scale
    assert written["token_embd.weight"].tensor_type == Q.F16
    assert written["blk.0.attn_norm.weight"].tensor_type == Q.F32


def test_q8_0_and_bf16_types(tmp_path):
    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", n_layers=1)
    for kind, qtype in (("q8_0", Q.Q8_0), ("bf16", Q.BF16)):
        written = tensors(export_model(store, str(tmp_path / kind), format="gguf", gguf_type=kind, progress=False))
        assert written["blk.0.ffn_up.weight"].tensor_type == qtype and written["token_embd.weight"].tensor_type == qtype
        assert written["output_norm.weight"].tensor_type == Q.F32
        up = BlockStore(store).read("block.000", "weights")["up_proj"].float()
        assert torch.allclose(dequantized(written["blk.0.ffn_up.weight"]), up, atol=float(up.abs().max()) / 100)


def test_refusals_write_nothing(tmp_path):
    full = create_model(str(tmp_path / "full"), size="demo", arch="llama", n_layers=1)
    with pytest.raises(GGUFError, match="encodes ternary weights only"):
        export_model(full, str(tmp_path / "o1"), format="gguf", gguf_type="tq2_0")
    bitnet = create_model(str(tmp_path / "bitnet"), size="demo", arch="bitnet", n_layers=1, tie_embeddings=True)
    with pytest.raises(GGUFError, match="hard-codes SiLU") as error:
        export_model(bitnet, str(tmp_path / "o2"), format="gguf")
    assert "--format hf-bitnet" in str(error.value) and "untied" not in str(error.value)
    untied = create_model(str(tmp_path / "untied"), size="demo", arch="bitnet", n_layers=1, tie_embeddings=False)
    with pytest.raises(GGUFError, match="no architecture for sub-norms with an untied head"):
        export_model(untied, str(tmp_path / "o3"), format="gguf")
    blank = create_model(str(tmp_path / "blank"), size="demo", arch="llama", n_layers=1, vocab_size=512)
    with pytest.raises(GGUFError, match="cannot write the tokenizer.*--tokenizer PATH"):
        export_model(blank, str(tmp_path / "o4"), format="gguf")
    with pytest.raises(ValueError, match="--gguf-type applies to GGUF exports"):
        export_model(full, str(tmp_path / "o5"), format="hf", gguf_type="f16")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_silu_bitnet_maps_to_the_bitnet_architecture(tmp_path):
    """A BitNet model whose MLP is SiLU (the 1bitLLM reproductions llama.cpp's bitnet graph was written for):
    sub-norms under llama.cpp's names, rope left in transformers' half-split layout (bitnet uses NEOX rope)."""
    from offload_bitnet.model.config import config_for_size
    from offload_bitnet.formats.gguf_export import gguf_architecture

    config = config_for_size("demo", "bitnet", n_layers=1, tie_embeddings=True, extra={"hidden_act": "silu"})
    assert gguf_architecture(config) == "bitnet"
    store = create_model(str(tmp_path / "a"), size="demo", arch="bitnet", n_layers=1, tie_embeddings=True,
                         extra={"hidden_act": "silu"})
    path = export_model(store, str(tmp_path / "out"), format="gguf", gguf_type="f16", progress=False)
    meta, written = metadata(path), tensors(path)
    assert meta["general.architecture"] == "bitnet" and meta["bitnet.hidden_activation"] == "silu"
    assert {"blk.0.attn_sub_norm.weight", "blk.0.ffn_sub_norm.weight"} <= set(written)
    codes = BlockStore(store).read("block.000", "weights")
    q = unpack_weight(codes["q_proj.packed"], codes["q_proj.scale"])
    assert torch.allclose(dequantized(written["blk.0.attn_q.weight"]), q, atol=float(codes["q_proj.scale"]) * 1e-3)


def test_llama3_rope_scaling_survives_export_and_import(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", n_layers=1, rope_scaling=scaling)
    path = export_model(store, str(tmp_path / "out"), format="gguf", progress=False)
    assert "rope_freqs.weight" in tensors(path)
    back = gguf_format.import_to_store(path, str(tmp_path / "b"), progress=False)
    assert BlockStore(back).config.rope_scaling == scaling


def tiny_bpe_folder(folder) -> str:
    """A byte-level BPE tokenizer.json (ChatML specials, a few merges) and tokenizer_config.json."""
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "in", "Ġa"]
    types = [1] * len(tokens) + [3, 3, 3]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    data = {"model": "gpt2", "pre": "smollm", "tokens": tokens, "token_type": types,
            "merges": ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]}
    os.makedirs(folder, exist_ok=True)
    build_gguf_bpe(data).save(os.path.join(folder, "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}, handle)
    return folder


def test_hf_bpe_vocabulary_with_chat_template(tmp_path, capsys):
    """A store with a tokenizer.json: gpt2 vocabulary, merges, token types, ChatML template, EOS and end-of-turn
    ids, and an Ollama Modelfile. The pre-tokenizer is found by llama.cpp's converter's fingerprint of the
    encoded check text, which no real model shares with this toy vocabulary: ``default``, with a note (SmolLM2's
    real one is found in test_formats_gguf_llamacpp.py)."""
    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", n_layers=1, vocab_size=272)
    install_tokenizer(store, tiny_bpe_folder(str(tmp_path / "tok")))
    path = export_model(store, str(tmp_path / "out"), format="gguf", progress=False)
    meta = metadata(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "default"
    assert "note: llama.cpp knows no pre-tokenizer for this vocabulary" in capsys.readouterr().out
    assert meta["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    assert len(meta["tokenizer.ggml.tokens"]) == 272 and meta["tokenizer.ggml.tokens"][271] == "[PAD271]"
    assert meta["tokenizer.ggml.token_type"][261:264] == [3, 3, 3]
    assert meta["tokenizer.ggml.eos_token_id"] == 263 and meta["tokenizer.ggml.eot_token_id"] == 263
    assert meta["tokenizer.chat_template"].startswith("{% for m in messages %}<|im_start|>")
    ours = load_tokenizer(store, BlockStore(store).extra["tokenizer"])
    back = gguf_format.import_to_store(path, str(tmp_path / "b"), progress=False)
    theirs = load_tokenizer(back, BlockStore(back).extra["tokenizer"])
    chat = [{"role": "user", "content": "the the ant"}]
    assert theirs.encode_chat(chat) == ours.encode_chat(chat) and 258 in ours.encode_chat(chat)
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile


@pytest.mark.skipif(not os.path.isfile(LLAMA2_SPM), reason="../shared/data/llama2-tokenizer.model is absent")
def test_sentencepiece_vocabulary(tmp_path):
    folder = tmp_path / "spm"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(open(LLAMA2_SPM, "rb").read())
    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", n_layers=1, vocab_size=32000)
    install_tokenizer(store, str(folder / "tokenizer.model"))
    path = export_model(store, str(tmp_path / "out"), format="gguf", progress=False)
    meta = metadata(path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6] and len(meta["tokenizer.ggml.scores"]) == 32000
    from pydoc_data.topics import topics

    text = topics["specialnames"][:2000]
    back = gguf_format.import_to_store(path, str(tmp_path / "b"), progress=False)
    ours = load_tokenizer(store, BlockStore(store).extra["tokenizer"])
    assert load_tokenizer(back, BlockStore(back).extra["tokenizer"]).encode(text) == ours.encode(text)


def test_cli_and_finetune_options(tmp_path, capsys):
    from offload_bitnet.cli import main
    from offload_bitnet.train.runconfig import RunConfig, RunConfigError

    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", mode="qat", n_layers=1)
    assert main(["export", store, str(tmp_path / "out"), "--format", "gguf", "--gguf-type", "TQ1_0"]) == 0
    assert tensors(tmp_path / "out" / "model.gguf")["token_embd.weight"].tensor_type == Q.F16
    assert "rows of 128 values are not a multiple of 256" in capsys.readouterr().out  # demo dim 128: F16
    assert main(["export", store, str(tmp_path / "bad"), "--format", "hf", "--gguf-type", "f16"]) == 1
    assert "--gguf-type applies to GGUF exports" in capsys.readouterr().err
    with pytest.raises(RunConfigError, match="gguf_type.*applies to --export-format gguf"):
        RunConfig(model=store, data=["x.txt"], export_format="hf", gguf_type="f16").validate()
    RunConfig(model=store, data=["x.txt"], export_format="gguf", gguf_type="q8_0").validate()


def test_llama3_rank_file_becomes_a_gpt2_vocabulary_with_its_chat_format(tmp_path):
    """A Meta Llama 3 tiktoken rank file (here a small one trained on pydoc topics): gpt2 vocabulary with the
    merges the ranks imply, Meta's special tokens as control tokens, <|eot_id|> as end of turn, the Llama 3
    chat template, and the Llama 3 form of it in the Modelfile."""
    import base64

    from test_tokenizer import trained_ranks

    ranks = trained_ranks(600)
    base = len(ranks)
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", n_layers=1, vocab_size=base + 256,
                         bos_id=base, eos_id=base + 1)
    install_tokenizer(store, str(folder / "tokenizer.model"))
    assert BlockStore(store).extra["tokenizer"]["kind"] == "tiktoken"
    path = export_model(store, str(tmp_path / "out"), format="gguf", progress=False)
    meta = metadata(path)
    tokens = meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(tokens) == base + 256
    assert tokens[base:base + 2] == ["<|begin_of_text|>", "<|end_of_text|>"] and tokens[base + 9] == "<|eot_id|>"
    assert meta["tokenizer.ggml.token_type"][base + 9] == 3 and meta["tokenizer.ggml.eot_token_id"] == base + 9
    vocabulary = set(tokens)
    merges = [m.split(" ") for m in meta["tokenizer.ggml.merges"]]
    assert len(merges) >= base - 256 and all(a in vocabulary and b in vocabulary and a + b in vocabulary
                                             for a, b in merges)
    assert "<|start_header_id|>" in meta["tokenizer.chat_template"]
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile


def test_finetune_exports_gguf_at_the_end(tmp_path):
    from offload_bitnet.train.trainer import main

    store = create_model(str(tmp_path / "a"), size="demo", arch="llama", mode="qat", dim=256, hidden_dim=256,
                         n_heads=4, n_kv_heads=2, n_layers=1)
    text = tmp_path / "text.txt"
    text.write_text(open(os.path.join(ROOT, "test_data", "demo.txt")).read()[:3000])
    assert main([store, "--data", str(text), "--runs-dir", str(tmp_path / "runs"), "--num-train-iters", "1",
                 "--no-plot", "--export-path", str(tmp_path / "gguf"), "--export-format", "gguf",
                 "--gguf-type", "tq1_0"]) == 0
    written = tensors(tmp_path / "gguf" / "model.gguf")
    assert written["blk.0.ffn_down.weight"].tensor_type == Q.TQ1_0
    assert (tmp_path / "gguf" / "Modelfile").is_file()


def test_tensor_names_for_models_and_adapters():
    assert gguf_tensor_name("llama", "block.12", "down_proj") == "blk.12.ffn_down.weight"
    assert gguf_tensor_name("llama", "embed") == "token_embd.weight"
    assert gguf_tensor_name("llama", "block.0", "q_proj", suffix="lora_b") == "blk.0.attn_q.weight.lora_b"
    assert gguf_tensor_name("bitnet", "block.1", "ffn_sub_norm") == "blk.1.ffn_sub_norm.weight"
    with pytest.raises(GGUFError, match="llama architecture has no tensor for block.0 attn_sub_norm"):
        gguf_tensor_name("llama", "block.0", "attn_sub_norm")
