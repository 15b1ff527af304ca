"""``offload-bitnet``: the command-line tool around the library (create, import, export, verify, info, ...).

Each sub-command only parses arguments and calls the library. Errors print one paragraph, no traceback
unless ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .argparsing import ArgumentParser
from .config import SIZES
from .errors import describe_error
from .formats import EXPORT_FORMATS
from .progress import Progress


def _create(args):
    from .create import create_model

    path = create_model(args.out, size=args.size, arch=args.arch, mode=args.mode, shadow_dtype=args.shadow_dtype,
                        state_dtype=args.state_dtype, seed=args.seed, progress=True)
    print(f"created {args.size} {args.arch} model at {path}")


def _import(args):
    from .formats import import_model
    from .store import StoreSettings

    settings = None
    if args.mode:
        settings = StoreSettings(mode=args.mode, shadow_dtype=args.shadow_dtype, state_dtype=args.state_dtype)
    path = import_model(args.src, args.out, settings, progress=True)
    print(f"imported {args.src} into {path}")


def _export(args):
    from .formats import export_model

    path = export_model(args.store, args.out, format=args.format)
    print(f"exported {args.store} to {path} ({args.format})")


def _merge(args):
    from .merge import merge_lora

    path = merge_lora(args.store, args.adapter_dir, args.out, progress=True, shadow_dtype=args.dtype)
    print(f"merged {args.adapter_dir} into {path}")


def _verify(args):
    from .store import BlockStore

    store = BlockStore(args.store)
    bar = Progress(sum(len(p) for p in store.manifest["files"].values()), "verifying")
    problems = store.verify_all(lambda done, total, note: bar.update(done, note))
    if problems:
        print(f"{len(problems)} problem(s) in {args.store}:")
        for line in problems:
            print("  " + line)
        return 1
    print(f"{args.store}: all files match their checksums (step {store.step})")
    return 0


def _info(args):
    from .store import BlockStore

    store = BlockStore(args.store)
    config = store.config
    sizes = store.disk_bytes()
    print(json.dumps({
        "path": store.path, "step": store.step, "settings": store.settings.__dict__,
        "parameters": config.param_count(), "config": config.to_dict(),
        "bytes_on_disk": sizes, "source": store.extra.get("source", {}).get("format", "created"),
    }, indent=1))


def _delegate(module_name: str, function: str):
    """Sub-commands implemented by other modules (status, plot)."""
    def run(args):
        module = importlib.import_module(f".{module_name}", __package__)
        return getattr(module, function)(args.run_dir)
    return run


def _add_storage_options(parser: argparse.ArgumentParser):
    parser.add_argument("--shadow-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="dtype of the master weights (default fp16)")
    parser.add_argument("--state-dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                        help="AdamW moments: fp32 (default), bf16, or int8 (8-bit blockwise)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="offload-bitnet", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="create a blank (random) model store of a named size")
    create.add_argument("out")
    create.add_argument("--size", default="demo", choices=list(SIZES))
    create.add_argument("--arch", default="bitnet", choices=["bitnet", "llama"])
    create.add_argument("--mode", choices=["qat", "full"], help="default: qat for bitnet, full for llama")
    create.add_argument("--seed", type=int, default=0)
    _add_storage_options(create)
    create.set_defaults(run=_create)

    imp = commands.add_parser("import", help="import a HF / Meta / GGUF model into a store")
    imp.add_argument("src")
    imp.add_argument("out")
    imp.add_argument("--mode", choices=["qat", "full"], help="default: qat for BitNet sources, full otherwise")
    _add_storage_options(imp)
    imp.set_defaults(run=_import)

    exp = commands.add_parser("export", help="export a store (source format, hf, hf-bitnet, meta, gguf)")
    exp.add_argument("store")
    exp.add_argument("out")
    exp.add_argument("--format", default="source", choices=list(EXPORT_FORMATS),
                     help="source (default: the format it was imported from), hf (LlamaForCausalLM), hf-bitnet "
                          "(packed BitNetForCausalLM), meta, gguf (F16, stores imported from GGUF only)")
    exp.set_defaults(run=_export)

    merge = commands.add_parser("merge", help="fold LoRA adapters into a new 16-bit store")
    merge.add_argument("store")
    merge.add_argument("adapter_dir")
    merge.add_argument("out")
    merge.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: the base's 16-bit dtype")
    merge.set_defaults(run=_merge)

    verify = commands.add_parser("verify", help="check every file of a store against its checksum")
    verify.add_argument("store")
    verify.set_defaults(run=_verify)

    info = commands.add_parser("info", help="print a store's config, step and size on disk")
    info.add_argument("store")
    info.set_defaults(run=_info)

    status = commands.add_parser("status", help="a run's step, loss, ETA and lock holder")
    status.add_argument("run_dir")
    status.set_defaults(run=_delegate("metrics", "print_status"))

    plot = commands.add_parser("plot", help="write the train/validation loss PNG of a run")
    plot.add_argument("run_dir")
    plot.set_defaults(run=_delegate("metrics", "plot_run"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one clear paragraph for the user
        if args.debug:
            raise
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
