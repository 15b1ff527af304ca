"""An Ollama ``Modelfile`` beside a GGUF export: ``FROM ./model.gguf``, the chat template, the stop tokens.

Ollama's ``TEMPLATE`` is a Go template, not the jinja template the GGUF carries, so the chat formats whose
tokens we recognise (ChatML, Llama 3, Llama 2 / Mistral ``[INST]``, Zephyr) get Ollama's own form of them; for
any other template the Modelfile leaves ``TEMPLATE`` out and Ollama derives one from the GGUF's
``tokenizer.chat_template``. Stop tokens are EOS and the end-of-turn tokens of the vocabulary.
"""
from __future__ import annotations

import os

from offload_bitnet.tokenizers.base import END_OF_TURN_TOKENS

MODELFILE = "Modelfile"

# Go templates over Ollama's .Messages (role, content), one per chat format, keyed by a token its jinja uses.
GO_TEMPLATES = {
    "<|im_start|>": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                     "<|im_start|>assistant\n"),
    "<|start_header_id|>": ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>"
                            "\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "[INST]": ("{{- range .Messages }}{{- if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
               "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>{{- end }}{{- end }}"),
    "<|user|>": ("{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n"),
}


def go_template(chat_template: str | None) -> str | None:
    """Ollama's TEMPLATE for a jinja chat template of a known format, else None."""
    if not chat_template:
        return None
    for marker, template in GO_TEMPLATES.items():
        if marker in chat_template:
            return template
    return None


def stop_tokens(vocabulary: dict) -> list[str]:
    """EOS, the end-of-turn token and the known end-of-turn tokens the vocabulary has as control tokens."""
    tokens, types = vocabulary["tokens"], vocabulary.get("token_type") or []
    stops = [tokens[vocabulary[key]] for key in ("eos_id", "eot_id", "eom_id")
             if vocabulary.get(key) is not None and vocabulary[key] < len(tokens)]
    control = {tokens[i] for i, kind in enumerate(types) if kind == 3}
    stops += [t for t in END_OF_TURN_TOKENS if t in control]
    return list(dict.fromkeys(stops))


def modelfile_text(gguf_name: str, vocabulary: dict) -> str:
    """The Modelfile for ``gguf_name`` (a file beside it) and its vocabulary dict (``gguf_vocab``)."""
    lines = [f"# Ollama: ollama create NAME -f {MODELFILE} && ollama run NAME", f"FROM ./{gguf_name}"]
    template = go_template(vocabulary.get("chat_template"))
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    elif vocabulary.get("chat_template"):
        lines.append("# TEMPLATE: none written; Ollama derives it from the GGUF's tokenizer.chat_template")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(vocabulary)]
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: str, gguf_name: str, vocabulary: dict) -> str:
    """Write ``out_dir/Modelfile``; returns its path."""
    path = os.path.join(out_dir, MODELFILE)
    with open(path, "w") as handle:
        handle.write(modelfile_text(gguf_name, vocabulary))
    return path
