#!/usr/bin/env python
"""Generate text with a model, streaming its blocks from disk.

    python test_gen.py MODEL [DEVICE] --prompt "The capital of France is"   # or --device DEVICE
    python test_gen.py SmolLM2-135M-Instruct.Q4_1.gguf cpu --chat --prompt "What is the capital of France?"
    python test_gen.py SmolLM2-135M-Instruct.Q4_1.gguf --adapter runs/demo/adapter --chat --prompt "Hello"

MODEL is a store, or any model the importers read (Hugging Face folder, Meta folder, .gguf file); a model
that is not a store is imported once into the cache folder (~/.cache/offload_bitnet, or
$OFFLOAD_BITNET_CACHE). Several --prompt options run as one batch.
"""
from __future__ import annotations

import argparse
import sys

from offload_bitnet.argparsing import ArgumentParser, choose_device, size_argument
from offload_bitnet.cli import DefaultsHelpFormatter
from offload_bitnet.errors import EXIT_ERROR, EXIT_INTERRUPTED, describe_error, pipe_safe, quiet_broken_pipe
from offload_bitnet.formats import ensure_store
from offload_bitnet.formats.merge import load_adapters
from offload_bitnet.generate import Generator, SamplingOptions, TextStreamer, decode_continuation
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.tokenizers.loaders import open_tokenizer


def _help_formatter():
    class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
        """The module docstring as written, and every option's default."""
    return HelpFormatter


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=_help_formatter())
    parser.add_argument("model", help="store folder, Hugging Face or Meta folder, or .gguf file")
    parser.add_argument("device", nargs="?", help="cpu (default), cuda, cuda:1, mps, mlx (Apple MLX); or give --device")
    parser.add_argument("--device", dest="device_option", metavar="DEVICE", help="the same as the DEVICE argument")
    parser.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    parser.add_argument("--chat", action="store_true", help="format each prompt as a user message with the "
                        "model's chat template and stop at its end-of-turn token")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--memory-budget", type=size_argument, default="2G",
                        help="weights kept in memory; larger models stream from disk every token: 512M, 2G "
                             "(G = GiB), 1.5GiB, 4GB (GB = 10^9 bytes) or a byte count")
    parser.add_argument("--adapter", metavar="DIR",
                        help="LoRA adapters to apply on top of MODEL without merging: a LoRA run's RUN_DIR/adapter "
                             "(MODEL is then the run's base model) or any PEFT LoRA adapter folder")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="the tokenizer to use instead of the model's own (needed when the model carries none): "
                             "a folder with tokenizer.json or tokenizer.model, one of those files, a .gguf file, "
                             "a store, or 'byte' for the built-in byte tokenizer")
    args = parser.parse_intermixed_args(argv)  # intermixed: MODEL --prompt TEXT DEVICE
    try:
        args.device = choose_device(args.device, args.device_option) or "cpu"
    except ValueError as error:
        parser.error(str(error))
    return args


def run(args) -> int:
    if not args.prompt:
        raise ValueError("give at least one --prompt")
    options = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    options.validate()  # before an import that may take minutes
    store = BlockStore(ensure_store(args.model, progress=True))
    tokenizer = open_tokenizer(store.path, store.extra.get("tokenizer"), args.tokenizer)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []

        def messages(text):
            return system + [{"role": "user", "content": text}]
        prompts = [tokenizer.encode_chat(messages(text)) for text in args.prompt]
    else:
        prompts = [tokenizer.encode(text, bos=tokenizer.add_bos) for text in args.prompt]
    adapters = None
    if args.adapter:
        adapters = load_adapters(args.adapter, store.config)
        print(f"applying LoRA adapters from {args.adapter} (rank {adapters.lora.rank}, step {adapters.step}, "
              f"targets {','.join(adapters.lora.targets)})", file=sys.stderr)
    generator = Generator(store, args.device, memory_budget=args.memory_budget, adapters=adapters)
    try:
        streamer = None
        if len(prompts) == 1:
            sys.stdout.write(f"> {args.prompt[0]}\n" if args.chat else args.prompt[0])
            streamer = TextStreamer(tokenizer, prompts[0])
        result = generator.generate(prompts, options, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                                    on_token=streamer)
        if streamer is not None:
            streamer.finish()
            print()
        else:
            for index, (text, prompt, tokens) in enumerate(zip(args.prompt, prompts, result.tokens)):
                shown = f"> {text}\n" if args.chat else text
                print(f"[{index}] {shown}{decode_continuation(tokenizer, prompt, tokens)}")
        ends = ", ".join(result.stop_reasons)
        print(f"[{result.summary()}; stopped by: {ends}]", file=sys.stderr)
    finally:
        generator.close()
    return 0


def main(argv=None) -> int:
    args = None
    try:
        args = parse_args(argv)
        result = run(args)
        return result
    except BrokenPipeError:  # `test_gen.py ... | head`: the reader has what it wanted
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - one readable paragraph; the messages name the file and the fix
        if args is not None and args.debug:
            raise
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(pipe_safe(main)())
