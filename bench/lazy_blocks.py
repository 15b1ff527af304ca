"""Peak memory of a LoRA step on a frozen packed base whose blocks are made one projection at a time, against the
same blocks made dense, on torch and on MLX.

Blocks whose dense compute weights exceed ``dense_block_bytes`` (34B and up by default) get each projection made
only while its matmul runs (``model.LazyWeight`` on torch, ``backends.mlx.model.LazyProjection`` on MLX). This
bench forces the rule both ways on a store of 7B width (dim 4096, hidden 11008: a block is 0.75 GiB dense in
fp32, its largest projection 0.17 GiB), so the saving is large beside the fixed baseline. Each configuration
trains ``--steps`` LoRA steps (rank 8, every projection) in a fresh process, which reports its own peak RSS.

Target: per backend, the lazy run's peak RSS is below the dense run's by at least half a dense block
(``--saving-target``, as a fraction of one dense block), and both runs give the same losses bit for bit.

Usage: ``python bench/lazy_blocks.py [--devices cpu mlx] [--blocks 2] [--seq 64] [--workdir DIR] [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import banner, check, fail, finish, gib, mib, scratch_dir  # noqa: E402

CHILD_TAG = "CHILD_RESULT "


def child_main(args) -> int:
    """One run: ``--steps`` LoRA steps on ``--store``; prints its losses and peak RSS as one JSON line."""
    import torch

    torch.set_num_threads(1)
    from offload_bitnet.api import open_for_training
    from offload_bitnet.model.lora import LoRAConfig

    engine = open_for_training(args.store, device=args.device, lora=LoRAConfig(rank=8),
                               adapter_dir=os.path.join(args.workdir, f"adapter-{args.device}-{args.dense_bytes}"),
                               dense_block_bytes=args.dense_bytes)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, engine.config.vocab_size, (1, args.seq), generator=generator)
    losses, walls = [], []
    for _ in range(args.steps):
        stats = engine.train_step([(ids, None)])
        losses.append(stats.loss)
        walls.append(stats.wall_s)
    engine.close()
    result = {"losses": losses, "wall_s": walls, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(CHILD_TAG + json.dumps(result), flush=True)
    return 0


def run_child(store: str, workdir: str, device: str, dense_bytes: int, steps: int, seq: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--store", store, "--workdir", workdir,
               "--device", device, "--dense-bytes", str(dense_bytes), "--steps", str(steps), "--seq", str(seq)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1][len(CHILD_TAG):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu", "mlx"], choices=["cpu", "mlx"])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--saving-target", type=float, default=0.5,
                        help="the lazy run's saving, at least this fraction of one dense block")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--workdir", default=None, help="where to put the store (default: system temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dense-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    from offload_bitnet.model.block import dense_block_bytes
    from offload_bitnet.store.write import create_model

    import torch

    banner("LoRA step memory: blocks made one projection at a time vs dense", args.quick)
    shape = (dict(size="demo", n_layers=args.blocks) if args.quick else
             dict(size="7B", n_layers=args.blocks, vocab_size=4096))
    with scratch_dir(args.workdir, args.keep) as root:
        store = create_model(os.path.join(root, "store"), arch="bitnet", mode="qat", packed_only=True, **shape)
        from offload_bitnet.store.blockstore import BlockStore

        config = BlockStore(store).config
        block = dense_block_bytes(config, torch.float32)
        print(f"store: {config.n_layers} blocks of dim {config.dim}, hidden {config.hidden_dim}; one block dense in "
              f"fp32 {gib(block)}; LoRA rank 8 on every projection, {args.steps} steps of 1 x {args.seq} tokens")
        print(f"{'device':<7} {'blocks':<24} {'peak RSS':>12} {'s/step':>8}  losses")
        for device in args.devices:
            runs = {}
            for name, dense_bytes in (("dense", 1 << 50), ("one projection at a time", 0)):
                result = run_child(store, root, device, dense_bytes, args.steps, args.seq)
                if "error" in result:
                    fail(f"{device} {name}", result["error"])
                    continue
                runs[name] = result
                walls = " / ".join(f"{w:.1f}" for w in result["wall_s"])
                print(f"{device:<7} {name:<24} {mib(result['peak_rss']):>12} {walls:>8}  "
                      + " ".join(f"{loss:.6f}" for loss in result["losses"]))
            if len(runs) == 2:
                dense, lazy = runs["dense"], runs["one projection at a time"]
                saving = (dense["peak_rss"] - lazy["peak_rss"]) / block
                check(f"{device}: the target saving <= the peak RSS saved, in dense blocks ({mib(dense['peak_rss'])}"
                      f" -> {mib(lazy['peak_rss'])})", args.saving_target, saving)
                if dense["losses"] != lazy["losses"]:
                    fail(f"{device}: losses", f"dense {dense['losses']} != lazy {lazy['losses']}")
                else:
                    print(f"PASS {device}: the same losses bit for bit")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
