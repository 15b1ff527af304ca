"""Meta llama checkpoints: import -> store -> export round trips, logits against independent references, and
clear refusals of bad input. Checkpoints are written in the test with tiny dims and Meta's shard convention."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from offload_bitnet.api import open_model
from offload_bitnet.store.write import create_model
from offload_bitnet.formats import detect_format, meta
from offload_bitnet.store.blockstore import BlockStore, StoreSettings

from repo_paths import SHARED

LLAMA2_TOKENIZER = os.path.join(SHARED, "data", "llama2-tokenizer.model")

# Meta's fairscale split of each weight across model-parallel ranks (None: replicated).
SPLITS = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
          "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1, "feed_forward.w3.weight": 0,
          "attention_norm.weight": None, "ffn_norm.weight": None}


def hidden_dim(dim, multiple_of, multiplier=None):
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def write_checkpoint(path, *, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=96, multiple_of=32, n_shards=2,
                     dtype=torch.bfloat16, embed_split=1, rope_freqs=True, vocab_in_params=True, seed=0,
                     tokenizer=None):
    """A random Meta checkpoint; returns (params, {key: full tensor in Meta layout})."""
    g = torch.Generator().manual_seed(seed)
    head_dim = dim // n_heads
    hidden = hidden_dim(dim, multiple_of)
    full = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g),
            "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
            "output.weight": torch.randn(vocab, dim, generator=g) * 0.1}
    shapes = {"attention.wq.weight": (n_heads * head_dim, dim), "attention.wk.weight": (n_kv_heads * head_dim, dim),
              "attention.wv.weight": (n_kv_heads * head_dim, dim), "attention.wo.weight": (dim, n_heads * head_dim),
              "feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
              "feed_forward.w3.weight": (hidden, dim), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
    for layer in range(n_layers):
        for suffix, shape in shapes.items():
            value = 1 + 0.1 * torch.randn(shape, generator=g) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.15
            full[f"layers.{layer}.{suffix}"] = value
    full = {k: v.to(dtype) for k, v in full.items()}
    freqs = (1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(dtype)
    os.makedirs(path, exist_ok=True)
    for shard in range(n_shards):
        state = {}
        for key, value in full.items():
            suffix = key.split(".", 2)[-1] if key.startswith("layers.") else key
            split = {"tok_embeddings.weight": embed_split, "output.weight": 0, "norm.weight": None}.get(suffix,
                                                                                                      SPLITS.get(suffix))
            state[key] = value.clone() if split is None else value.chunk(n_shards, dim=split)[shard].clone()
        if rope_freqs:
            state["rope.freqs"] = freqs.clone()
        torch.save(state, os.path.join(path, f"consolidated.{shard:02d}.pth"))
    params = {"dim": dim, "multiple_of": multiple_of, "n_heads": n_heads, "n_layers": n_layers, "norm_eps": 1e-05,
              "vocab_size": vocab if vocab_in_params else -1}
    if n_kv_heads != n_heads:
        params["n_kv_heads"] = n_kv_heads
    with open(os.path.join(path, "params.json"), "w") as handle:
        json.dump(params, handle)
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
    return params, full


def assert_same_checkpoint(a, b):
    """Same files, same keys in the same order, same shapes, dtypes and bits."""
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in sorted(os.listdir(a)):
        if name.endswith(".pth"):
            left = torch.load(os.path.join(a, name), weights_only=True)
            right = torch.load(os.path.join(b, name), weights_only=True)
            assert list(left) == list(right), name
            for key in left:
                assert left[key].dtype == right[key].dtype, key
                assert left[key].shape == right[key].shape, key
                bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
                dtype = bits[left[key].dtype]
                assert torch.equal(left[key].view(dtype), right[key].view(dtype)), f"{name} {key}"
        else:
            with open(os.path.join(a, name), "rb") as x, open(os.path.join(b, name), "rb") as y:
                assert x.read() == y.read(), name


@pytest.mark.parametrize("n_shards,dtype,embed_split", [(2, torch.bfloat16, 1), (1, torch.float16, 1),
                                                         (2, torch.bfloat16, 0), (2, torch.float32, 1)])
def test_round_trip_is_bit_exact(tmp_path, n_shards, dtype, embed_split):
    src, store_dir, out = tmp_path / "meta", tmp_path / "store", tmp_path / "export"
    write_checkpoint(src, n_shards=n_shards, dtype=dtype, embed_split=embed_split)
    assert meta.detect(str(src))
    meta.import_to_store(str(src), str(store_dir), progress=False)
    store = BlockStore(str(store_dir))
    source = store.extra["source"]
    assert source["format"] == "meta" and source["n_shards"] == n_shards
    assert source["embed_split_dim"] == (embed_split if n_shards > 1 else 1)
    assert store.settings.shadow_dtype == {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    assert store.settings.mode == "full"
    meta.export_from_store(store, str(out), progress=False)
    assert_same_checkpoint(str(src), str(out))
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no scratch left behind


def test_qat_import_exports_the_shadow_bit_exactly(tmp_path):
    """A llama checkpoint trained as ternary QAT: export writes the 16-bit shadow, not the ternary codes."""
    write_checkpoint(tmp_path / "meta", n_shards=2, dtype=torch.bfloat16)
    settings = StoreSettings(mode="qat", shadow_dtype="bf16", state_dtype="fp32")
    meta.import_to_store(str(tmp_path / "meta"), str(tmp_path / "store"), settings, progress=False)
    store = BlockStore(str(tmp_path / "store"))
    assert store.has_part("block.000", "shadow") and "q_proj.packed" in store.read("block.000", "weights")
    meta.export_from_store(store, str(tmp_path / "export"), progress=False)
    assert_same_checkpoint(str(tmp_path / "meta"), str(tmp_path / "export"))


def meta_reference_logits(full, params, ids):
    """Meta's own llama math (complex-number rotary on interleaved pairs), in fp32."""
    w = {k: v.float() for k, v in full.items()}
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads", n_heads)
    head_dim, eps = dim // n_heads, params["norm_eps"]
    seq = ids.shape[1]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs_cis = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotary(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    h = w["tok_embeddings.weight"][ids]
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    for layer in range(params["n_layers"]):
        p = lambda name: w[f"layers.{layer}.{name}.weight"]  # noqa: E731
        x = norm(h, p("attention_norm"))
        bsz = x.shape[0]
        q = rotary((x @ p("attention.wq").T).view(bsz, seq, n_heads, head_dim))
        k = rotary((x @ p("attention.wk").T).view(bsz, seq, n_kv, head_dim))
        v = (x @ p("attention.wv").T).view(bsz, seq, n_kv, head_dim)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.softmax(q @ k.transpose(2, 3) / head_dim ** 0.5 + mask, dim=-1)
        h = h + ((scores @ v).transpose(1, 2).reshape(bsz, seq, -1) @ p("attention.wo").T)
        x = norm(h, p("ffn_norm"))
        h = h + (F.silu(x @ p("feed_forward.w1").T) * (x @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    return norm(h, w["norm.weight"]) @ w["output.weight"].T


def hf_reference_logits(full, params, ids):
    """transformers' LlamaForCausalLM on weights converted as convert_llama_weights_to_hf.py does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads", n_heads)
    vocab, hidden = full["tok_embeddings.weight"].shape[0], full["layers.0.feed_forward.w1.weight"].shape[0]

    def permute(w, heads, dim1, dim2):  # transformers' convert_llama_weights_to_hf.permute
        return w.view(heads, dim1 // heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
                         num_hidden_layers=params["n_layers"], num_attention_heads=n_heads, num_key_value_heads=n_kv,
                         rms_norm_eps=params["norm_eps"], max_position_embeddings=64, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).float().eval()
    w = {k: v.float() for k, v in full.items()}
    state = {"model.embed_tokens.weight": w["tok_embeddings.weight"], "model.norm.weight": w["norm.weight"],
             "lm_head.weight": w["output.weight"]}
    kv_dim = n_kv * (dim // n_heads)
    for i in range(params["n_layers"]):
        m, l = f"model.layers.{i}.", f"layers.{i}."
        state.update({
            m + "self_attn.q_proj.weight": permute(w[l + "attention.wq.weight"], n_heads, dim, dim),
            m + "self_attn.k_proj.weight": permute(w[l + "attention.wk.weight"], n_kv, kv_dim, dim),
            m + "self_attn.v_proj.weight": w[l + "attention.wv.weight"],
            m + "self_attn.o_proj.weight": w[l + "attention.wo.weight"],
            m + "mlp.gate_proj.weight": w[l + "feed_forward.w1.weight"],
            m + "mlp.down_proj.weight": w[l + "feed_forward.w2.weight"],
            m + "mlp.up_proj.weight": w[l + "feed_forward.w3.weight"],
            m + "input_layernorm.weight": w[l + "attention_norm.weight"],
            m + "post_attention_layernorm.weight": w[l + "ffn_norm.weight"],
        })
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        return model(ids).logits.float()


def test_logits_match_meta_and_transformers_references(tmp_path):
    params, full = write_checkpoint(tmp_path / "meta", n_shards=2, dtype=torch.bfloat16, n_heads=4, n_kv_heads=2)
    meta.import_to_store(str(tmp_path / "meta"), str(tmp_path / "store"), progress=False)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    engine = open_model(str(tmp_path / "store"))
    ours = engine.logits(ids)
    engine.close()
    meta_ref = meta_reference_logits(full, params, ids)
    hf_ref = hf_reference_logits(full, params, ids)
    assert meta_ref.abs().max() > 1.0  # logits that would reveal a wrong permutation
    torch.testing.assert_close(ours, meta_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, hf_ref, atol=1e-4, rtol=0)


@pytest.mark.skipif(not os.path.isfile(LLAMA2_TOKENIZER), reason="../shared/data/llama2-tokenizer.model absent")
def test_llama2_tokenizer_and_vocab_from_embedding(tmp_path):
    src = tmp_path / "meta"
    write_checkpoint(src, dim=32, n_heads=2, n_kv_heads=2, n_layers=1, vocab=32000, vocab_in_params=False,
                     tokenizer=LLAMA2_TOKENIZER)
    meta.import_to_store(str(src), str(tmp_path / "store"), progress=False)
    store = BlockStore(str(tmp_path / "store"))
    assert store.config.vocab_size == 32000
    assert (store.config.bos_id, store.config.eos_id, store.config.pad_id) == (1, 2, None)
    assert store.extra["tokenizer"] == {"kind": "sentencepiece", "file": "tokenizer.model"}
    with open(os.path.join(store.path, "tokenizer", "tokenizer.model"), "rb") as a, open(LLAMA2_TOKENIZER, "rb") as b:
        assert a.read() == b.read()
    meta.export_from_store(store, str(tmp_path / "export"), progress=False)
    assert_same_checkpoint(str(src), str(tmp_path / "export"))


def test_tokenizer_kinds(tmp_path):
    import base64

    ranks = tmp_path / "tiktoken.model"  # Llama 3's format: base64 token, rank
    ranks.write_bytes(b"".join(base64.b64encode(i.to_bytes(2, "big")) + b" %d\n" % i for i in range(300)))
    info = meta.tokenizer_info(str(ranks))
    assert (info["kind"], info["vocab_size"], info["bos_id"], info["eos_id"]) == ("tiktoken", 556, 300, 301)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a tokenizer at all")
    with pytest.raises(meta.MetaFormatError, match="neither a SentencePiece model nor a tiktoken"):
        meta.tokenizer_info(str(junk))


def test_import_rereads_shards_in_bounded_windows(tmp_path, monkeypatch):
    """Mappings are re-opened once REMAP_BYTES have been read, and the import stays exact."""
    write_checkpoint(tmp_path / "meta", n_shards=2)
    opened = []
    real_load = meta.load_shard
    monkeypatch.setattr(meta.checkpoint, "load_shard", lambda path: opened.append(path) or real_load(path))
    monkeypatch.setattr(meta.ShardSet, "REMAP_BYTES", 1)  # re-open before every tensor
    meta.import_to_store(str(tmp_path / "meta"), str(tmp_path / "store"), progress=False)
    n_tensors = 3 + 2 * 9
    assert len(opened) == 2 + 2 * n_tensors  # inspection, then both shards per tensor
    meta.export_from_store(BlockStore(str(tmp_path / "store")), str(tmp_path / "export"), progress=False)
    assert_same_checkpoint(str(tmp_path / "meta"), str(tmp_path / "export"))


class _RunsCode:
    """Unpickling this would create a marker folder: the importer must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_code_is_refused_and_not_executed(tmp_path):
    src = tmp_path / "meta"
    write_checkpoint(src)
    marker = str(tmp_path / "code-ran")
    state = torch.load(src / "consolidated.01.pth", weights_only=True)
    state["payload"] = _RunsCode(marker)
    torch.save(state, src / "consolidated.01.pth")
    with pytest.raises(meta.MetaFormatError, match=r"consolidated\.01\.pth contains Python code .* not executed"):
        meta.import_to_store(str(src), str(tmp_path / "store"), progress=False)
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "store")


def test_missing_params_json(tmp_path):
    src = tmp_path / "meta"
    write_checkpoint(src)
    os.remove(src / "params.json")
    assert meta.detect(str(src))
    with pytest.raises(meta.MetaFormatError, match="no params.json"):
        meta.import_to_store(str(src), str(tmp_path / "store"), progress=False)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    src = tmp_path / "meta"
    write_checkpoint(src)
    state = torch.load(src / "consolidated.01.pth", weights_only=True)
    state["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"][:, :-4].clone()
    torch.save(state, src / "consolidated.01.pth")
    with pytest.raises(meta.MetaFormatError,
                       match=r"consolidated\.01\.pth: tensor layers\.1\.feed_forward\.w2\.weight has shape \(64, 92\)"):
        meta.import_to_store(str(src), str(tmp_path / "store"), progress=False)


def test_params_that_do_not_match_the_weights(tmp_path):
    src = tmp_path / "meta"
    write_checkpoint(src)
    params = json.loads((src / "params.json").read_text())
    params["ffn_dim_multiplier"] = 1.5  # MLP width 256 instead of the weights' 192
    (src / "params.json").write_text(json.dumps(params))
    with pytest.raises(meta.MetaFormatError, match=r"tensor layers\.0\.feed_forward\.w1\.weight has shape"):
        meta.import_to_store(str(src), str(tmp_path / "store"), progress=False)


def test_missing_tensor_is_named(tmp_path):
    src = tmp_path / "meta"
    write_checkpoint(src)
    state = torch.load(src / "consolidated.00.pth", weights_only=True)
    del state["layers.1.attention.wk.weight"]
    torch.save(state, src / "consolidated.00.pth")
    with pytest.raises(meta.MetaFormatError, match=r"consolidated\.00\.pth has no tensor 'layers\.1\.attention\.wk"):
        meta.import_to_store(str(src), str(tmp_path / "store"), progress=False)


def test_detect(tmp_path):
    assert not meta.detect(str(tmp_path))
    write_checkpoint(tmp_path / "meta")
    assert meta.detect(str(tmp_path / "meta"))
    assert detect_format(str(tmp_path / "meta")) == "meta"
    assert not meta.detect(str(tmp_path / "meta" / "consolidated.00.pth"))


def test_export_of_a_created_llama_store_reimports_to_the_same_model(tmp_path):
    create_model(str(tmp_path / "blank"), "demo", arch="llama", seed=3)
    original = BlockStore(str(tmp_path / "blank"))
    meta.export_from_store(original, str(tmp_path / "export"), n_shards=2, progress=False)
    params = json.loads((tmp_path / "export" / "params.json").read_text())
    assert params["dim"] == 128 and params["n_kv_heads"] == 2
    shard = torch.load(tmp_path / "export" / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wo.weight"].shape == (128, 64)  # row-parallel: input dim halved
    assert shard["layers.0.feed_forward.w1.weight"].shape == (176, 128)  # column-parallel: output dim halved
    assert shard["tok_embeddings.weight"].shape == (260, 64)
    meta.import_to_store(str(tmp_path / "export"), str(tmp_path / "again"), progress=False)
    again = BlockStore(str(tmp_path / "again"))
    assert again.config.hidden_dim == original.config.hidden_dim
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    left, right = open_model(original.path), open_model(again.path)
    assert torch.equal(left.logits(ids), right.logits(ids))
    left.close(), right.close()


def test_export_refuses_what_meta_cannot_hold(tmp_path):
    create_model(str(tmp_path / "bitnet"), "demo", arch="bitnet")
    with pytest.raises(meta.MetaFormatError, match="hf-bitnet"):
        meta.export_from_store(BlockStore(str(tmp_path / "bitnet")), str(tmp_path / "out"), progress=False)
    create_model(str(tmp_path / "llama"), "demo", arch="llama")
    with pytest.raises(meta.MetaFormatError, match="cannot cut this model into 3 shards"):
        meta.export_from_store(BlockStore(str(tmp_path / "llama")), str(tmp_path / "out3"), n_shards=3,
                               progress=False)
