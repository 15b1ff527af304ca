"""Peak memory of streamed training does not grow with depth, and training runs under a cap below the store size.

Part 1: models of one width at several depths (default 4, 16, 64 blocks of a dim-1024 BitNet in ``qat``) each
train ``--steps`` optimizer steps in a fresh process; the child reports its own peak RSS (``getrusage``
``ru_maxrss``, which covers the whole life of the process, from ``import torch`` on). Target: the deepest
model's peak RSS <= 1.25 x the shallowest's.

The width is chosen so that one block's training state (fp32 masters, two fp32 moments, gradients: ~16 bytes
per parameter, ~200 MiB per dim-1024 block) is large beside the fixed interpreter + torch baseline (~300 MiB),
and the vocabulary is small so that the embedding and head (fixed in depth) do not hide a per-block leak.
The 64-block model would need about 13 GiB to train in memory.

Part 2: the deepest store (after part 1 it holds weights, shadow and moments: ~8 GiB) trains one more step in
a process whose address space is capped below the store's size. The cap is ``RLIMIT_AS`` (as ``prlimit
--as``), set by the child on itself before importing torch. Why ``RLIMIT_AS``: there is no cgroup we may use
here (the cgroup v1 hierarchy belongs to the sandbox's runner and systemd-run has no bus), and ``RLIMIT_RSS``
is not enforced by Linux. ``RLIMIT_AS`` is stricter than an RSS cap: it counts every mapping, including the
~640 MiB of address space torch reserves at import (shared libraries, thread stacks, malloc arenas), so a
process that finishes under it never had more than the cap resident either. A control run loads the same
model fully in memory (``InMemoryModel``) under the same cap and must fail with MemoryError, which shows the
cap bites.

``--device mlx``: the same with the block math in Apple MLX (engine.backend.MLXBackend), whose lazy graphs are
evaluated before each tensor goes back to the engine, so its peak must stay as flat in depth.

Usage: ``python bench/memory_vs_depth.py [--quick] [--dim 1024] [--depths 4 16 64] [--cap-gib 3] [--device mlx]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

CHILD_TAG = "CHILD_RESULT "


# ---------------------------------------------------------------------------------------------- child side
def proc_status() -> dict[str, int]:
    """VmPeak/VmHWM/VmRSS/VmSize of this process in bytes (Linux)."""
    values = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmPeak", "VmSize", "VmHWM", "VmRSS"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def is_memory_error(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation: Python's MemoryError, torch's allocator RuntimeError, or a
    thread that could not get its stack."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return any(words in text for words in ("can't allocate", "cannot allocate", "out of memory",
                                           "can't start new thread"))


def child_main(args) -> int:
    """Train (or, for the control, load in memory) the store at ``args.store``; print one JSON result line."""
    if args.as_limit:
        # Before importing torch, so the cap covers everything the process ever maps.
        resource.setrlimit(resource.RLIMIT_AS, (args.as_limit, args.as_limit))
    result = {"as_limit": args.as_limit}
    try:
        import torch

        torch.set_num_threads(1)
        from offload_bitnet.api import open_for_training
        from offload_bitnet.reference.inmemory import InMemoryModel
        from offload_bitnet.store.blockstore import BlockStore

        result["rss_after_import"] = proc_status().get("VmRSS", 0)
        if args.child == "inmemory":
            store = BlockStore(args.store)
            model = InMemoryModel.from_store(store)
            result["loaded_params"] = sum(p.numel() for p in model.parameters())
        else:
            engine = open_for_training(args.store, device=args.device)
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, engine.config.vocab_size, (1, args.seq), generator=generator)
            steps = []
            for _ in range(args.steps):
                stats = engine.train_step([(ids, None)])
                engine.flush()
                steps.append({"step": stats.step, "loss": stats.loss, "wall_s": stats.wall_s,
                              "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written})
            engine.close()
            result["steps"] = steps
        result["ok"] = True
    except Exception as error:  # noqa: BLE001 - reported to the parent, which decides what it means
        message = (str(error).splitlines() or [""])[0][:300]
        result.update(ok=False, error=f"{type(error).__name__}: {message}", memory_error=is_memory_error(error))
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update({key.lower(): value for key, value in proc_status().items()})
    print(CHILD_TAG + json.dumps(result), flush=True)
    return 0 if result["ok"] else 3


# ---------------------------------------------------------------------------------------------- parent side
def run_child(store: str, kind: str, steps: int, seq: int, as_limit: int | None, device: str = "cpu") -> dict:
    """Run this script as a fresh child process and return its JSON result."""
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--store", store,
               "--steps", str(steps), "--seq", str(seq), "--device", device]
    if as_limit:
        command += ["--as-limit", str(as_limit)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if not lines:
        # Under a tight cap the interpreter itself may die before reporting; keep its stderr for the reader.
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return {"ok": False, "error": f"exit {done.returncode}: {tail}", "elapsed_s": elapsed,
                "returncode": done.returncode}
    result = json.loads(lines[-1][len(CHILD_TAG):])
    result["elapsed_s"] = elapsed
    result["returncode"] = done.returncode
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per depth")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mode", choices=("qat", "full"), default="qat")
    parser.add_argument("--ratio-target", type=float, default=1.25)
    parser.add_argument("--cap-gib", type=float, default=3.0,
                        help="address-space cap (RLIMIT_AS) for the capped run; must be below the store size")
    parser.add_argument("--no-cap-run", action="store_true")
    parser.add_argument("--device", choices=("cpu", "mlx"), default="cpu",
                        help="compute backend of the training steps (mlx: Apple MLX)")
    parser.add_argument("--workdir", default=None, help="where to put the stores (default: system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--child", choices=("train", "inmemory"), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--as-limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    # Imported here, not at the top: _common imports torch, and a child must set its cap before that.
    import _common as c
    from offload_bitnet.store.sizing import folder_bytes

    c.pin_threads()
    if args.quick:
        args.dim, args.heads, args.vocab, args.depths, args.seq, args.steps = 64, 4, 256, [1, 4], 16, 2
        args.cap_gib = 1.5
    arch = "bitnet" if args.mode == "qat" else "llama"
    c.banner("memory vs depth", args.quick)
    depths = sorted(set(args.depths))
    with c.scratch_dir(args.workdir, args.keep) as work:
        print(f"stores in {work} ({c.filesystem_of(work)}); device {args.device}; {arch} {args.mode}, dim {args.dim}, heads {args.heads}, "
              f"vocab {args.vocab} (untied), seq {args.seq}, batch 1, {args.steps} optimizer steps per depth, "
              "each depth in a fresh process")
        print(f"{'blocks':>6} {'params':>8} {'in-memory need':>15} {'store after':>12} {'rss after import':>17} "
              f"{'peak RSS':>12} {'peak VM':>12} {'s/step':>7}  loss")
        peaks = {}
        deepest_store = None
        for depth in depths:
            config = c.bench_config(arch, args.dim, depth, args.heads, args.vocab)
            store = os.path.join(work, f"depth{depth}")
            c.make_store(store, config, args.mode)
            result = run_child(store, "train", args.steps, args.seq, None, args.device)
            if not result["ok"]:
                c.fail(f"training {depth} blocks", result["error"])
                continue
            # What plain in-memory AdamW training would hold: fp32 param + grad + two moments.
            need = config.param_count() * 16
            steps = result["steps"]
            losses = " ".join(f"{s['loss']:.3f}" for s in steps)
            print(f"{depth:>6} {config.param_count() / 1e6:>7.1f}M {c.gib(need):>15} {c.gib(folder_bytes(store)):>12} "
                  f"{c.mib(result['rss_after_import']):>17} {c.mib(result['peak_rss']):>12} "
                  f"{c.mib(result.get('vmpeak', 0)):>12} {steps[-1]['wall_s']:>7.2f}  {losses}")
            peaks[depth] = result["peak_rss"]
            if depth == depths[-1]:
                deepest_store = store
            else:
                shutil.rmtree(store, ignore_errors=True)  # keep disk use to one store at a time
        if len(peaks) == len(depths) and len(depths) >= 2:
            low, high = depths[0], depths[-1]
            c.check(f"peak RSS {high} blocks / {low} blocks", peaks[high] / peaks[low], args.ratio_target,
                    f"({c.mib(peaks[high])} / {c.mib(peaks[low])})")

        if not args.no_cap_run and deepest_store is not None:
            cap_run(c, deepest_store, int(args.cap_gib * 2**30), args.seq, quick=args.quick, device=args.device)
    return c.finish()


def cap_run(c, store: str, cap: int, seq: int, quick: bool, device: str = "cpu"):
    """Train one step of ``store`` under an address-space cap below its size; control: in-memory load fails."""
    from offload_bitnet.store.sizing import folder_bytes

    size = folder_bytes(store)
    print(f"capped run: store {c.gib(size)} on disk ({size:,} bytes), address-space cap (RLIMIT_AS) "
          f"{c.gib(cap)} ({cap:,} bytes)")
    if size <= cap and not quick:
        c.fail("store larger than the cap", f"the store ({c.gib(size)}) fits under the cap ({c.gib(cap)}); "
               "lower --cap-gib or use more/wider blocks")
    result = run_child(store, "train", 1, seq, cap, device)
    if result["ok"]:
        step = result["steps"][-1]
        print(f"PASS one optimizer step under the cap: step {step['step']} in {step['wall_s']:.1f}s, loss "
              f"{step['loss']:.3f}, peak RSS {c.mib(result['peak_rss'])}, "
              f"peak address space {c.mib(result.get('vmpeak', 0))}")
    else:
        c.fail("one optimizer step under the cap", result["error"])
    if quick:
        print("(quick mode: the tiny store is smaller than the cap; control run skipped)")
        return
    control = run_child(store, "inmemory", 0, seq, cap)
    if control["ok"]:
        c.fail("control: in-memory load under the cap", "the whole model loaded under the cap, so the cap does "
               "not constrain this model; lower --cap-gib")
    elif control.get("memory_error"):
        print(f"PASS control: loading the same model in memory under the cap runs out of memory "
              f"({control['error']})")
    else:
        c.fail("control: in-memory load under the cap", f"failed, but not for lack of memory: {control['error']}")


if __name__ == "__main__":
    sys.exit(main())
