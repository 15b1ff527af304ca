"""The Hugging Face side files that the ``hf`` and ``sentencepiece`` tokenizer kinds share: ``tokenizer_config.json``
and ``special_tokens_map.json`` (special tokens), the chat template (``chat_template.jinja``, ``chat_template.json``
or the config) and ``generation_config.json`` (extra stop tokens)."""
from __future__ import annotations

import json
import os

from offload_bitnet.tokenizers.base import TokenizerError


def token_content(value) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from None


def chat_template_file(directory: str, config: dict) -> str | None:
    """The chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path) as handle:
            return handle.read()
    json_path = os.path.join(directory, "chat_template.json")
    template = read_json(json_path).get("chat_template") if os.path.isfile(json_path) else config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {item.get("name"): item.get("template") for item in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def special_id(lookup, config: dict, key: str, fallback):
    text = token_content(config.get(key))
    token_id = lookup(text) if text else None
    return token_id if token_id is not None else fallback


def generation_stop_ids(directory: str) -> frozenset[int]:
    """``eos_token_id`` of generation_config.json (an id or a list: Llama 3 Instruct stops at several)."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return frozenset()
    value = read_json(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return frozenset(int(v) for v in values if isinstance(v, int))
