"""The one command-line parser of every script (``finetune.py``, ``test_gen.py``, ``offload-bitnet``).

It is argparse with the habits users bring from other tools:

* a negative number is a value: ``--lr -1e-3`` reaches validation, which says that lr must be positive
  (argparse alone takes ``-1e-3`` for an option and prints its whole usage);
* ``--max_seq_len`` is ``--max-seq-len`` (an underscore spelling of a known option is accepted);
* a mistake gets one line, not the usage: ``error: unknown option --lerning-rate; did you mean --learning-rate?``.

It also holds the device argument's rule, shared by the scripts that take the device both as a positional
argument and as ``--device``.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import sys

import torch

from offload_bitnet.notices import rank_label

# The compute devices a script accepts: cpu, cuda, cuda:N, mps.
DEVICE_PATTERN = r"cpu|cuda(:\d+)?|mps|mlx"  # mlx: the Apple MLX backend (engine.backend)
# argparse's own test for "a negative number, not an option" knows -1 and -.5 but not -1e-3 or -2.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with negative numbers as values, underscore spellings of options and
    one-line errors that name the closest valid option. Sub-command parsers are of the same kind and report
    their own unknown options (so the suggestion comes from the sub-command's options)."""

    def __init__(self, *args, reject_unknown: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER
        self._reject_unknown = reject_unknown

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", lambda **options: type(self)(reject_unknown=True, **options))
        return super().add_subparsers(**kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)
        args = [self._known_spelling(arg) for arg in args[:end]] + args[end:]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._reject_unknown:
            self.error(self.unrecognized(extras))
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras))
        return namespace

    def parse_intermixed_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_intermixed_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras))
        return namespace

    def error(self, message):
        """One line on stderr, starting ``error:`` like every other error of the tool (the usage is one
        ``--help`` away); exit status 2, as argparse's."""
        choice = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)$", message)
        if choice:  # a misspelt sub-command or value: name the closest choice too
            close = difflib.get_close_matches(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=1)
            message += f"; did you mean {close[0]!r}?" if close else ""
        self.exit(2, f"error: {rank_label()}{message} ({self.prog} --help lists the options)\n")

    def unrecognized(self, extras: list[str]) -> str:
        """The message for arguments nothing took: each unknown option with the closest valid one."""
        options = [arg.split("=", 1)[0] for arg in extras if arg.startswith("-") and not
                   _NEGATIVE_NUMBER.match(arg)]
        if not options:
            return f"unexpected argument{'s' if len(extras) > 1 else ''} {' '.join(map(repr, extras))}"
        known = [name for name in self._option_string_actions if name.startswith("--")]
        described = []
        for name in options:
            close = difflib.get_close_matches(name.replace("_", "-"), known, n=1, cutoff=0.6)
            described.append(f"{name}; did you mean {close[0]}?" if close else name)
        return f"unknown option{'s' if len(options) > 1 else ''} {', '.join(described)}"

    def _known_spelling(self, arg: str) -> str:
        """``--max_seq_len[=V]`` -> ``--max-seq-len[=V]`` when only the dashed spelling is an option here."""
        if not arg.startswith("--") or "_" not in arg:
            return arg
        name, equals, value = arg.partition("=")
        if name in self._option_string_actions:
            return arg
        dashed = name.replace("_", "-")
        return dashed + equals + value if dashed in self._option_string_actions else arg


def is_device(text: str | None) -> bool:
    """Whether ``text`` names a compute device (cpu, cuda, cuda:N, mps, mlx)."""
    return text is not None and re.fullmatch(DEVICE_PATTERN, text) is not None


def split_model_and_device(model: str | None, device: str | None) -> tuple[str | None, str | None]:
    """The positional ``[MODEL] [DEVICE]`` of a script whose MODEL may be left out: a lone positional that
    names a device and is not a path (``finetune.py cpu``) is the device."""
    if model is not None and device is None and is_device(model) and not os.path.exists(model):
        return None, model
    return model, device


def choose_device(positional: str | None, option: str | None) -> str | None:
    """The device given as a positional argument or as ``--device`` (None: neither); ValueError when both are
    given and disagree."""
    if positional is not None and option is not None and positional != option:
        raise ValueError(f"the device is given twice and the two disagree: {positional!r} as an argument and "
                         f"--device {option}; give it once (either form works)")
    return option if option is not None else positional


class DeviceError(ValueError):
    """A device this machine does not have (or that torch does not know)."""


def check_device(device: str):
    """``torch.device(device)``, refusing one this machine does not have with a message that says what to use.
    ``mlx`` (the Apple MLX backend, ``engine.backend``) needs MLX installed; its tensors to and from the store are
    torch CPU tensors."""
    if device == "mlx":
        if importlib.util.find_spec("mlx") is None:
            raise DeviceError('--device mlx needs Apple MLX, which is not installed: pip install -e ".[mlx]"')
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or mlx") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: this PyTorch build or machine has no usable CUDA GPU; use --device cpu")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device}: MPS is not available here; use --device cpu")
    return parsed


# Sizes: a bare K/M/G/T is binary, as in `docker --memory 2g`, `java -Xmx2G` or `ulimit`: 2G = 2 GiB. The SI and IEC
# spellings mean exactly what they say: 2GB = 2 * 10**9 bytes, 2GiB = 2 * 2**30 bytes.
_SIZE_UNITS = {"": 1, "b": 1,
               "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
               "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(value) -> int:
    """Bytes from ``2G`` (2 GiB), ``1.5GiB``, ``4GB`` (4 * 10**9), ``512M`` or a plain number: the one meaning of a
    size on every command line and in run config files. ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 4GiB, got {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 512MiB or 4GiB, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def size_argument(text: str) -> int:
    """``parse_size`` as an argparse ``type=``: a bad size is a one-line usage error."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
