"""The tokenizer interface every tokenizer has (``BaseTokenizer``), the built-in byte-level tokenizer, chat
template rendering, and the names shared by the tokenizer kinds (``TOKENIZER_DIR``, end-of-turn tokens)."""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime

TOKENIZER_DIR = "tokenizer"


def copy_store_tokenizer(source_path: str, extra: dict, target_path: str):
    """Copy the tokenizer files of the store at ``source_path`` (whose manifest extra is ``extra``) into the
    folder of another store made from it (a merged store, a rank's store, a gathered one); nothing to copy for
    a store without them (the byte tokenizer)."""
    folder = (extra.get("tokenizer") or {}).get("dir") or TOKENIZER_DIR
    if os.path.isdir(os.path.join(source_path, folder)):
        shutil.copytree(os.path.join(source_path, folder), os.path.join(target_path, folder), dirs_exist_ok=True)

# Tokens that end a turn in common chat formats; generation stops at these besides EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                      "<|eom_id|>", "</s>", "<EOT>")


class TokenizerError(ValueError):
    """A store's tokenizer cannot be loaded or used; the message says which file and what to do."""


class BaseTokenizer:
    """What every tokenizer shares: special ids, stop tokens, chat templates."""

    kind = "base"
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    vocab_size = 0
    add_bos = True
    chat_template: str | None = None
    special_tokens: dict[str, int] = {}
    extra_stop_ids: frozenset[int] = frozenset()  # e.g. generation_config.json's eos_token_id list

    def token_text(self, token_id: int | None) -> str | None:
        """The text of a special token id (as a chat template writes it), or None."""
        if token_id is None:
            return None
        for text, index in self.special_tokens.items():
            if index == token_id:
                return text
        return None

    @property
    def stop_ids(self) -> set[int]:
        """EOS plus the end-of-turn tokens (``<|im_end|>``, ``<|eot_id|>``...) the vocabulary has."""
        stops = {self.eos_id} if self.eos_id is not None else set()
        stops |= {self.special_tokens[t] for t in END_OF_TURN_TOKENS if t in self.special_tokens}
        return stops | set(self.extra_stop_ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the model's own chat template (jinja2)."""
        if not self.chat_template:
            raise TokenizerError("this model carries no chat template, so it cannot format a chat; give a plain "
                                 "prompt instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.token_text(self.bos_id) or "",
                                    eos_token=self.token_text(self.eos_id) or "",
                                    pad_token=self.token_text(self.pad_id), **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered chat, with BOS added only when the template did not write it already."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        bos_text = self.token_text(self.bos_id)
        add = self.add_bos and not (bos_text and text.startswith(bos_text))
        return self.encode(text, bos=add)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        suffix = [self.eos_id] if eos and self.eos_id is not None else []
        return prefix + list(ids) + suffix


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes as tokens 0..255, then BOS 256, EOS 257, PAD 258 (vocab padded to 260).

    Used by the demo and by blank models, which have no trained tokenizer.
    """

    kind = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 260
    chat_template = None
    special_tokens = {"<s>": 256, "</s>": 257, "<pad>": 258}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str):
        os.makedirs(directory, exist_ok=True)

    def describe(self) -> dict:
        return {"kind": self.kind}


# ---------------------------------------------------------------------------------------------- chat templates
def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render a Hugging Face style chat template the way transformers does (sandboxed jinja2, trim_blocks,
    lstrip_blocks, ``tojson``, ``raise_exception``, ``strftime_now``)."""
    import jinja2  # loaded on first use: only chat templates need it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"the model's chat template rejected the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as error:
        raise TokenizerError(f"the model's chat template failed to render: {error}") from None
