import json
import os

import pytest
import torch

from offload_bitnet.train import data as d
from offload_bitnet.train import records
from offload_bitnet.model.loss import IGNORE_INDEX
from offload_bitnet.tokenizers.base import ByteTokenizer
from repo_paths import REPO

ROOT = REPO
TEST_DATA = os.path.join(ROOT, "test_data")
TOK = ByteTokenizer()


def path(name):
    return os.path.join(TEST_DATA, name)


def load(names, max_seq_len=512, val_fraction=0.0, seed=0, **options):
    names = [names] if isinstance(names, str) else names
    return d.load_dataset([path(n) for n in names], [], TOK, records.DataOptions(max_seq_len=max_seq_len, **options),
                          val_fraction, seed)


def trained_text(example):
    """The bytes of the positions that carry a loss (label != -100), position 0 excluded as the engine does."""
    return bytes(label for label in example.labels[1:] if 0 <= label < 256).decode()


# ---------------------------------------------------------------------------------------------- formats
def test_plain_text_is_chunked_to_max_length():
    dataset = load("demo.txt", max_seq_len=128)
    text = open(path("demo.txt"), encoding="utf-8").read()
    expected = len(text.encode()) + 2  # BOS + bytes + EOS
    assert [len(e) for e in dataset.train[:-1]] == [128] * (len(dataset.train) - 1)
    assert sum(len(e) for e in dataset.train) == expected
    assert dataset.train[0].ids[0] == TOK.bos_id and dataset.train[-1].ids[-1] == TOK.eos_id
    assert all(e.ids == e.labels for e in dataset.train)
    assert dataset.stats.truncated == 0


def test_text_records_train_on_everything():
    dataset = load("text.jsonl")
    assert len(dataset.train) == 8 and dataset.stats.kinds == {"text": 8}
    first = json.loads(open(path("text.jsonl")).readline())["text"]
    assert dataset.train[0].ids == TOK.encode(first, bos=True, eos=True) == dataset.train[0].labels


def test_alpaca_masks_the_prompt_by_default():
    dataset = load("alpaca.jsonl")
    example = dataset.train[1]  # {"instruction": "Add the two numbers.", "input": "7 and 5", "output": "7 + 5 = 12"}
    prompt = records.ALPACA_PROMPT.format(instruction="Add the two numbers.", input="7 and 5")
    assert TOK.decode(example.ids) == prompt + "7 + 5 = 12"
    assert example.ids[-1] == TOK.eos_id and example.labels[-1] == TOK.eos_id
    assert trained_text(example) == "7 + 5 = 12"
    assert example.labels[:len(prompt) + 1] == [IGNORE_INDEX] * (len(prompt) + 1)  # BOS + prompt bytes


def test_alpaca_without_input_uses_the_short_template():
    example = load("alpaca.jsonl").train[0]
    assert TOK.decode(example.ids).startswith(records.ALPACA_PROMPT_NO_INPUT.split("{")[0])
    assert "### Input:" not in TOK.decode(example.ids)


def test_train_on_prompt_turns_masking_off():
    example = load("alpaca.jsonl", completion_only=False).train[1]
    assert example.labels == example.ids


def test_alpaca_json_array_and_missing_input():
    dataset = load("alpaca.json")
    assert len(dataset.train) == 3
    assert trained_text(dataset.train[2]) == "Venus"


def test_chat_trains_on_assistant_turns_only():
    dataset = load("chat.jsonl")
    example = dataset.train[2]  # two user turns, two assistant turns
    rendered = TOK.decode(example.ids)
    assert rendered == ("<|user|>\nSay hello.\n<|assistant|>\nHello!\n"
                        "<|user|>\nNow say goodbye.\n<|assistant|>\nGoodbye!\n")
    assert trained_text(example) == "Hello!Goodbye!"
    assert example.labels.count(TOK.eos_id) == 2  # each assistant turn learns to end
    full = load("chat.jsonl", completion_only=False).train[2]
    assert full.labels == full.ids


class ChatMLTokenizer(ByteTokenizer):
    """The byte tokenizer with a ChatML chat template, as an imported model would carry."""

    chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_uses_the_tokenizers_template_when_it_has_one():
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    example = records.chat_example(record, ChatMLTokenizer(), completion_only=True)
    assert TOK.decode(example.ids) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
                                       "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n")
    assert trained_text(example) == "Yo<|im_end|>\nCiao<|im_end|>\n"


def test_chat_template_that_is_not_prefix_consistent_is_refused():
    class Shuffled(ByteTokenizer):
        chat_template = "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}"

    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(records.DataError, match="--train-on-prompt"):
        records.chat_example(record, Shuffled(), completion_only=True)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name, fragment", [
    ("bad_json.jsonl", "bad_json.jsonl, line 3: not valid JSON"),
    ("bad_alpaca.jsonl", "bad_alpaca.jsonl, line 2: Alpaca record needs a string 'output', got nothing"),
    ("bad_chat.jsonl", "bad_chat.jsonl, line 2: chat message 1 has role 'robot'"),
    ("mixed.jsonl", "mixed.jsonl, line 2: this alpaca record does not match the file's text records"),
    ("bad_utf8.jsonl", "bad_utf8.jsonl, line 2: byte 0xe9 at column 14 is not valid UTF-8"),
    ("bad_utf8.txt", "bad_utf8.txt, line 1: byte 0xff at byte offset 33 is not valid UTF-8"),
    ("empty.jsonl", "empty.jsonl is empty"),
])
def test_malformed_files_name_file_line_and_problem(name, fragment):
    with pytest.raises(records.DataError) as info:
        load(name)
    assert fragment in str(info.value)
    if name != "empty.jsonl":
        assert "--skip-bad-records" in str(info.value)


def test_skip_bad_records_counts_and_reports():
    dataset = load("bad_json.jsonl", skip_bad_records=True)
    assert len(dataset.train) == 3 and dataset.stats.skipped == 1
    notes = dataset.stats.notes(512)
    assert any("skipped 1 malformed record(s)" in n and "line 3" in n for n in notes)
    chat = load("bad_chat.jsonl", skip_bad_records=True)
    assert len(chat.train) == 1 and chat.stats.skipped == 2


def test_skip_bad_records_replaces_undecodable_bytes_in_text():
    dataset = load("bad_utf8.txt", skip_bad_records=True)
    assert dataset.stats.replaced_bytes == 2  # 0xff and 0xfe
    assert "\ufffd" in TOK.decode(dataset.train[0].ids)


def test_a_file_of_only_bad_records_is_an_error(tmp_path):
    bad = tmp_path / "all_bad.jsonl"
    bad.write_text('{"nope": 1}\n[1, 2]\n')
    with pytest.raises(records.DataError, match="no usable records"):
        d.load_dataset([str(bad)], [], TOK, records.DataOptions(skip_bad_records=True), 0.0, 0)


def test_unknown_extension_and_missing_file(tmp_path):
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(records.DataError, match="unknown data file type"):
        d.load_dataset([str(other)], [], TOK, records.DataOptions(), 0.0, 0)
    assert d.load_dataset([str(other)], [], TOK, records.DataOptions(data_format="text"), 0.0, 0).train
    with pytest.raises(records.DataError, match="does not exist"):
        d.load_dataset([str(tmp_path / "missing.jsonl")], [], TOK, records.DataOptions(), 0.0, 0)
    with pytest.raises(records.DataError, match="is a plain text file"):
        load("demo.txt", data_format="alpaca")


def test_over_long_examples_are_truncated_and_counted():
    dataset = load("text.jsonl", max_seq_len=40)
    assert all(len(e) <= 40 for e in dataset.train)
    assert dataset.stats.truncated == sum(1 for line in open(path("text.jsonl"))
                                          if len(json.loads(line)["text"].encode()) + 2 > 40)
    assert any("truncated" in n for n in dataset.stats.notes(40))


def test_examples_whose_response_is_cut_off_are_dropped():
    with pytest.raises(records.DataError, match="dropped 6 example"):
        load("alpaca.jsonl", max_seq_len=64)  # the Alpaca prompt alone is longer than 64 bytes


def test_json_file_must_hold_an_array(tmp_path):
    single = tmp_path / "one.json"
    single.write_text('{"text": "just one object"}')
    with pytest.raises(records.DataError, match="expected a JSON array of records"):
        d.load_dataset([str(single)], [], TOK, records.DataOptions(), 0.0, 0)


def test_byte_order_mark_is_ignored(tmp_path):
    marked = tmp_path / "bom.jsonl"
    marked.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n')
    assert TOK.decode(d.load_dataset([str(marked)], [], TOK, records.DataOptions(), 0.0, 0).train[0].ids) == "hello"


# ---------------------------------------------------------------------------------------------- split, packing
def test_validation_split_is_deterministic_and_disjoint():
    a = load("demo.txt", max_seq_len=64, val_fraction=0.2, seed=3)
    b = load("demo.txt", max_seq_len=64, val_fraction=0.2, seed=3)
    c = load("demo.txt", max_seq_len=64, val_fraction=0.2, seed=4)
    assert [e.ids for e in a.val] == [e.ids for e in b.val]
    assert [e.ids for e in a.val] != [e.ids for e in c.val]
    total = len(load("demo.txt", max_seq_len=64).train)
    assert len(a.val) == round(total * 0.2) and len(a.train) + len(a.val) == total
    assert not {tuple(e.ids) for e in a.val} & {tuple(e.ids) for e in a.train}


def test_separate_validation_file():
    dataset = d.load_dataset([path("text.jsonl")], [path("alpaca.json")], TOK, records.DataOptions(), 0.5, 0)
    assert len(dataset.train) == 8 and len(dataset.val) == 3


def test_packing_fills_sequences_and_keeps_masks():
    plain = load("chat.jsonl", max_seq_len=256)
    packed = load("chat.jsonl", max_seq_len=256, packing=True)
    assert len(packed.train) < len(plain.train)
    assert all(len(e) <= 256 for e in packed.train)
    assert [i for e in packed.train for i in e.ids] == [i for e in plain.train for i in e.ids]
    assert [i for e in packed.train for i in e.labels] == [i for e in plain.train for i in e.labels]


def test_packing_text_records_rechunks_instead_of_truncating():
    packed = load("text.jsonl", max_seq_len=40, packing=True)
    assert packed.stats.truncated == 0
    assert [len(e) for e in packed.train[:-1]] == [40] * (len(packed.train) - 1)
    total = sum(len(TOK.encode(json.loads(line)["text"], bos=True, eos=True)) for line in open(path("text.jsonl")))
    assert sum(len(e) for e in packed.train) == total


# ---------------------------------------------------------------------------------------------- batches
def test_batch_order_is_a_seeded_shuffle_per_epoch():
    order = d.BatchOrder(count=10, batch_size=4, seed=1)
    stream = [i for step in range(5) for i in order.indices(step)]  # 20 examples = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    again = d.BatchOrder(count=10, batch_size=4, seed=1)
    assert [again.indices(s) for s in (4, 2, 0)] == [order.indices(s) for s in (4, 2, 0)]  # any order, same batches
    assert d.BatchOrder(10, 4, seed=2).indices(0) != order.indices(0)
    assert order.epoch_at(5) == 2.0


def test_collate_pads_with_ignored_labels():
    examples = [records.Example([1, 2, 3], [1, 2, 3]), records.Example([4, 5], [-100, 5])]
    ids, labels = d.collate(examples, pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 9]]
    assert labels.tolist() == [[1, 2, 3], [-100, 5, -100]]


def test_micro_batches_split_evenly_at_one_length():
    examples = [records.Example(list(range(n)), list(range(n))) for n in (3, 7, 2, 5)]
    micro = d.micro_batches(examples, grad_accum=2, pad_id=0)
    assert len(micro) == 2
    assert [tuple(ids.shape) for ids, _ in micro] == [(2, 7), (2, 7)]


def test_eval_batches_cover_everything_or_stop_at_the_limit():
    examples = [records.Example([1, 2], [1, 2]) for _ in range(5)]
    assert [ids.shape[0] for ids, _ in d.eval_batches(examples, 2, 0)] == [2, 2, 1]
    assert len(list(d.eval_batches(examples, 2, 0, max_batches=2))) == 2


def test_pad_value_falls_back_to_eos():
    class NoPad:
        pad_id, eos_id = None, 7

    assert d.pad_value(TOK) == TOK.pad_id and d.pad_value(NoPad()) == 7
    assert torch.equal(d.collate([records.Example([1], [1])], 0)[0], torch.tensor([[1]]))


def test_chat_prompts_end_with_the_assistant_header():
    assert TOK.decode(records.chat_prompt_ids(TOK, "Hi")) == "<|user|>\nHi\n<|assistant|>\n"
    assert records.chat_prompt_ids(TOK, "Hi")[0] == TOK.bos_id
    assert TOK.decode(records.chat_prompt_ids(ChatMLTokenizer(), "Hi")) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
