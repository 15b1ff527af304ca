import json
import os

import torch

from offload_bitnet import BlockStore, EngineOptions, StreamingEngine, open_model
from offload_bitnet.cli import main
from offload_bitnet.model.lora import LoRAConfig


def test_create_info_verify_export_merge(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["create", store, "--size", "demo", "--arch", "llama"]) == 0
    capsys.readouterr()
    assert main(["info", store]) == 0
    summary = capsys.readouterr().out
    assert "step:       0" in summary and "mode:       full; master weights fp16, optimizer state fp32" in summary
    assert " KiB" in summary or " MiB" in summary  # sizes for people, not byte counts
    assert "tokenizer:  none of its own; the built-in byte tokenizer fits its 260-token vocabulary" in summary
    assert "chat template: no" in summary
    assert main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 0 and info["settings"]["mode"] == "full" and info["parameters"] > 0
    assert main(["verify", store]) == 0
    assert "all files match" in capsys.readouterr().out

    engine = StreamingEngine(BlockStore(store), EngineOptions(lora=LoRAConfig(rank=2), adapter_dir=str(tmp_path / "a")))
    engine.train_step([(torch.randint(0, 256, (1, 12)), None)])
    assert main(["merge", store, str(tmp_path / "a"), str(tmp_path / "merged")]) == 0
    ids = torch.randint(0, 256, (1, 10))
    assert torch.allclose(open_model(str(tmp_path / "merged")).logits(ids), engine.logits(ids), atol=2e-3)

    assert main(["export", store, str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert os.path.exists(tmp_path / "hf" / "config.json")


def test_errors_are_one_paragraph_without_traceback(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["create", store, "--size", "demo"]) == 0
    capsys.readouterr()
    assert main(["create", store, "--size", "demo"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already holds a store" in err and "Traceback" not in err
    units = os.path.join(store, "units")
    victim = os.path.join(units, sorted(os.listdir(units))[0])
    data = bytearray(open(victim, "rb").read())
    data[-1] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    assert main(["verify", store]) == 1
    assert "fails its checksum" in capsys.readouterr().out


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`... | head`: the reader goes away; no "error: Broken pipe", no "Exception ignored", no traceback."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    store = str(tmp_path / "store")
    assert main(["create", store, "--size", "demo", "--arch", "llama", "--seed", "1"]) == 0
    env = dict(os.environ, PYTHONPATH=root)
    commands = [[sys.executable, "-m", "offload_bitnet.cli", "info", store],
                [sys.executable, "-m", "offload_bitnet.cli", "export", "--help"],
                [sys.executable, os.path.join(root, "finetune.py"), "--help"],
                [sys.executable, os.path.join(root, "test_gen.py"), "--help"],
                [sys.executable, os.path.join(root, "test_gen.py"), store, "--prompt", "a", "--max-new-tokens", "4",
                 "--tokenizer", "byte"]]
    for command in commands:
        # The read end is closed before the child writes a byte, so its first write meets a broken pipe.
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=root)
        child.stdout.close()
        err = child.stderr.read().decode()
        assert child.wait() in (0, 141), (command, err)
        assert "Broken pipe" not in err and "Exception ignored" not in err and "Traceback" not in err, (command, err)


def test_every_subcommand_help_has_a_description_and_its_defaults(capsys):
    import argparse

    from offload_bitnet.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.description and len(sub.description) > 15, name
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and action.help != argparse.SUPPRESS:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    cache = subparsers.choices["cache"]
    nested = next(a for a in cache._actions if isinstance(a, argparse._SubParsersAction))
    assert set(nested.choices) == {"list", "clear"} and all(p.description for p in nested.choices.values())
