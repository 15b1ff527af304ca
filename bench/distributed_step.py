"""The distributed step (``offload_bitnet/distributed/trainable.py``) on 1 process and on 2 gloo ranks of one
machine: tokens/s, where each rank's time goes, each rank's bytes on disk and written per step.

    python bench/distributed_step.py [--mode qat|full|lora] [--layers 8] [--steps 4] [--batch 8] [--seq 64]
                                     [--repeats 3] [--workdir DIR] [--keep]

The same optimizer steps both ways (``--batch`` sequences per step: 1 process x ``--grad-accum 2``, 2 ranks x
1 micro-batch each), on a demo-width model of ``--layers`` blocks; one compute thread per process. Each rank's
main thread is split into the step's compute and its collectives (the gradients' reduce to each unit's owner,
the new forward weights' broadcast, the embedding's token gradients gathered on its owner, the wait for the
writes and the two-phase commit). On this 2-core CPU two ranks share the cores with each other's writer and
prefetch threads, so they are not expected to be faster than one: the figures say where the time goes.

Disk: each rank's store (``store.rank<R>``) holds every unit's forward weights and the master weights and
AdamW moments of the units it owns; the bench prints the bytes of each rank's folder and of its owned parts
against the single store's (target: at most 1/N + 5% of the single store's masters and moments, the
contiguous split balances by bytes; on a tiny model with few units the embedding alone can exceed that: the
figure is printed as it is, the target is checked at 7B/13B in tests/distributed/test_sharding.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))  # the rank program the tests run too

from _common import banner, fail, finish, mib, pin_threads, scratch_dir  # noqa: E402
from offload_bitnet.distributed.sharding import OWNED_PARTS  # noqa: E402
from offload_bitnet.store.blockstore import BlockStore  # noqa: E402


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def owned_part_bytes(path: str) -> int:
    """Bytes of the committed shadow and moment files in a store."""
    store = BlockStore(path)
    try:
        return sum(entry["bytes"] for parts in store.manifest["files"].values()
                   for part, entry in parts.items() if part in OWNED_PARTS)
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="qat", choices=["qat", "full", "lora"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; medians are reported")
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    pin_threads()
    banner(f"distributed step: {args.mode}, {args.layers} blocks, {args.batch} x {args.seq} tokens per step", False)
    from rank_runs import launch
    from train_runs import make_model, make_rank_stores, train, train_program

    rates = {1: [], 2: []}
    collectives, per_rank = [], None
    with scratch_dir(args.workdir, args.keep) as work:
        for repeat in range(args.repeats):
            folder = os.path.join(work, f"single{repeat}")
            model = make_model(folder, args.mode, n_layers=args.layers)
            measured = {}
            train(model, args.mode, args.steps, args.batch, 2, adapter_dir=os.path.join(folder, "a")
                  if args.mode == "lora" else None, measured=measured, seq_len=args.seq)
            # the first step reads cold files and makes the moments: steady state from the second
            rates[1].append(sum(measured["tokens"][1:]) / sum(measured["wall_s"][1:]))
            single_written = statistics.median(measured["bytes_written"][1:])
            single_disk, single_owned = folder_bytes(model), owned_part_bytes(model)

            folder = os.path.join(work, f"two{repeat}")
            stores = make_rank_stores(make_model(folder, args.mode, n_layers=args.layers), folder, 2)
            adapters = [os.path.join(folder, f"a{r}") for r in range(2)] if args.mode == "lora" else None
            results = launch(train_program, 2, os.path.join(folder, "results"), timeout_s=1200, store_dirs=stores,
                             mode=args.mode, steps=args.steps, batch_size=args.batch, grad_accum=1,
                             adapter_dirs=adapters, seq_len=args.seq)
            if any(r["exitcode"] != 0 for r in results):
                fail("2-rank run", "; ".join(str(r.get("error")) for r in results))
                return finish()
            walls = [max(a, b) for a, b in zip(results[0]["measured"]["wall_s"], results[1]["measured"]["wall_s"])]
            rates[2].append(sum(results[0]["measured"]["tokens"][1:]) / sum(walls[1:]))
            collectives.append([r["measured"] for r in results])
            per_rank = [(folder_bytes(p), owned_part_bytes(p),
                         statistics.median(r["measured"]["bytes_written"][1:])) for p, r in zip(stores, results)]
        print(f"tokens/s (median of {args.repeats}, steps 2..{args.steps}): 1 process {statistics.median(rates[1]):.0f}, "
              f"2 ranks {statistics.median(rates[2]):.0f} (ratio {statistics.median(rates[2]) / statistics.median(rates[1]):.2f})")
        print(f"single store: {mib(single_disk)} on disk, masters+moments {mib(single_owned)}, "
              f"writes {mib(single_written)} per step")
        for rank, (disk, owned, written) in enumerate(per_rank):
            share = 100 * owned / max(single_owned, 1)
            print(f"rank {rank}: {mib(disk)} on disk, masters+moments {mib(owned)} ({share:.1f}% of the single "
                  f"store's), writes {mib(written)} per step")
        last = collectives[-1]
        for rank, measured in enumerate(last):
            wall = sum(measured["wall_s"])
            parts = measured["collective_s"]
            spent = sum(parts.values())
            listing = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in sorted(parts.items()))
            print(f"rank {rank} (last run): {wall:.2f} s in {args.steps} steps: compute and local I/O "
                  f"{wall - spent:.2f} s, {listing}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
