"""The formats registry: the top-level API, and one list of export formats behind the CLI, finetune and README."""
import dataclasses
import os
import re

import pytest

import offload_bitnet
from offload_bitnet import formats
from offload_bitnet.cli import build_parser
from offload_bitnet.train.runconfig import RunConfig

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_import_and_export_model_at_the_top_of_the_package(tmp_path):
    from offload_bitnet import export_model, import_model

    assert "import_model" in offload_bitnet.__all__ and "export_model" in offload_bitnet.__all__
    store = offload_bitnet.create_model(str(tmp_path / "store"), "demo", "llama", n_layers=1)
    hf = export_model(store, str(tmp_path / "hf"), format="hf", progress=False)
    again = import_model(hf, str(tmp_path / "again"), progress=False)
    assert offload_bitnet.BlockStore(again).config == offload_bitnet.BlockStore(store).config


def choices_of(parser, flag):
    """The choices of ``flag`` in ``parser`` or any of its sub-commands' parsers."""
    found = {}
    stack = [parser]
    while stack:
        current = stack.pop()
        for action in current._actions:
            if flag in action.option_strings and action.choices is not None:
                found[current.prog] = tuple(action.choices)
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
    return found


def test_every_export_format_is_offered_by_both_parsers_and_the_readme():
    assert formats.EXPORT_FORMATS == ("source",) + tuple(formats.EXPORTERS)
    assert "gguf" in formats.EXPORT_FORMATS
    cli = choices_of(build_parser(), "--format")
    assert cli[next(prog for prog in cli if prog.endswith(" export"))] == formats.EXPORT_FORMATS
    finetune = {f.name: f for f in dataclasses.fields(RunConfig)}["export_format"]
    assert tuple(finetune.metadata["choices"]) == formats.EXPORT_FORMATS
    with open(README) as handle:
        text = handle.read()
    listed = re.search(r"\| `offload-bitnet export STORE OUT \[--format ([^\]]+)\]", text).group(1)
    assert tuple(listed.split("\\|")) == formats.EXPORT_FORMATS
    row = next(line for line in text.splitlines() if line.startswith("| `--export-format`"))
    assert re.findall(r"`([a-z-]+)`", row.split("|")[3]) == list(formats.EXPORT_FORMATS)


def test_an_unknown_export_format_names_the_choices(tmp_path):
    store = offload_bitnet.create_model(str(tmp_path / "store"), "demo", "llama", n_layers=1)
    with pytest.raises(ValueError, match="choose one of source, hf, hf-bitnet, meta, gguf"):
        formats.export_model(store, str(tmp_path / "out"), format="onnx")
    with pytest.raises(ValueError, match="--gguf-type applies to GGUF exports"):
        formats.export_model(store, str(tmp_path / "out"), format="hf", gguf_type="f16")
