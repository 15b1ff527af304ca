"""Kill one of 2 gloo ranks with ``kill -9`` at seeded moments of their commits across ranks; every relaunch
must bring both ranks back to one step, and the end must be bit-identical to an uninterrupted 2-rank run.

    python bench/distributed_crash.py [--kills 10] [--seed 0] [--workdir DIR] [--keep] [--quick] [--program train]

``--program train``: the engine's distributed training step (``distributed/trainable.py``, qat, a 4-block demo
BitNet, 2 sequences per rank and step): kills also land inside the owners' block updates (``update``), and
the final stores must equal an uninterrupted training run's. ``finetune.py`` itself under torchrun:
``bench/distributed_finetune_crash.py``.

``--program commit`` (default), store level: each rank, started by
``torchrun --standalone --nproc_per_node 2``, opens its own store (``make_rank_store`` of a demo model),
recovers (``RankCommit.recover``) and commits steps of deterministic updates that depend on the previous
contents (every unit's weights on every rank, the moments of the units it owns, ``distributed/sharding.py``)
with the two-phase commit of ``distributed/commit.py``. When one rank dies, torchrun stops the other
(SIGTERM), as in a real run.

1. Reference: an uninterrupted run of K steps. Calibration: the same with fault points counting, for how
   many passes each point makes per step on each rank.
2. The crash run: fresh stores, relaunched after each of N kills (``OFFLOAD_BITNET_FAULTS``-style plans on
   one rank, drawn by a seeded RNG within the next steps of the work left). The first three are placed:
   inside a block's write (``write.data``), between the ranks' manifest switches (``commit.rename`` at a
   switch), inside the commit (``commit.cleanup``); the rest are drawn over every store point. After each
   crash the ranks' (step, kept previous step) are printed: the two steps never differ by more than one.
3. ``torchrun --max-restarts 1``: a kill between the switches on the first attempt only; torchrun restarts
   both ranks itself and the run must finish.
4. Both final stores must equal the reference: every tensor of every part, the manifest's files, step and
   extra, no file a crash left behind.

Prints every kill with its moment and the states it left, and ``bit-identical: yes``; exits non-zero
otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))  # the rank program the tests run too

import torch  # noqa: E402

from _common import banner, check, fail, finish, scratch_dir  # noqa: E402
from offload_bitnet.store.blockstore import MANIFEST, UNITS_DIR, BlockStore  # noqa: E402

POINTS = ("write.data", "write.rename", "commit.rename", "commit.cleanup", "read")
TRAIN_POINTS = POINTS + ("update",)  # the owners' unit updates (on their writer threads)
PROGRAM = ["commit"]  # which rank program the ranks run (--program)
WINDOW_STEPS = 2     # a kill lands within the next steps of the work left
RUN_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------- on each rank
def rank_main(args) -> int:
    from offload_bitnet.io import faults
    from rank_runs import commit_program
    from train_runs import train_program

    rank = int(os.environ["RANK"])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    plan = args.fault if rank == args.fault_rank and (first_attempt or not args.first_attempt_only) else ""
    faults.configure(plan or args.count_plan)
    torch.set_num_threads(1)
    try:
        if args.program == "train":
            outcome = train_program(store_dirs=args.stores.split(","), mode="qat", steps=args.steps, batch_size=4,
                                    grad_accum=1)
            outcome.pop("measured")
        else:
            outcome = commit_program(store_dirs=args.stores.split(","), steps=args.steps)
        result = dict(outcome, rank=rank, counts=faults.pass_counts())
    except Exception as error:
        result = {"rank": rank, "error": str(error)}
    # a file per rank, not stdout: the ranks' lines interleave there. A restarted attempt overwrites it.
    with open(os.path.join(args.results, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    return 1 if "error" in result else 0


# ------------------------------------------------------------------------------------------- orchestration
def torchrun(stores: list[str], steps: int, fault_rank: int = -1, fault: str = "", count: bool = False,
             max_restarts: int = 0, first_attempt_only: bool = False) -> tuple[int, list[dict], str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", str(max_restarts), os.path.abspath(__file__), "--rank-program",
               "--stores", ",".join(stores), "--steps", str(steps), "--fault-rank", str(fault_rank),
               "--fault", fault, "--program", PROGRAM[0]]
    if count:
        command += ["--count-plan", "read:999999999:raise"]  # never fires; turns pass counting on
    if first_attempt_only:
        command.append("--first-attempt-only")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OFFLOAD_BITNET_FAULTS", None)
    results_dir = os.path.join(os.path.dirname(stores[0]), "results")  # beside the rank stores
    shutil.rmtree(results_dir, ignore_errors=True)
    os.makedirs(results_dir)
    command += ["--results", results_dir]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    results = []  # each rank's result of the last attempt (torchrun --max-restarts runs several)
    for rank in range(2):
        path = os.path.join(results_dir, f"rank{rank}.json")
        if os.path.exists(path):
            results.append(json.load(open(path)))
    return done.returncode, results, done.stdout + done.stderr


def state(path: str) -> tuple[int, int | None]:
    manifest = json.load(open(os.path.join(path, MANIFEST)))
    return manifest["step"], manifest.get("previous", {}).get("step")


def leftovers(path: str) -> list[str]:
    manifest = json.load(open(os.path.join(path, MANIFEST)))
    keep = {entry["file"] for parts in manifest["files"].values() for entry in parts.values()}
    return [name for name in os.listdir(os.path.join(path, UNITS_DIR)) if name not in keep]


def differences(path: str, reference: str) -> list[str]:
    """What differs between two stores: manifest step, files, extra, and every tensor of every part."""
    a, b = BlockStore(path), BlockStore(reference)
    problems = [f"{key} differs" for key in ("step", "files", "extra", "config", "settings")
                if a.manifest.get(key) != b.manifest.get(key)]
    if "previous" in a.manifest:
        problems.append("still keeps a previous step")
    if problems:
        return problems
    for unit, parts in b.manifest["files"].items():
        for part in parts:
            mine, theirs = a.read(unit, part), b.read(unit, part)
            problems += [f"{unit} {part} {name}" for name in theirs if not torch.equal(mine[name], theirs[name])]
    return problems + [f"left behind: {name}" for name in leftovers(path)]


def new_stores(folder: str, name: str) -> list[str]:
    """Both ranks' stores (``make_rank_store``) of one demo model, in ``folder/name``."""
    from rank_runs import rank_stores
    from train_runs import make_model, make_rank_stores

    if PROGRAM[0] == "train":
        run = os.path.join(folder, name)
        return make_rank_stores(make_model(run, "qat", n_layers=4), run, 2)
    return rank_stores(os.path.join(folder, name), n_layers=4)


def main(args) -> int:
    what = "training steps" if args.program == "train" else "two-phase commits"
    banner(f"distributed crash: kill -9 one of 2 gloo ranks during {what}", args.quick)
    points = TRAIN_POINTS if args.program == "train" else POINTS
    kills = 3 if args.quick else args.kills
    steps = WINDOW_STEPS * kills + 2
    rng = random.Random(args.seed)
    with scratch_dir(args.workdir, args.keep) as folder:
        started = time.perf_counter()
        reference = new_stores(folder, "reference")
        code, results, output = torchrun(reference, steps)
        if code != 0 or [r.get("step") for r in results] != [steps, steps]:
            fail("reference run", output[-3000:])
            return finish()
        calibration = new_stores(folder, "calibration")
        code, results, output = torchrun(calibration, steps, count=True)
        if code != 0 or any(differences(p, r) for p, r in zip(calibration, reference)):
            fail("calibration run", output[-3000:])
            return finish()
        per_step = [{point: r["counts"].get(point, 0) / steps for point in points} for r in results]
        print(f"reference and calibration: {steps} steps on 2 ranks in {time.perf_counter() - started:.1f} s; "
              "passes per step, rank 0: " + ", ".join(f"{p} {n:.0f}" for p, n in per_step[0].items()))

        crash = new_stores(folder, "crash")
        print(f"\n{'kill':>4}  {'rank':>4}  {'fault':<26} {'exit':>5}  states after (step, kept)  {'s':>5}")
        between = landed = 0
        for index in range(kills):
            done_step = min(state(path)[0] for path in crash)
            if done_step >= steps:
                break
            rank = rng.randrange(2)
            left = min(WINDOW_STEPS, steps - done_step)
            placed = {0: "write.data", 1: "commit.rename", 2: "commit.cleanup", 3: "update"}
            if args.program != "train":
                placed.pop(3)
            point = placed.get(index) or rng.choice(points)
            if per_step[rank][point] == 0:  # a point this rank never passes (no owned unit to update)
                rank = 1 - rank
            if point == "commit.rename" and index == 1:
                # 2 passes per step (switch, release): the switches are the odd ones
                count = 2 * rng.randrange(left) + 1
            else:
                count = rng.randint(1, max(1, round(per_step[rank][point] * left)))
            fault = f"{point}:{count}:kill"
            began = time.perf_counter()
            code, results, output = torchrun(crash, steps, fault_rank=rank, fault=fault)
            states = [state(path) for path in crash]
            if code == 0:
                print(f"{index + 1:>4}  {rank:>4}  {fault:<26} {code:>5}  (did not fire: the run finished)")
                break
            landed += 1
            between += states[0][0] != states[1][0]
            if abs(states[0][0] - states[1][0]) > 1:
                fail("ranks within one step", f"after kill {index + 1}: {states}")
            print(f"{index + 1:>4}  {rank:>4}  {fault:<26} {code:>5}  {str(states):<26} "
                  f"{time.perf_counter() - began:5.1f}")
        code, results, output = torchrun(crash, steps)
        if code != 0:
            fail("final relaunch", output[-3000:])
            return finish()
        print(f"final relaunch resumed both ranks at step {results[0]['start']} and finished at "
              f"{results[0]['step']}")

        restarted = new_stores(folder, "restarts")
        code, results, output = torchrun(restarted, steps, fault_rank=1, fault="commit.rename:3:kill",
                                          max_restarts=1, first_attempt_only=True)
        resumed = [r.get("start") for r in results]
        print(f"torchrun --max-restarts 1, rank 1 killed between the switches of step 2 on the first attempt: "
              f"exit {code}, the restarted ranks resumed at steps {resumed}")
        if code != 0 or resumed != [1, 1]:
            fail("torchrun --max-restarts", output[-3000:])

        problems = [f"rank {rank} ({name}): {p}" for name, stores in (("crash", crash), ("restarts", restarted))
                    for rank, (path, ref) in enumerate(zip(stores, reference)) for p in differences(path, ref)]
        print(f"\nkills landed: {landed}, of which between the ranks' manifest switches: {between}")
        print(f"bit-identical: {'yes' if not problems else 'no'}")
        for problem in problems[:20]:
            print("  " + problem)
        if problems:
            fail("bit-identical", f"{len(problems)} differences")
        check("kills that landed short of the requested", kills - landed, 0)
        check("kills between the switches missing (need at least 1)", 1 - min(between, 1), 0)
        print(f"total {time.perf_counter() - started:.1f} s")
    return finish()


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 kills (a smoke test)")
    parser.add_argument("--program", default="commit", choices=["commit", "train"],
                        help="what the ranks run: store-level commits, or the engine's distributed training step")
    # on each rank, under torchrun
    parser.add_argument("--rank-program", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stores", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fault-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--fault", default="", help=argparse.SUPPRESS)
    parser.add_argument("--count-plan", default="", help=argparse.SUPPRESS)
    parser.add_argument("--first-attempt-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    PROGRAM[0] = arguments.program
    sys.exit(rank_main(arguments) if arguments.rank_program else main(arguments))
