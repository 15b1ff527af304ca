"""The ``tiktoken`` tokenizer kind: Meta's Llama 3 rank file, rebuilt as a ``tokenizers`` BPE with Meta's special
tokens and the Llama 3 chat format."""
from __future__ import annotations

import base64
import os

from offload_bitnet.tokenizers.base import BaseTokenizer, TokenizerError
from offload_bitnet.tokenizers.gguf_rebuild import LLAMA3_SPLIT, bytes_to_unicode
from offload_bitnet.tokenizers.hf import HFTokenizer

# Meta's Llama 3.1 tokenizer: 256 special tokens follow the BPE ranks, in this order, then reserved ones.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                        "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def build_tiktoken_bpe(ranks: dict[bytes, int], special: list[str], split: str = LLAMA3_SPLIT):
    """A ``tokenizers`` BPE equal to tiktoken's rank-ordered merging: every split (left, right) of a token
    whose halves are tokens becomes a merge, ranked by the merged token's rank (transformers'
    TikTokenConverter does the same)."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,  # only this tokenizer kind needs it
                            pre_tokenizers)

    spelling = bytes_to_unicode()
    spell = lambda b: "".join(spelling[c] for c in b)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend((rank, ranks[a], ranks[b], a, b) for a, b in pairs)
    merges.sort()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(spell(a), spell(b)) for *_, a, b in merges],
                                   fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    base = len(ranks)
    for index, text in enumerate(special):  # appended in order, so they get ids base, base+1, ...
        backend.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if backend.token_to_id(text) != base + index:
            raise TokenizerError(f"special token {text} did not get id {base + index}")
    return backend


def load_tiktoken(directory: str, description: dict, defaults: dict) -> BaseTokenizer:
    """A Llama 3 ``tokenizer.model`` (tiktoken ranks: base64 token and rank per line) with Meta's special tokens
    and the Llama 3 chat format (Meta's folders carry no chat template)."""
    path = os.path.join(directory, description.get("file", "tokenizer.model"))
    ranks, number = {}, 0
    try:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{path} is not a readable tiktoken rank file (line {number}: {error})") from None
    count = int(description.get("special_count", 256))
    special = LLAMA3_SPECIAL + [f"<|reserved_special_token_{2 + i}|>" for i in range(count - len(LLAMA3_SPECIAL))]
    backend = build_tiktoken_bpe(ranks, special[:count])
    base = len(ranks)
    fallback = lambda key, value: value if defaults.get(key) is None else defaults[key]  # noqa: E731
    return HFTokenizer(backend, bos_id=description.get("bos_id", fallback("bos_id", base)),
                       eos_id=description.get("eos_id", fallback("eos_id", base + 1)),
                       pad_id=description.get("pad_id", defaults.get("pad_id")), add_bos=True,
                       chat_template=description.get("chat_template", LLAMA3_CHAT_TEMPLATE), kind="tiktoken",
                       description=description)
