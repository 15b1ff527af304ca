"""``offload-bitnet``: the command-line tool around the library (create, import, export, verify, info, ...).

Each sub-command only parses arguments and calls the library. Errors print one paragraph, no traceback
unless ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys

from offload_bitnet import judge as judging
from offload_bitnet.argparsing import ArgumentParser
from offload_bitnet.distributed.gather import export_run, gather_progress, gather_store, rank_store_paths
from offload_bitnet.errors import describe_error, pipe_safe, quiet_broken_pipe
from offload_bitnet.formats import EXPORT_FORMATS, GGUF_TYPES, cache, import_model
from offload_bitnet.formats.adapters import export_adapter
from offload_bitnet.formats.merge import merge_lora
from offload_bitnet.model.config import SIZES
from offload_bitnet.progress import Progress
from offload_bitnet.store.blockstore import BlockStore, StoreSettings
from offload_bitnet.store.sizing import human
from offload_bitnet.store.write import create_model
from offload_bitnet.tokenizers.base import TokenizerError
from offload_bitnet.tokenizers.loaders import install_tokenizer, tokenizer_source
from offload_bitnet.tokenizers.runtime import load_tokenizer
from offload_bitnet.train.trainer import main as finetune_main


def _create(args):

    if args.tokenizer:  # a bad tokenizer path fails before minutes of writing, not after

        if args.tokenizer != "byte":
            tokenizer_source(args.tokenizer)
    path = create_model(args.out, size=args.size, arch=args.arch, mode=args.mode, shadow_dtype=args.shadow_dtype,
                        state_dtype=args.state_dtype, seed=args.seed, progress=True, packed_only=args.packed_only)
    _attach_tokenizer(path, args.tokenizer)
    print(f"created {args.size} {args.arch} model at {path}")


def _attach_tokenizer(path: str, tokenizer: str | None):
    """--tokenizer of create/import: copy it into the new store (removed again if it does not fit the model)."""
    if not tokenizer:
        return

    try:
        description = install_tokenizer(path, tokenizer)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # the store was made by this command: leave nothing half-done
        raise
    print(f"stored the {description['kind']} tokenizer of {tokenizer} in {path}")


def _import(args):
    settings = None
    if args.mode or args.packed_only:
        settings = StoreSettings(mode=args.mode or "qat", shadow_dtype=args.shadow_dtype,
                                 state_dtype=args.state_dtype, packed_only=args.packed_only)
    if args.tokenizer and args.tokenizer != "byte":

        tokenizer_source(args.tokenizer)
    path = import_model(args.src, args.out, settings, progress=True)
    _attach_tokenizer(path, args.tokenizer)
    print(f"imported {args.src} into {path}")


def _export(args):
    options = {"gguf_type": args.gguf_type} if args.gguf_type else {}
    path = export_run(args.store, args.out, args.format, **options)  # a distributed run is gathered first
    print(f"exported {args.store} to {path} ({args.format})")


def _gather(args):
    ranks = rank_store_paths(args.run_dir)
    if ranks is None:
        raise ValueError(f"{args.run_dir} is not a distributed run (no store.rank<R> folders in it)")
    gather_store(ranks, args.out, progress=gather_progress(ranks))
    print(f"gathered the {len(ranks)} ranks of {args.run_dir} into {args.out} (one store: train it on one process)")


def _export_adapter(args):
    path = export_adapter(args.run_dir, args.out, format=args.format, base=args.base, store=args.store,
                          progress=True)
    print(f"exported the adapters of {args.run_dir} to {path} ({args.format})")


def _merge(args):
    path = merge_lora(args.store, args.adapter_dir, args.out, progress=True, shadow_dtype=args.dtype)
    print(f"merged {args.adapter_dir} into {path}")


def _verify(args):
    ranks = rank_store_paths(args.store)
    if ranks is not None:  # a distributed run: every rank's store
        return max(_verify_one(path) for path in ranks)
    return _verify_one(args.store)


def _verify_one(path: str) -> int:
    store = BlockStore(path)
    bar = Progress(sum(len(p) for p in store.manifest["files"].values()), "verifying")
    problems = store.verify_all(lambda done, total, note: bar.update(done, note))
    if problems:
        print(f"{len(problems)} problem(s) in {path}:")
        for line in problems:
            print("  " + line)
        return 1
    print(f"{path}: all files match their checksums (step {store.step})")
    return 0


def _info(args):
    ranks = rank_store_paths(args.store)
    store = BlockStore(ranks[0] if ranks else args.store)
    if ranks and not args.json:
        print(f"distributed run on {len(ranks)} ranks (the model below is rank 0's view; each rank holds every "
              "unit's weights and the master weights and moments of the units it owns):")
        for rank, path in enumerate(ranks):
            share = BlockStore(path)
            owned = [u for u in share.units if share.has_part(u, "optim") or share.has_part(u, "shadow")]
            span = f"{owned[0]}..{owned[-1]}" if owned else "no master weights or moments yet"
            print(f"  rank {rank}: {path}, step {share.step}, {_gib_text(share.disk_bytes())}, owns {span}")
            share.close()
    config = store.config
    sizes = store.disk_bytes()
    if args.json:
        print(json.dumps({
            "path": store.path, "step": store.step, "settings": store.settings.__dict__,
            "parameters": config.param_count(), "config": config.to_dict(),
            "bytes_on_disk": sizes, "source": store.extra.get("source", {}).get("format", "created"),
            "tokenizer": store.extra.get("tokenizer") or {"kind": "byte"},
        }, indent=1))
        return 0
    for line in info_lines(store):
        print(line)
    return 0


def _gib_text(sizes) -> str:
    total = sum(sizes.values()) if isinstance(sizes, dict) else sizes
    return f"{total / 2**30:.2f} GiB on disk"


def info_lines(store) -> list[str]:
    """A readable summary of a store for ``offload-bitnet info``."""
    config, settings, sizes = store.config, store.settings, store.disk_bytes()
    source = store.extra.get("source", {})
    origin = source.get("format") or "created"
    origin += f" ({source['path']})" if source.get("path") else ""
    origin = store.extra.get("created_from", origin) if origin == "created" else origin
    description = store.extra.get("tokenizer") or {}
    kind = description.get("kind", "byte")
    template = "unknown"
    try:
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):  # the byte-fallback warning belongs to generation
            tokenizer = load_tokenizer(store.path, description)
        tokens = f"{kind}, {tokenizer.vocab_size:,} tokens" if description else \
            f"none of its own; the built-in byte tokenizer fits its {config.vocab_size}-token vocabulary"
        template = "yes" if tokenizer.chat_template else "no"
    except (TokenizerError, OSError, ValueError) as error:
        tokens = f"{kind}: cannot be used ({str(error).split(':')[0]})" if description else \
            f"none (the model's {config.vocab_size:,}-token vocabulary needs --tokenizer PATH)"
    shape = (f"{config.n_layers} blocks, dim {config.dim}, {config.n_heads} heads ({config.n_kv_heads} KV), "
             f"FFN {config.hidden_dim}, vocab {config.vocab_size:,}, "
             f"{'tied' if config.tie_embeddings else 'untied'} embeddings")
    parts = ", ".join(f"{name} {human(size)}" for name, size in sizes.items() if size)
    return [
        f"{store.path}",
        f"  model:      {config.arch}, {config.param_count():,} parameters; {shape}",
        f"  step:       {store.step}" + (" (as created or imported)" if store.step == 0 else
                                           " (training steps committed)"),
        f"  mode:       {settings.mode}; packed-only (a frozen ternary base: no master weights or optimizer "
        "state; LoRA and generation)" if settings.packed_only else
        f"  mode:       {settings.mode}; master weights {settings.shadow_dtype}, "
        f"optimizer state {settings.state_dtype}",
        f"  on disk:    {human(sum(sizes.values()))} ({parts})",
        f"  source:     {origin}",
        f"  tokenizer:  {tokens}",
        f"  chat template: {template}",
        f"  (offload-bitnet info {os.path.relpath(store.path)} --json prints every field)",
    ]


def _cache(args):

    if args.cache_command == "list":
        for line in cache.format_entries(cache.list_entries()):
            print(line)
        return 0
    older = cache.parse_duration(args.older_than) if args.older_than else None
    removed, busy = cache.clear_entries(older, stale_only=args.stale)

    for entry in removed:
        print(f"removed {entry['path']} ({human(entry['bytes'])}, from {entry['source'] or '?'})")
    for entry in busy:
        print(f"kept {entry['path']}: another process is importing into it right now")
    print(f"freed {human(sum(e['bytes'] for e in removed))} in {cache.cache_root()}")
    return 0


def _delegate(module_name: str, function: str):
    """Sub-commands implemented by other modules (status, plot)."""
    def run(args):
        module = importlib.import_module(f".{module_name}", __package__)
        return getattr(module, function)(args.run_dir)
    return run


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, left out where there is none to show (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_storage_options(parser: argparse.ArgumentParser):
    parser.add_argument("--shadow-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="dtype of the master weights")
    parser.add_argument("--state-dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                        help="AdamW moments: fp32, bf16, or int8 (8-bit blockwise)")
    parser.add_argument("--packed-only", action="store_true",
                        help="a frozen ternary base (qat): packed 2-bit projections, norms, embedding and head, no "
                             "shadow weights or moments; for LoRA and generation (the default when importing a "
                             "packed BitNet checkpoint)")


TOKENIZER_HELP = ("tokenizer to store with the model: a folder with tokenizer.json or "
                  "tokenizer.model, one of those files, a .gguf file, a store, or 'byte'")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="offload-bitnet", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str = ""):
        """A sub-command whose --help starts with what it does and shows every default."""
        return commands.add_parser(name, help=summary, description=summary + (". " + description if description
                                                                                 else ""),
                                   formatter_class=DefaultsHelpFormatter)

    create = command("create", "create a blank (random) model store of a named size",
                     "Written block by block, so memory stays at about one block whatever the size.")
    create.add_argument("out", help="folder of the new store")
    create.add_argument("--size", default="demo", choices=list(SIZES), help="named size")
    create.add_argument("--arch", default="bitnet", choices=["bitnet", "llama"], help="architecture")
    create.add_argument("--mode", choices=["qat", "full"], help="store mode (none: qat for bitnet, full for llama)")
    create.add_argument("--seed", type=int, default=0, help="seed of the random initialization")
    create.add_argument("--tokenizer", metavar="PATH", help=TOKENIZER_HELP + " (none: the byte tokenizer, "
                        "which only fits the 260-token vocabulary of demo and tiny)")
    _add_storage_options(create)
    create.set_defaults(run=_create)

    imp = command("import", "import a HF / Meta / GGUF model into a store",
                  "Streams tensor by tensor; the source is left untouched.")
    imp.add_argument("src", help="Hugging Face folder, Meta folder or .gguf file")
    imp.add_argument("out", help="folder of the new store")
    imp.add_argument("--mode", choices=["qat", "full"], help="store mode (none: qat for BitNet sources, "
                     "full otherwise)")
    imp.add_argument("--tokenizer", metavar="PATH",
                     help=TOKENIZER_HELP + " (none: the source's own, which this replaces)")
    _add_storage_options(imp)
    imp.set_defaults(run=_import)

    exp = command("export", "export a store (source format, hf, hf-bitnet, meta, gguf)")
    exp.add_argument("store", help="store folder, or a distributed run's folder (its ranks' stores are gathered)")
    exp.add_argument("out", help="output folder")
    exp.add_argument("--format", default="source", choices=list(EXPORT_FORMATS),
                     help="source: the format it was imported from; hf: LlamaForCausalLM (BitNetForCausalLM for a "
                          "BitNet store); hf-bitnet: packed BitNetForCausalLM; meta; gguf: llama.cpp (any store; "
                          "with a Modelfile for Ollama)")
    exp.add_argument("--gguf-type", choices=list(GGUF_TYPES), type=str.lower,
                     help="GGUF tensor type (default: tq2_0 for a ternary qat store, f16 otherwise; norms stay "
                          "F32, the embedding and head F16 in tq files)")
    exp.set_defaults(run=_export)

    adapter = command("export-adapter", "export a LoRA run's adapters for peft or llama.cpp, without merging",
                      "peft: a PEFT folder whose base_model_name_or_path is a Hugging Face folder peft loads (the "
                      "base's HF source, else an hf export of the base made here); gguf: a llama.cpp LoRA adapter "
                      "(llama-cli -m BASE.gguf --lora OUT).")
    adapter.add_argument("run_dir", help="the LoRA run folder (RUN_DIR, or RUN_DIR/adapter)")
    adapter.add_argument("out", help="output folder (peft) or .gguf file (gguf)")
    adapter.add_argument("--format", default="peft", choices=["peft", "gguf"], help="what to write")
    adapter.add_argument("--base", metavar="DIR", help="peft: the HF folder of the base to record (exported there "
                         "when it does not exist; none: the base's HF source, else OUT/base)")
    adapter.add_argument("--store", help="the base store, when the run folder does not name it")
    adapter.set_defaults(run=_export_adapter)

    merge = command("merge", "fold LoRA adapters into a new 16-bit store")
    merge.add_argument("store", help="the base store the adapters were trained on")
    merge.add_argument("adapter_dir", help="the adapter folder (RUN_DIR/adapter)")
    merge.add_argument("out", help="folder of the merged store")
    merge.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="dtype of the merged weights "
                       "(none: the base's 16-bit dtype)")
    merge.set_defaults(run=_merge)

    gather = command("gather", "one store from the ranks' stores of a distributed run (RUN/store.rank<R>)",
                     "Copy each machine's RUN/store.rank<R> into RUN first (rsync -a HOST:RUN/store.rank1 RUN/).")
    gather.add_argument("run_dir", help="the run folder holding store.rank0, store.rank1, ...")
    gather.add_argument("out", help="folder of the new store")
    gather.set_defaults(run=_gather)

    verify = command("verify", "check every file of a store (or of every rank's store of a run) against its "
                     "checksum")
    verify.add_argument("store", help="store folder (or a distributed run's folder)")
    verify.set_defaults(run=_verify)

    info = command("info", "print a store's model, step, mode, dtypes, size on disk and tokenizer")
    info.add_argument("store", help="store folder")
    info.add_argument("--json", action="store_true", help="print every field as JSON (sizes in bytes)")
    info.set_defaults(run=_info)

    status = command("status", "a run's step, loss, ETA and lock holder")
    status.add_argument("run_dir", help="run folder (RUNS_DIR/EXPERIMENT)")
    status.set_defaults(run=_delegate("metrics", "print_status"))

    # Parsed by finetune.py's own option parser (see main): the same options, the same checks.
    commands.add_parser("plan", add_help=False, usage="offload-bitnet plan [MODEL] [finetune.py options]",
                        help="the dry-run plan of a fine-tuning run: finetune.py MODEL ... --dry-run",
                        description="The dry-run plan of a fine-tuning run (finetune.py MODEL ... --dry-run): "
                                    "the same options as finetune.py, parsed and checked by it.")
    plot = command("plot", "write the train/validation loss PNG of a run")
    plot.add_argument("run_dir", help="run folder (RUNS_DIR/EXPERIMENT)")
    plot.set_defaults(run=_delegate("metrics", "plot_run"))

    judge = command("judge", "grade a model's answers to held-out Alpaca/chat records with a judge model (1-5)",
                    "Answers greedily, asks the judge (a model run here, or --judge-url) to grade each answer against "
                    "the reference with a Prometheus-style rubric, and writes judge.jsonl and judge_summary.json.")
    judging.add_arguments(judge)
    judge.set_defaults(run=judging.run_command)

    cache = command("cache", "list or clear the import cache",
                    "Models given by path to finetune.py, test_gen.py and open_model are imported once into "
                    "~/.cache/offload_bitnet (or $OFFLOAD_BITNET_CACHE) and reused while the source is unchanged.")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_commands.add_parser("list", help="every cached import: size, age, source, whether the source changed",
                              description="Every cached import: size, age, source, and whether the source changed "
                                          "since (stale).", formatter_class=DefaultsHelpFormatter)
    clear = cache_commands.add_parser("clear", help="remove cached imports",
                                      description="Remove cached imports (all, or those selected by the options). "
                                                  "An import in progress is kept.",
                                      formatter_class=DefaultsHelpFormatter)
    clear.add_argument("--older-than", metavar="DURATION", help="only imports older than this: 30m, 12h, 7d, 2w")
    clear.add_argument("--stale", action="store_true", help="only imports whose source changed or is gone")
    cache.set_defaults(run=_cache)
    return parser


@pipe_safe
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:

        return finetune_main([*argv[1:], "--dry-run"], prog="offload-bitnet plan")
    try:
        args = build_parser().parse_args(argv)
        result = args.run(args)
    except BrokenPipeError:  # `offload-bitnet ... | head`: the reader has what it wanted
        return quiet_broken_pipe()
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
