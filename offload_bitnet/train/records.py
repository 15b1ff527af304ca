"""Training data files to examples: reading and decoding records, their kinds, and each kind to token ids with labels.

Formats (``auto`` picks from the extension and the first record):

* plain text (``.txt``, ``.md``, ``.text``): the file is one document, tokenized and cut into
  ``max_seq_len`` chunks;
* ``.jsonl`` (one JSON object a line) or ``.json`` (an array of objects) holding records of one kind:
  ``{"text": ...}``, Alpaca ``{"instruction", "input"?, "output"}`` or chat
  ``{"messages": [{"role", "content"}, ...]}``.

Labels follow the Hugging Face convention (aligned with the inputs, -100 = no loss). Alpaca and chat records
train on the response only unless ``completion_only`` is off. ``data`` makes a dataset and its batches of these.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from offload_bitnet.model.loss import IGNORE_INDEX

TEXT_EXTENSIONS = (".txt", ".md", ".text")
JSON_EXTENSIONS = (".json", ".jsonl")
KINDS = ("text", "alpaca", "chat")
CHAT_ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
SKIP_HINT = "Fix the record, or pass --skip-bad-records to skip malformed records."


class DataError(ValueError):
    """Training data cannot be used; the message names the file (and line) and what is wrong."""


class BadRecord(ValueError):
    """One record is malformed (skippable with ``skip_bad_records``)."""


@dataclass
class Example:
    """One training sequence: token ids and aligned labels (-100: no loss)."""

    ids: list[int]
    labels: list[int]
    kind: str = "text"   # text: may be concatenated with neighbours when packing; sft: kept whole
    source: dict | None = field(default=None, repr=False, compare=False)  # the Alpaca/chat record (judge.py)

    def __len__(self):
        return len(self.ids)

    def has_target(self) -> bool:
        """Whether any position after the first is trained (position 0 is never a target)."""
        return any(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class DataOptions:
    """How files become examples."""

    max_seq_len: int = 512
    data_format: str = "auto"
    completion_only: bool = True
    skip_bad_records: bool = False
    packing: bool = False


@dataclass
class DataStats:
    """Counts for the data report."""

    files: list = field(default_factory=list)
    records: int = 0
    skipped: int = 0
    skipped_examples: list = field(default_factory=list)
    truncated: int = 0
    dropped_no_target: int = 0
    replaced_bytes: int = 0
    kinds: dict = field(default_factory=dict)

    def skip(self, where: str, reason: str):
        self.skipped += 1
        if len(self.skipped_examples) < 3:
            self.skipped_examples.append(f"{where}: {reason}")

    def notes(self, max_seq_len: int) -> list[str]:
        """Lines worth telling the user: skipped, truncated and dropped records."""
        notes = []
        if self.skipped:
            notes.append(f"skipped {self.skipped} malformed record(s), e.g. " + "; ".join(self.skipped_examples))
        if self.replaced_bytes:
            notes.append(f"replaced {self.replaced_bytes} undecodable byte sequence(s) with U+FFFD")
        if self.truncated:
            notes.append(f"truncated {self.truncated} example(s) longer than max_seq_len={max_seq_len} tokens")
        if self.dropped_no_target:
            notes.append(f"dropped {self.dropped_no_target} example(s) with no response tokens left to train on "
                         "(prompt longer than max_seq_len?)")
        return notes


# ---------------------------------------------------------------------- reading files
def decode_utf8(data: bytes, path: str, line_offset: int, skip_bad: bool, stats: DataStats) -> str:
    """Decode ``data`` strictly; on invalid bytes say where, or replace them when skipping is allowed."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if skip_bad:
            text = data.decode("utf-8", errors="replace")
            stats.replaced_bytes += text.count("\ufffd") - data.count("\ufffd".encode())
            return text
        line = line_offset + data[:error.start].count(b"\n")
        raise DataError(f"{path}, line {line}: byte 0x{data[error.start]:02x} at byte offset {error.start} is not "
                        "valid UTF-8. Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > NEW), "
                        "or pass --skip-bad-records to replace undecodable bytes.") from None


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"data path {path} is a folder; give a file (.txt, .json or .jsonl)") from None
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror or error}") from None
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 byte-order mark is not text


def iter_records(path: str, skip_bad: bool, stats: DataStats):
    """Yield ``(where, record)`` from a .jsonl or .json file; ``where`` is "file, line N" / "file, record N"."""
    data = read_bytes(path)
    if path.endswith(".json"):
        text = decode_utf8(data, path, 1, skip_bad, stats)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}). A .json data file holds "
                            "one array of records; use .jsonl for one record per line.") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, found a {type(records).__name__}")
        for index, record in enumerate(records, 1):
            yield f"{path}, record {index}", record
        return
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            reason = f"byte 0x{raw[error.start]:02x} at column {error.start + 1} is not valid UTF-8"
            if skip_bad:
                stats.skip(where, reason)
                continue
            raise DataError(f"{where}: {reason}. Convert the file to UTF-8, or pass --skip-bad-records to skip "
                            "such lines.") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            reason = f"not valid JSON ({error.msg} at column {error.colno})"
            if skip_bad:
                stats.skip(where, reason)
                continue
            raise DataError(f"{where}: {reason}. {SKIP_HINT}") from None
        yield where, record


def record_kind(record) -> str | None:
    """``text``, ``alpaca`` or ``chat`` from a record's keys; None when it is none of them."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def describe_record(record) -> str:
    if isinstance(record, dict):
        return f"an object with keys {sorted(record)[:8]}"
    return f"a JSON {type(record).__name__}"


# ---------------------------------------------------------------------- records to examples
def encode_text(tokenizer, text: str) -> list[int]:
    """A document as tokens: BOS, text, EOS."""
    return tokenizer.encode(text, bos=True, eos=True)


def alpaca_example(record: dict, tokenizer, completion_only: bool) -> Example:
    """An Alpaca record through the standard prompt template; the prompt is masked when ``completion_only``."""
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise BadRecord(f"Alpaca record needs a string {key!r}, got {describe_value(record.get(key))}")
    extra = record.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise BadRecord(f"Alpaca record 'input' must be a string, got {describe_value(extra)}")
    prompt = tokenizer.encode(alpaca_prompt(record), bos=True, eos=False)
    response = tokenizer.encode(record["output"], bos=False, eos=True)
    ids = prompt + response
    labels = ([IGNORE_INDEX] * len(prompt) + response) if completion_only else list(ids)
    return Example(ids, labels, kind="sft")


def alpaca_prompt(record: dict) -> str:
    """The prompt text of a (checked) Alpaca record: the standard template, with its input when it has one."""
    extra = record.get("input") or ""
    template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=extra)


def describe_value(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"chat record 'messages' must be a non-empty list, got {describe_value(messages)}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRecord(f"chat message {index} must be an object with a string 'content', "
                            f"got {describe_value(message)}")
        if message.get("role") not in CHAT_ROLES:
            raise BadRecord(f"chat message {index} has role {message.get('role')!r}; expected one of "
                            f"{', '.join(CHAT_ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("chat record has no assistant message to learn from")
    return messages


def builtin_chat_segments(messages: list[dict], tokenizer) -> list[tuple[list[int], bool]]:
    """The built-in chat template: ``<|role|>\\ncontent`` per message; assistant content ends with EOS.

    Returns ``(ids, is_response)`` segments; only assistant content (with its EOS) is a response.
    """
    segments = [([tokenizer.bos_id], False)] if tokenizer.bos_id is not None else []
    for message in messages:
        segments.append((tokenizer.encode(f"<|{message['role']}|>\n", bos=False, eos=False), False))
        if message["role"] == "assistant":
            segments.append((tokenizer.encode(message["content"], bos=False, eos=True), True))
            segments.append((tokenizer.encode("\n", bos=False, eos=False), False))
        else:
            segments.append((tokenizer.encode(message["content"] + "\n", bos=False, eos=False), False))
    return segments


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's own chat template."""
    if hasattr(tokenizer, "encode_chat"):  # adds BOS only when the template did not write it
        return list(tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt))
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    if isinstance(rendered, str):
        return tokenizer.encode(rendered, bos=False, eos=False)
    return [int(i) for i in rendered]


def template_chat_segments(messages: list[dict], tokenizer) -> list[tuple[list[int], bool]]:
    """Segments through the tokenizer's chat template: each assistant turn is the difference between the
    rendering up to it (with the generation prompt) and the rendering including it."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[:index + 1], add_generation_prompt=False)
        if full[:len(upto)] != upto or upto[:len(prefix)] != prefix:
            raise DataError("the tokenizer's chat template does not render conversations consistently from turn "
                            "to turn, so responses cannot be located; pass --train-on-prompt to train on whole "
                            "conversations")
        spans.append((len(prefix), len(upto)))
    segments, cursor = [], 0
    for start, stop in spans:
        segments += [(full[cursor:start], False), (full[start:stop], True)]
        cursor = stop
    return segments + [(full[cursor:], False)]


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """``text`` as a user turn followed by the assistant's header: a prompt for a model trained on chats."""
    return messages_prompt_ids(tokenizer, [{"role": "user", "content": text}])


def messages_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """``messages`` followed by the assistant's header, through the chat template (or the built-in one)."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    ids = [i for segment, _ in builtin_chat_segments(messages, tokenizer) for i in segment]
    return ids + tokenizer.encode("<|assistant|>\n", bos=False, eos=False)


def chat_example(record: dict, tokenizer, completion_only: bool) -> Example:
    """A chat record, rendered with the tokenizer's chat template, or the built-in one when it has none."""
    messages = check_messages(record.get("messages"))
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        segments = template_chat_segments(messages, tokenizer)
    else:
        segments = builtin_chat_segments(messages, tokenizer)
    ids, labels = [], []
    for segment, is_response in segments:
        ids += segment
        labels += segment if (is_response or not completion_only) else [IGNORE_INDEX] * len(segment)
    return Example(ids, labels, kind="sft")


def text_record_example(record: dict, tokenizer) -> Example:
    if not isinstance(record.get("text"), str):
        raise BadRecord(f"text record needs a string 'text', got {describe_value(record.get('text'))}")
    if not record["text"].strip():
        raise BadRecord("text record is empty")
    ids = encode_text(tokenizer, record["text"])
    return Example(ids, list(ids), kind="text")


def chunk(ids: list[int], max_seq_len: int) -> list[Example]:
    """Cut a token stream into ``max_seq_len`` chunks; a last chunk under 2 tokens has nothing to learn."""
    pieces = [ids[start:start + max_seq_len] for start in range(0, len(ids), max_seq_len)]
    return [Example(p, list(p), kind="chunk") for p in pieces if len(p) >= 2]


def load_file(path: str, tokenizer, options: DataOptions, stats: DataStats) -> list[Example]:
    """Every example of one data file (before splitting and packing)."""
    lower = path.lower()
    plain = lower.endswith(TEXT_EXTENSIONS) or (options.data_format == "text" and not lower.endswith(JSON_EXTENSIONS))
    if plain:
        if options.data_format in ("alpaca", "chat"):
            raise DataError(f"{path} is a plain text file, but --data-format {options.data_format} needs .jsonl "
                            "or .json records")
        text = decode_utf8(read_bytes(path), path, 1, options.skip_bad_records, stats)
        if not text.strip():
            raise DataError(f"data file {path} is empty")
        stats.records += 1
        stats.kinds["plain text file"] = stats.kinds.get("plain text file", 0) + 1
        return chunk(encode_text(tokenizer, text), options.max_seq_len)
    if not lower.endswith(JSON_EXTENSIONS):
        raise DataError(f"{path}: unknown data file type; use .txt (plain text), .jsonl (one JSON record a line) "
                        "or .json (an array of records), or pass --data-format text for plain text")
    examples = []
    kind = None if options.data_format == "auto" else options.data_format
    seen = 0
    for where, record in iter_records(path, options.skip_bad_records, stats):
        seen += 1
        try:
            found = record_kind(record)
            if found is None:
                raise BadRecord(f"expected a record with 'text', Alpaca 'instruction'/'output', or chat 'messages', "
                                f"got {describe_record(record)}")
            if kind is None:
                kind = found  # the first good record decides the file's kind
            elif found != kind:
                raise BadRecord(f"this {found} record does not match the file's {kind} records")
            if kind == "text":
                example = text_record_example(record, tokenizer)
            elif kind == "alpaca":
                example = alpaca_example(record, tokenizer, options.completion_only)
            else:
                example = chat_example(record, tokenizer, options.completion_only)
            if kind != "text":
                example.source = record
        except BadRecord as error:
            if options.skip_bad_records:
                stats.skip(where, str(error))
                continue
            raise DataError(f"{where}: {error}. {SKIP_HINT}") from None
        stats.records += 1
        stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
        examples.append(example)
    if not examples:
        if seen or stats.skipped:
            raise DataError(f"data file {path} has no usable records: all were malformed and skipped "
                            f"({'; '.join(stats.skipped_examples)})")
        raise DataError(f"data file {path} is empty: it holds no records")
    return examples


def fit_length(examples: list[Example], max_seq_len: int, stats: DataStats, keep_long_text: bool) -> list[Example]:
    """Truncate over-long examples (counted); drop those left with nothing to learn (counted).

    ``keep_long_text`` leaves long text records whole for packing, which cuts them into chunks instead.
    """
    kept = []
    for example in examples:
        if len(example) > max_seq_len and not (keep_long_text and example.kind == "text"):
            example = Example(example.ids[:max_seq_len], example.labels[:max_seq_len], example.kind, example.source)
            stats.truncated += 1
        if not example.has_target():
            stats.dropped_no_target += 1
            continue
        kept.append(example)
    return kept


def pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Fill sequences up to ``max_seq_len``: text records are concatenated and re-chunked; Alpaca/chat examples
    are placed whole, in order, into the current sequence while they fit. (Packed examples attend to their
    neighbours in the same sequence; the loss only sees each example's own labels.)"""
    packed, stream_ids, stream_labels = [], [], []
    current = Example([], [], kind="packed")
    for example in examples:
        if example.kind == "text":
            stream_ids += example.ids
            stream_labels += example.labels
            continue
        if example.kind == "chunk":
            packed.append(example)
            continue
        if current.ids and len(current) + len(example) > max_seq_len:
            packed.append(current)
            current = Example([], [], kind="packed")
        current.ids += example.ids
        current.labels += example.labels
    if current.ids:
        packed.append(current)
    for start in range(0, len(stream_ids), max_seq_len):
        piece = Example(stream_ids[start:start + max_seq_len], stream_labels[start:start + max_seq_len], "chunk")
        if len(piece) >= 2 and piece.has_target():
            packed.append(piece)
    return packed
