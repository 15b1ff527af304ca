"""``finetune.py``'s command line and ``--config run.toml`` files, read into a ``RunConfig``: defaults, then the TOML
file, then flags. Relative paths in a TOML file are resolved against the folder of that file."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import tomllib

from offload_bitnet.argparsing import ArgumentParser, choose_device, split_model_and_device
from offload_bitnet.train.runconfig import DEMO_DEFAULTS, PATH_FIELDS, RunConfig, RunConfigError


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# Other names a TOML file may use for a field (its flag and the flag's aliases, without dashes):
# learning_rate -> lr, prompt -> prompts.
ALIASES = {alias.lstrip("-").replace("-", "_"): f.name for f in FIELDS.values()
           for alias in (*f.metadata["aliases"], f.metadata["flag"] or "") if alias}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; defaults are suppressed so that only flags actually given override."""
    parser = ArgumentParser(
        prog="finetune.py", argument_default=argparse.SUPPRESS,
        description="Fine-tune a BitNet or LLaMA-family model larger than memory, streaming blocks from disk. "
                    "With no MODEL, creates a small BitNet demo model and trains it on test_data/demo.txt. "
                    "Re-running the same command resumes from the last completed step.",
        epilog="Without a MODEL the demo recipe replaces the defaults the user did not set: "
               + ", ".join(f"{name}={value}" for name, value in DEMO_DEFAULTS.items()) + ".")
    parser.add_argument("model", nargs="?", metavar="MODEL", help=FIELDS["model"].metadata["help"])
    parser.add_argument("device_argument", nargs="?", metavar="DEVICE",
                        help="compute device, as with --device (e.g. finetune.py MODEL cpu; without a MODEL, "
                             "finetune.py cpu trains the demo on it)")
    parser.add_argument("--config", metavar="RUN.toml", help="read settings from a TOML file (flags override it)")
    group = parser
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            group = parser.add_argument_group(SECTIONS[f.name])
        if f.name == "model":
            continue
        kind = f.metadata["kind"]
        names = [flag_of(f), *f.metadata["aliases"]]
        help_text = f.metadata["help"] + _default_note(f)
        if kind == "bool":
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind == "list":
            group.add_argument(*names, dest=f.name, action="append", help=help_text,
                               metavar="TEXT" if f.name == "prompts" else "FILE")
        else:
            group.add_argument(*names, dest=f.name, type={"int": int, "float": float}.get(kind, str),
                               metavar=f.name.upper(), help=help_text)
    return parser


# Help sections, each starting at the named field (fields are declared in section order).
SECTIONS = {"size": "model and run folder", "data": "data", "mode": "optimization",
            "eval_batch_size": "evaluation and generation", "device": "system and output"}


def _default_note(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else None
    if default in (None, False) or f.metadata["kind"] == "list":
        return ""
    return f" (default: {default})"


def _check_type(name: str, value, origin: str):
    """Coerce a TOML value to the field's kind, or raise RunConfigError naming the key and the file."""
    kind = FIELDS[name].metadata["kind"]
    expected = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "list": "a string or a list of strings", "size": "a size like \"4GiB\" or a number of bytes",
                "names": "a comma-separated string or a list of strings"}[kind]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "list": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "names": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "size": isinstance(value, (str, int)) and not isinstance(value, bool),
    }[kind]
    if not ok:
        raise RunConfigError(f"invalid run configuration: {origin}: {name} must be {expected}, got {value!r}")
    if kind == "float":
        return float(value)
    if kind == "list":
        return [value] if isinstance(value, str) else list(value)
    if kind == "names":
        return value if isinstance(value, str) else ",".join(value)
    return value


def load_toml(path: str) -> dict:
    """Field values from a TOML file, type-checked, with relative paths resolved against its folder."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise RunConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise RunConfigError(f"config file {path} is not valid TOML: {error}") from None
    except OSError as error:
        raise RunConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    base = os.path.dirname(os.path.abspath(path))
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in FIELDS:
            close = difflib.get_close_matches(name, [*FIELDS, *ALIASES], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FIELDS)}"
            raise RunConfigError(f"invalid run configuration: {path}: unknown key {key!r}{hint}")
        value = _check_type(name, value, path)
        if name in PATH_FIELDS and value is not None and not (name == "tokenizer" and value == "byte"):
            value = [_resolve(base, v) for v in value] if isinstance(value, list) else _resolve(base, value)
        values[name] = value
    return values


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """A validated RunConfig from defaults, ``--config FILE`` and flags (flags win)."""
    parser = build_parser()
    args = vars(parser.parse_intermixed_args(argv))  # intermixed: MODEL --data FILE DEVICE
    model, device_argument = split_model_and_device(args.pop("model", None), args.pop("device_argument", None))
    if model is not None:
        args["model"] = model
    try:
        device = choose_device(device_argument, args.get("device"))
    except ValueError as error:
        raise RunConfigError(f"invalid run configuration: {error}") from None
    if device is not None:
        args["device"] = device
    config = RunConfig()
    config_path = args.pop("config", None)
    if config_path:
        label = os.path.basename(config_path)
        for name, value in load_toml(config_path).items():
            setattr(config, name, value)
            config.sources[name] = label
    for name, value in args.items():
        setattr(config, name, value)
        config.sources[name] = "command line"
    config.apply_demo_defaults()
    return config.validate()
