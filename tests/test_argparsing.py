"""The shared command-line parser: negative numbers are values, underscore spellings of options work, and a
mistake gets one line naming the closest valid option; the device as an argument or as --device."""
from __future__ import annotations

import os
import sys

import pytest

from offload_bitnet.argparsing import ArgumentParser, choose_device, parse_size, split_model_and_device
from offload_bitnet.cli import build_parser as cli_parser
from offload_bitnet.train.runconfig import RunConfig, RunConfigError
from offload_bitnet.train.runconfig_loading import load_toml, parse_args
from offload_bitnet.train.trainer import main as finetune_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--plot", action="store_true")
    return parser


def one_line_error(capsys, parse) -> str:
    """Run ``parse``, expect argparse's exit 2 with exactly one line on stderr; return it."""
    with pytest.raises(SystemExit) as exit_:
        parse()
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    return lines[0]


@pytest.mark.parametrize("text, value", [("-1e-3", -1e-3), ("-2", -2.0), ("-.5", -0.5), ("-1E+3", -1000.0),
                                         ("-0.25e-2", -0.0025), ("-inf", float("-inf"))])
def test_negative_numbers_are_values(text, value):
    assert small_parser().parse_args(["--learning-rate", text]).learning_rate == value


def test_underscore_spellings_of_options():
    args = small_parser().parse_args(["--max_seq_len", "64", "--learning_rate=1e-4", "--plot"])
    assert args.max_seq_len == 64 and args.learning_rate == 1e-4 and args.plot


def test_an_unknown_option_gets_one_line_with_the_closest_option(capsys):
    line = one_line_error(capsys, lambda: small_parser().parse_args(["--lerning-rate", "1e-3"]))
    assert line == "error: unknown option --lerning-rate; did you mean --learning-rate? (tool --help lists the options)"
    line = one_line_error(capsys, lambda: small_parser().parse_args(["--zzz=1", "--max-sq-len", "3"]))
    assert line.startswith("error: unknown options --zzz, --max-sq-len; did you mean --max-seq-len?")
    line = one_line_error(capsys, lambda: small_parser().parse_args(["extra"]))
    assert line.startswith("error: unexpected argument 'extra'")
    line = one_line_error(capsys, lambda: small_parser().parse_args(["--max-seq-len", "x"]))
    assert line.startswith("error: argument --max-seq-len: invalid int value: 'x'")


def test_sub_commands_suggest_their_own_options(capsys):
    line = one_line_error(capsys, lambda: cli_parser().parse_args(["export", "a", "b", "--formt", "hf"]))
    assert line == ("error: unknown option --formt; did you mean --format? "
                    "(offload-bitnet export --help lists the options)")
    line = one_line_error(capsys, lambda: cli_parser().parse_args(["exprt", "a", "b"]))
    assert line.startswith("error: argument command: invalid choice: 'exprt' (choose from 'create', ")
    assert line.endswith("); did you mean 'export'? (offload-bitnet --help lists the options)")
    args = cli_parser().parse_args(["create", "out", "--state_dtype", "int8", "--seed", "-3"])
    assert args.state_dtype == "int8" and args.seed == -3


# ---------------------------------------------------------------------------------------------- finetune.py
def test_finetune_negative_values_reach_validation():
    with pytest.raises(RunConfigError, match=r"lr=-0\.001 \(from command line\) must be positive"):
        parse_args(["--lr", "-1e-3"])
    with pytest.raises(RunConfigError, match=r"weight_decay=-0\.1 \(from command line\) must be 0 or more"):
        parse_args(["--weight-decay", "-0.1"])


def test_finetune_unknown_option_is_one_line_and_exit_2(capsys, tmp_path):
    assert finetune_main(["--lerning-rate", "1e-3", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: unknown option --lerning-rate; did you mean --learning-rate? "
                                "(finetune.py --help lists the options)"]
    assert os.listdir(tmp_path) == []


def test_finetune_flags_take_underscore_spellings():
    config = parse_args(["--max_seq_len", "64", "--no_plot", "--learning_rate", "1e-3", "--num_train_iters=3"])
    assert (config.max_seq_len, config.plot, config.lr, config.num_train_iters) == (64, False, 1e-3, 3)
    assert config.sources["max_seq_len"] == "command line"


def test_toml_keys_take_the_flag_spellings_too(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max-seq-len = 64\nprompt = ["Hi"]\nlearning-rate = 1e-3\nmax_new_tokens = 5\n')
    assert load_toml(str(path)) == {"max_seq_len": 64, "prompts": ["Hi"], "lr": 1e-3, "max_new_tokens": 5}
    path.write_text("max_seq_length = 64\n")
    with pytest.raises(RunConfigError, match=r"unknown key 'max_seq_length'; did you mean 'max_seq_len'\?"):
        load_toml(str(path))


def test_finetune_device_as_an_argument_or_an_option(tmp_path):
    model = str(tmp_path)
    for argv, device in (([model, "cpu"], "cpu"), ([model, "--data", "e.txt", "cuda:1"], "cuda:1"),
                         ([model, "--device", "mps"], "mps"), ([model], "cpu")):
        config = parse_args(argv + ["--data", "d.txt"])
        assert config.model == model and config.device == device, argv
    assert parse_args([model, "cpu", "--device", "cpu", "--data", "d.txt"]).device == "cpu"  # the same twice
    demo = parse_args(["mps"])  # no MODEL: the demo, on that device
    assert demo.is_demo and demo.device == "mps" and demo.sources["device"] == "command line"
    with pytest.raises(RunConfigError, match=r"device is given twice and the two disagree: 'cuda' as an argument "
                                             r"and --device cpu"):
        parse_args([model, "cuda", "--device", "cpu", "--data", "d.txt"])


def test_a_model_folder_named_like_a_device_is_a_model(tmp_path, monkeypatch):
    (tmp_path / "cpu").mkdir()
    monkeypatch.chdir(tmp_path)
    assert split_model_and_device("cpu", None) == ("cpu", None)
    assert split_model_and_device("mps", None) == (None, "mps")
    assert split_model_and_device("model", "cpu") == ("model", "cpu")
    assert choose_device(None, None) is None and choose_device("cpu", None) == "cpu"


# ---------------------------------------------------------------------------------------------- test_gen.py
@pytest.fixture
def test_gen():
    sys.path.insert(0, ROOT)
    try:
        import test_gen
    finally:
        sys.path.remove(ROOT)
    return test_gen


def test_test_gen_takes_the_device_either_way(test_gen, capsys):
    assert test_gen.parse_args(["m", "--prompt", "hi"]).device == "cpu"
    assert test_gen.parse_args(["m", "mps", "--prompt", "hi"]).device == "mps"
    assert test_gen.parse_args(["m", "--prompt", "hi", "cuda:1"]).device == "cuda:1"
    assert test_gen.parse_args(["m", "--device", "mps", "--prompt", "hi"]).device == "mps"
    args = test_gen.parse_args(["m", "--temperature", "-1", "--max_new_tokens", "3", "--prompt", "hi"])
    assert args.temperature == -1.0 and args.max_new_tokens == 3  # the negative value reaches validation
    line = one_line_error(capsys, lambda: test_gen.parse_args(["m", "mps", "--device", "cpu"]))
    assert line.startswith("error: the device is given twice and the two disagree: 'mps' as an argument and "
                           "--device cpu")
    line = one_line_error(capsys, lambda: test_gen.parse_args(["m", "--promt", "hi"]))
    assert line.startswith("error: unknown option --promt; did you mean --prompt?")


# ---------------------------------------------------------------------------------------------- sizes
def test_parse_size_bare_letters_are_binary_and_suffixes_exact():
    assert parse_size("2G") == parse_size("2g") == parse_size("2GiB") == parse_size("2 gib") == 2 * 2**30
    assert parse_size("2GB") == parse_size("2 gb") == 2 * 10**9
    assert parse_size("512M") == parse_size("512MiB") == 512 * 2**20 and parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5G") == int(1.5 * 2**30) and parse_size("3K") == 3 * 1024 and parse_size("1T") == 2**40
    assert parse_size(4096) == parse_size("4096") == parse_size("4096B") == 4096
    for bad in ("12 parsecs", "G", "-1G", "2GG", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_memory_budget_means_the_same_to_finetune_and_test_gen(test_gen, tmp_path):
    for text, expected in (("2G", 2 * 2**30), ("2GB", 2 * 10**9), ("768MiB", 768 * 2**20)):
        assert RunConfig(memory_budget=text).memory_budget_bytes == expected
        assert parse_args(["--memory-budget", text]).memory_budget_bytes == expected
        assert test_gen.parse_args([str(tmp_path), "--prompt", "x", "--memory-budget", text]).memory_budget == expected


def test_test_gen_refuses_a_bad_size_in_one_line(test_gen, capsys):
    with pytest.raises(SystemExit):
        test_gen.parse_args(["model", "--prompt", "x", "--memory-budget", "lots"])
    err = capsys.readouterr().err
    assert "expected a size like 512MiB or 4GiB, got 'lots'" in err and len(err.strip().splitlines()) == 1
