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
import os
import re
import sys

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
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")

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
