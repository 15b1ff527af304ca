"""``finetune.py`` under ``torchrun --standalone --nproc_per_node 2``, one rank killed with SIGKILL at seeded moments
and the same command relaunched after each kill: the final export must be bit-identical to an uninterrupted
2-rank run's.

    python bench/distributed_finetune_crash.py [--kills 10] [--seed 0] [--steps 60] [--workdir DIR] [--keep]

The run: the demo BitNet (qat, created by the run), 4 sequences of 32 bytes per step, dropout 0.1, an hf export
at the end. Each kill is an ``OFFLOAD_BITNET_FAULTS`` plan on one rank (``OFFLOAD_BITNET_FAULTS_RANK``): the N-th
pass of the relaunched process through a fault point. The first three are placed: inside a unit file's write
(``write.data``), between the ranks' manifest switches (``commit.rename``), after a switch before the previous
files are released (``commit.cleanup``); the rest are drawn by a seeded RNG over every point (an owner's block
update on its writer thread, a read, a write, a rename, the commit), on either rank. When one rank dies,
torchrun stops the other, as in a real run. After each crash the ranks' (step, kept previous step) are printed:
they never differ by more than one step, and the relaunch brings both to the common one.

Prints every kill and the state it left, and ``bit-identical: yes``; exits non-zero otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))  # free_port, shared with the tests

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from _common import banner, fail, finish, scratch_dir  # noqa: E402
from offload_bitnet.store.blockstore import BlockStore  # noqa: E402
from rank_runs import free_port  # noqa: E402

FINETUNE = os.path.join(ROOT, "finetune.py")
POINTS = ("write.data", "write.rename", "commit.rename", "commit.cleanup", "update", "read")
PLACED = (("write.data", 5), ("commit.rename", 3), ("commit.cleanup", 2))
RUN_TIMEOUT_S = 300


def run_finetune(args: list[str], ranks: int, cwd: str, faults: str | None = None, fault_rank: int | None = None):
    """``finetune.py args`` alone (``ranks`` 0) or under ``torchrun --standalone`` with ``ranks`` processes, one
    thread each (torchrun's default for its workers; the one-process runs compared get the same), with a fault
    plan on rank ``fault_rank``. Returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("OFFLOAD_BITNET_FAULTS", None)
    if faults:
        env["OFFLOAD_BITNET_FAULTS"], env["OFFLOAD_BITNET_FAULTS_RANK"] = faults, str(fault_rank)
    command = [sys.executable, FINETUNE, *args]
    if ranks:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                        "--master_port", str(free_port())]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def run_args(folder: str, steps: int) -> list[str]:
    return ["--runs-dir", os.path.join(folder, "runs"), "--experiment", "crash", "--num-train-iters", str(steps),
            "--max-seq-len", "32", "--batch-size", "4", "--no-plot", "--val-fraction", "0.1", "--dropout", "0.1",
            "--export-path", os.path.join(folder, "export"), "--export-format", "hf"]


def rank_states(folder: str) -> list[tuple[int, int | None]]:
    """Each rank's (committed step, kept previous step) in the run folder."""
    states = []
    for rank in range(2):
        path = os.path.join(folder, "runs", "crash", f"store.rank{rank}")
        if not os.path.exists(os.path.join(path, "manifest.json")):
            states.append((-1, None))
            continue
        store = BlockStore(path)
        states.append((store.step, store.previous_step))
        store.close()
    return states


def main(args) -> int:
    banner("finetune.py on 2 torchrun ranks, one rank killed at seeded moments", False)
    rng = random.Random(args.seed)
    with scratch_dir(args.workdir, args.keep) as work:
        reference, crashed = os.path.join(work, "reference"), os.path.join(work, "crashed")
        os.makedirs(reference), os.makedirs(crashed)
        result = run_finetune(run_args(reference, args.steps), 2, reference)
        if result.returncode != 0:
            print(result.stdout[-3000:] + result.stderr[-3000:])
            fail("reference", "the uninterrupted run failed")
            return finish()
        print(f"reference: {args.steps} steps on 2 ranks, exported")
        kills = 0
        plans = list(PLACED) + [(rng.choice(POINTS), rng.randint(1, 8)) for _ in range(max(args.kills - 3, 0))]
        for number, (point, count) in enumerate(plans[:args.kills], 1):
            rank = rng.randint(0, 1)
            result = run_finetune(run_args(crashed, args.steps), 2, crashed, f"{point}:{count}:kill", rank)
            states = rank_states(crashed)
            steps = [step for step, _ in states]
            if result.returncode == 0:
                print(f"kill {number}: {point}:{count} on rank {rank} never came: the run finished")
                break
            kills += 1
            spread = max(steps) - min(steps)
            print(f"kill {number}: {point} pass {count} on rank {rank}: ranks at (step, kept) {states}")
            if spread > 1:
                fail("crash states", f"the ranks' stores are {spread} steps apart after kill {number}")
        result = run_finetune(run_args(crashed, args.steps), 2, crashed)
        if result.returncode != 0:
            print(result.stdout[-3000:] + "\n".join(line for line in result.stderr.splitlines()
                                                     if line.startswith("error")))
            fail("relaunch", "the relaunch after the last kill failed")
            return finish()
        print(f"relaunched after {kills} kill(s): finished at {rank_states(crashed)}")
        expected = load_file(os.path.join(reference, "export", "model.safetensors"))
        got = load_file(os.path.join(crashed, "export", "model.safetensors"))
        different = sorted(name for name in expected if name not in got or not torch.equal(expected[name], got[name]))
        identical = not different and expected.keys() == got.keys()
        records = [json.loads(line) for line in open(os.path.join(crashed, "runs", "crash", "metrics.jsonl"))]
        print(f"train records: {sum(r['type'] == 'train' for r in records)} (a step committed by every rank whose record its rank 0 died before writing has none)")
        print(f"bit-identical: {'yes' if identical else 'no'} ({len(expected)} tensors)")
        if not identical:
            fail("bit-identical", f"{len(different)} tensors differ, first {different[:3]}")
        if kills < args.kills:
            fail("kills", f"only {kills} of {args.kills} kills landed before the run finished (use more --steps)")
    return finish()


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse()))
