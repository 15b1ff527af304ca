"""Kill a fine-tune again and again; the resumed run must end bit-identical to one that was never interrupted.

    python bench/crash_test.py [--kills 20] [--steps K] [--seed 0] [--workdir DIR] [--keep]

1. Reference: ``python finetune.py`` (a small demo BitNet model it creates, K steps, short sequences, dropout,
   two micro-batches, activations spilled to disk) runs uninterrupted.
2. Calibration: the same run once more with the fault points counting (a plan that never fires) and every
   commit recording how many passes each point had made, so kill moments can be drawn inside the work still
   left. Its final store must equal the reference too.
3. The crash run: the same command in a fresh run folder, interrupted N times with ``kill -9`` at moments drawn
   by a seeded RNG: (a) fault-point kills (``OFFLOAD_BITNET_FAULTS=point:N:kill``, every point: block
   write-back ``write.data``/``write.rename``, manifest commit ``commit.rename``/``commit.cleanup``,
   ``prefetch``, ``update``, ``read``) and (b) SIGKILL after a random wall-clock delay (with a backstop: the
   run kills itself at the commit after the window, should the kill from outside come late on a busy
   machine). Three more interruptions are mixed in: a graceful SIGTERM and a graceful SIGINT, which the run
   sends itself right after a seeded commit (``commit.cleanup:N:sigterm``: never after its last step, however
   slow the machine), and an exception inside a block update (``update:N:raise``). After each one the same
   command is run again.
4. The final store must be bit-identical to the reference: every tensor of every part (weights, shadow,
   optimizer moments) read through ``BlockStore.read`` with its checksum, the step counter, the config and
   settings, and the trainer state in the manifest's extra (its run folder aside). Files a crash left in the
   store (uncommitted unit files, ``*.tmp``, spilled activations) must be gone after the next open, and never
   pile up from one crash to the next.

Prints N, K, every interruption with its moment, and ``bit-identical: yes``; exits non-zero otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from offload_bitnet.io.faults import ENV, POINTS  # noqa: E402
from offload_bitnet.store.blockstore import MANIFEST, UNITS_DIR, BlockStore  # noqa: E402

FINETUNE = os.path.join(ROOT, "finetune.py")
EXPERIMENT = "crash"
# Points whose kills the run must always cover first: block write-back, manifest commit and prefetch.
FIRST_POINTS = ("write.data", "commit.rename", "prefetch")
# Passed once per manifest commit, after the switch: where graceful signals are sent and backstops kill.
COMMIT_POINT = "commit.cleanup"
WINDOW_STEPS = 3          # a kill lands within the next few steps of the work left, so kills never run out
RUN_TIMEOUT_S = 900

# Runs finetune.py as ``python finetune.py`` would, recording after every commit how many passes each fault
# point has made in this process (the plan in OFFLOAD_BITNET_FAULTS never fires; it only turns counting on).
CALIBRATION_SHIM = r"""
import json, os, runpy, sys, time
began = time.monotonic()
from offload_bitnet.io import faults
from offload_bitnet.store import blockstore as store
marks, original = [], store.BlockStore.commit
def commit(self, step, extra=None):
    original(self, step, extra)
    marks.append({"step": step, "t": time.monotonic() - began, "counts": faults.pass_counts()})
    with open(os.environ["CRASH_TEST_MARKS"], "w") as handle:
        json.dump(marks, handle)
store.BlockStore.commit = commit
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def finetune_args(runs_dir: str, steps: int) -> list[str]:
    """The fine-tune every run makes: small, deterministic, and exercising dropout replay, micro-batches and
    activation spilling (so a crash can leave ``scratch/`` behind)."""
    return ["--runs-dir", runs_dir, "--experiment", EXPERIMENT, "--num-train-iters", str(steps),
            "--max-seq-len", "32", "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1",
            "--val-fraction", "0", "--memory-budget", "48KiB", "--no-plot", "--log-every", "1000"]


def run_dir(runs_dir: str) -> str:
    return os.path.join(runs_dir, EXPERIMENT)


def store_dir(runs_dir: str) -> str:
    return os.path.join(run_dir(runs_dir), "store")


def environment(faults: str = "", **extra) -> dict:
    env = dict(os.environ, **extra)
    env.pop(ENV, None)
    if faults:
        env[ENV] = faults
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launch(runs_dir: str, steps: int, faults: str = "", shim: bool = False, **extra_env) -> subprocess.Popen:
    prefix = [sys.executable, "-c", CALIBRATION_SHIM] if shim else [sys.executable]
    return subprocess.Popen(prefix + [FINETUNE, *finetune_args(runs_dir, steps)], cwd=ROOT,
                            env=environment(faults, **extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


# ---------------------------------------------------------------------------------------------- store state
def store_step(path: str) -> int | None:
    """The committed step of the store at ``path`` (None: no store yet; -1: creation unfinished)."""
    try:
        with open(os.path.join(path, MANIFEST)) as handle:
            return json.load(handle)["step"]
    except (OSError, ValueError, KeyError):
        return None


def shown(step: int | None) -> str:
    """A store step for the table: ``-`` when there is no store yet."""
    return "-" if step is None else str(step)


def leftovers(path: str) -> list[str]:
    """Files of a store that its committed manifest does not reference: what a crash left behind."""
    try:
        with open(os.path.join(path, MANIFEST)) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return []
    keep = {entry["file"] for parts in manifest["files"].values() for entry in parts.values()}
    found = []
    units = os.path.join(path, UNITS_DIR)
    if os.path.isdir(units):
        found += [f"{UNITS_DIR}/{name}" for name in os.listdir(units) if name not in keep]
    found += [name for name in os.listdir(path) if name.endswith(".tmp")]
    if os.path.isdir(os.path.join(path, "scratch")):
        found += [f"scratch/{name}" for name in os.listdir(os.path.join(path, "scratch"))] or ["scratch/"]
    return sorted(found)


def run_folder_temps(runs_dir: str) -> list[str]:
    """Temporary files a crash left in the run folder itself (beside the store)."""
    folder = run_dir(runs_dir)
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp")) if os.path.isdir(folder) else []


def snapshot(path: str, runs_dir: str) -> dict:
    """Everything a finished store holds: raw bytes of every tensor of every part, step, config, settings,
    and the extra with the trainer state's run folder made relative (the two runs live in different folders)."""
    store = BlockStore(path)
    tensors = {}
    for unit, parts in sorted(store.manifest["files"].items()):
        for part in sorted(parts):
            for name, tensor in store.read(unit, part).items():
                tensors[(unit, part, name)] = (str(tensor.dtype), tuple(tensor.shape),
                                               tensor.contiguous().view(torch.uint8).clone())
    extra = json.loads(json.dumps(store.extra))
    state = extra.get("train_state", {})
    if "run_dir" in state:
        state["run_dir"] = os.path.relpath(state["run_dir"], os.path.abspath(runs_dir))
    return {"step": store.step, "config": store.manifest["config"], "settings": store.manifest["settings"],
            "extra": extra, "tensors": tensors, "files": sum(len(p) for p in store.manifest["files"].values())}


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two snapshots (empty: bit-identical)."""
    problems = [f"{key} differs: {a[key]!r} vs {b[key]!r}" for key in ("step", "config", "settings")
                if a[key] != b[key]]
    if a["extra"] != b["extra"]:
        keys = sorted(k for k in set(a["extra"].get("train_state", {})) | set(b["extra"].get("train_state", {}))
                      if a["extra"].get("train_state", {}).get(k) != b["extra"].get("train_state", {}).get(k))
        problems.append(f"manifest extra differs (trainer state keys: {keys or 'none'})")
    if a["tensors"].keys() != b["tensors"].keys():
        problems.append(f"tensor sets differ: {sorted(set(a['tensors']) ^ set(b['tensors']))[:4]}")
    for key in sorted(set(a["tensors"]) & set(b["tensors"])):
        (dtype_a, shape_a, raw_a), (dtype_b, shape_b, raw_b) = a["tensors"][key], b["tensors"][key]
        if dtype_a != dtype_b or shape_a != shape_b or not torch.equal(raw_a, raw_b):
            problems.append(f"tensor {'/'.join(key)} differs")
    return problems


def train_losses(runs_dir: str) -> dict[int, float]:
    losses = {}
    path = os.path.join(run_dir(runs_dir), "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            if record.get("type") == "train":
                losses[record["step"]] = record["loss"]
    return losses


# ---------------------------------------------------------------------------------------------- kill moments
class Calibration:
    """Fault-point passes at every commit of an uninterrupted run, and its timing (seconds from launch to
    each step's status report in the reference run)."""

    def __init__(self, marks: list[dict], step_times: dict[int, float]):
        self.marks = {mark["step"]: mark for mark in marks}
        self.final = max(self.marks)
        first, last = min(step_times), max(step_times)
        self.step_seconds = (step_times[last] - step_times[first]) / max(last - first, 1)
        self.reference_startup = max(step_times[first] - first * self.step_seconds, 0.5)
        self.observed: list[float] = []

    @property
    def startup_seconds(self) -> float:
        """Seconds from launch to the first step: the median over the resumed runs seen so far (the reference
        also created its store, so it starts slower)."""
        return statistics.median(self.observed) if self.observed else self.reference_startup

    def observe(self, first_report_seconds: float):
        """A resumed run reported its first step this many seconds after launch."""
        self.observed.append(max(first_report_seconds - self.step_seconds, 0.5))

    def passes(self, point: str, step: int) -> int:
        """Passes through ``point`` from the start of a fresh run up to the commit of ``step``."""
        return self.marks[step]["counts"].get(point, 0)

    def steps_ahead(self, committed: int | None) -> int:
        """How far past ``committed`` a kill may land: ``WINDOW_STEPS``, but short of the last step, so that
        the run cannot finish before the kill (a kill after the last commit is still possible)."""
        left = self.final - max(committed or 0, 0)
        return max(1, min(WINDOW_STEPS, left - 1))

    def window(self, point: str, committed: int | None) -> int:
        """How many passes through ``point`` a run resuming at ``committed`` surely makes before the commit
        of step ``committed + steps_ahead``. (A fresh run, ``committed`` None or -1, also creates the store.)"""
        start = committed if committed is not None and committed >= 0 else None
        until = min((start or 0) + self.steps_ahead(committed), self.final)
        before = self.passes(point, start) if start is not None else 0
        return max(1, self.passes(point, until) - before)

    def landing(self, point: str, count: int, committed: int | None) -> str:
        """Where pass ``count`` of a run resuming at ``committed`` falls, by the calibration: ``~step N`` or
        ``~creation`` (approximate: a commit runs behind, while the next step's loads have begun)."""
        start = committed if committed is not None and committed >= 0 else None
        before = self.passes(point, start) if start is not None else 0
        for step in sorted(s for s in self.marks if start is None or s > start):
            if self.passes(point, step) - before >= count:
                return "~creation" if step == 0 else f"~step {step}"
        return f"~step {self.final}"

    def commits_range(self, committed: int | None) -> tuple[int, int]:
        """Passes through ``COMMIT_POINT`` a run resuming at ``committed`` makes after its first training
        commit and up to the commit of step ``committed + steps_ahead`` (a fresh run's store creation commits
        come first: a signal then would find no handler yet)."""
        fresh = committed is None or committed < 0
        low = 1 + (self.marks[0]["counts"].get(COMMIT_POINT, 0) if fresh and 0 in self.marks else 0)
        return low, max(low, self.window(COMMIT_POINT, committed))

    def backstop(self, committed: int | None) -> int | None:
        """The pass through ``COMMIT_POINT`` of the commit of step ``committed + steps_ahead + 1`` (None past
        the last step): a wall-clock kill that has not landed by then is late."""
        start = committed if committed is not None and committed >= 0 else None
        step = (start or 0) + self.steps_ahead(committed) + 1
        if step > self.final:
            return None
        return self.passes(COMMIT_POINT, step) - (self.passes(COMMIT_POINT, start) if start is not None else 0)

    def wall_delay_range(self, committed: int | None) -> tuple[float, float]:
        """Delays from launch that kill during late start-up or the next steps (short of the last one)."""
        return (0.6 * self.startup_seconds,
                self.startup_seconds + self.steps_ahead(committed) * self.step_seconds)

    def per_step(self) -> dict[str, float]:
        first, last = self.marks[min(1, self.final)], self.marks[self.final]
        return {p: (last["counts"].get(p, 0) - first["counts"].get(p, 0)) / max(self.final - 1, 1) for p in POINTS}


def plan_interruptions(kills: int, rng: random.Random) -> list[str]:
    """The order of interruption kinds: ``fault`` and ``wall`` kills alternating (a fault kill first), with
    ``sigterm``, ``sigint`` and ``raise`` at random places."""
    plan = ["fault" if index % 2 == 0 else "wall" for index in range(kills)]
    for extra in ("sigterm", "sigint", "raise"):
        plan.insert(rng.randint(1, len(plan)), extra)
    return plan


def fault_points(count: int, rng: random.Random) -> list[str]:
    """Points for ``count`` fault kills: write-back, commit and prefetch first, then every point in turn."""
    first = list(FIRST_POINTS)
    rng.shuffle(first)
    rest = [p for p in POINTS if p not in FIRST_POINTS]
    rng.shuffle(rest)
    order = first + rest
    return [order[index % len(order)] for index in range(count)]


def reported_step(runs_dir: str, launched_ns: int) -> int:
    """The last step the process launched at ``launched_ns`` reported in status.json (0: none yet)."""
    status = os.path.join(run_dir(runs_dir), "status.json")
    try:
        if os.stat(status).st_mtime_ns < launched_ns:
            return 0  # written by an earlier run
        with open(status) as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return 0
    return state.get("step", 0) if state.get("phase") == "training" else 0


def watched_run(runs_dir: str, steps: int) -> tuple[int, str, str, dict[int, float]]:
    """An uninterrupted run, noting when (seconds from launch) it reports each step."""
    launched_ns, started = time.time_ns(), time.monotonic()
    process = launch(runs_dir, steps)
    times = {}
    while process.poll() is None:
        step = reported_step(runs_dir, launched_ns)
        if step and step not in times:
            times[step] = time.monotonic() - started
        time.sleep(0.02)
    rc, out, err = finish(process)
    return rc, out, err, times


def supervised(runs_dir: str, steps: int, calibration: "Calibration", faults: str) -> tuple[int, str, str]:
    """Run with a fault plan to its end, noting when it first reports a step (for the start-up estimate)."""
    launched_ns, started = time.time_ns(), time.monotonic()
    process = launch(runs_dir, steps, faults=faults)
    seen = False
    while process.poll() is None:
        if not seen and reported_step(runs_dir, launched_ns):
            seen = True
            calibration.observe(time.monotonic() - started)
        time.sleep(0.02)
    return finish(process)


def trained_steps(runs_dir: str) -> int:
    """Steps of this run committed to its store (from the trainer state in the manifest)."""
    try:
        with open(os.path.join(store_dir(runs_dir), MANIFEST)) as handle:
            return json.load(handle).get("extra", {}).get("train_state", {}).get("step", 0)
    except (OSError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------------- the test
def crash_run(runs_dir: str, steps: int, kills: int, rng: random.Random, calibration: Calibration,
              say) -> tuple[list[dict], list[str]]:
    """Interrupt the fine-tune as planned, resuming each time; then run it to the end. Returns one record per
    interruption and a list of problems."""
    store = store_dir(runs_dir)
    plan = plan_interruptions(kills, rng)
    points = iter(fault_points(kills - kills // 2, rng))
    events, problems = [], []
    say(f"{'#':>3}  {'interruption':<62} {'exit':>5}  {'store step':>12}  leftovers")
    for index, kind in enumerate(plan, 1):
        before = store_step(store)
        done = trained_steps(runs_dir)
        if done >= steps:
            problems.append(f"the run finished after {index - 1} interruptions, before {kind!r}; use more --steps")
            break
        if kind == "fault":
            point = next(points)
            count = rng.randint(1, calibration.window(point, before))
            moment = (f"kill -9 at fault point {point}, pass {count} "
                      f"({calibration.landing(point, count, before)})")
            rc, out, err = supervised(runs_dir, steps, calibration, faults=f"{point}:{count}:kill")
            expected = (-signal.SIGKILL,)
        elif kind == "wall":
            delay = rng.uniform(*calibration.wall_delay_range(before))
            # On a busy machine a run may get further in ``delay`` than calibrated: it is killed at once when
            # it reports the last step of the window, so the kill still lands before the run can finish.
            limit = max(before or 0, 0) + calibration.steps_ahead(before)
            # Should even that come too late (this process not scheduled for a whole step), the run kills itself
            # at the next commit, so that the kill still lands.
            backstop = calibration.backstop(before)
            launched_ns, started = time.time_ns(), time.monotonic()
            process = launch(runs_dir, steps, faults=f"{COMMIT_POINT}:{backstop}:kill" if backstop else "")
            capped, first_report, sent = False, None, False
            while process.poll() is None:
                elapsed = time.monotonic() - started
                reported = reported_step(runs_dir, launched_ns)
                if reported and first_report is None:
                    first_report = elapsed
                    calibration.observe(elapsed)
                capped = reported >= limit
                if elapsed >= delay or capped:
                    sent = process.poll() is None  # not already ended by the backstop
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
            rc, out, err = finish(process)
            moment = f"kill -9 after {time.monotonic() - started:.2f}s (wall clock" + \
                ((f", reached step {limit})" if capped else ")") if sent else ", late: the backstop at the next commit)")
            expected = (-signal.SIGKILL,)
        elif kind in ("sigterm", "sigint"):
            number = signal.SIGTERM if kind == "sigterm" else signal.SIGINT
            count = rng.randint(*calibration.commits_range(before))
            moment = (f"graceful {number.name} right after commit {count} "
                      f"({calibration.landing(COMMIT_POINT, count, before)})")
            rc, out, err = supervised(runs_dir, steps, calibration, faults=f"{COMMIT_POINT}:{count}:{kind}")
            expected = (128 + number,)
            if rc in expected and "stopped at step" not in out:
                problems.append(f"{kind}: no 'stopped at step' line in the output")
        else:
            count = rng.randint(1, calibration.window("update", before))
            moment = (f"exception in a block update, update:{count}:raise "
                      f"({calibration.landing('update', count, before)})")
            rc, out, err = supervised(runs_dir, steps, calibration, faults=f"update:{count}:raise")
            expected = (1,)
            errors = [line for line in err.strip().splitlines() if not line.startswith("warning:")]  # byte tokenizer
            if rc == 1 and (errors != ["error: injected fault at update"] or "Traceback" in err):
                problems.append(f"raise: expected one error line on stderr, got {err.strip()[-300:]!r}")
        after = store_step(store)
        left = leftovers(store) if os.path.isdir(store) else []
        if kind in ("sigterm", "sigint") and left:
            problems.append(f"{kind}: a graceful stop left {left[:3]} in the store")
        shown_rc = f"{rc}" + ("" if rc in expected else "!")
        say(f"{index:>3}  {moment:<62} {shown_rc:>5}  {shown(before):>5} -> {shown(after):<4}  {len(left)} file(s)")
        events.append({"kind": kind, "moment": moment, "rc": rc, "before": before, "after": after,
                       "leftovers": len(left)})
        if rc not in expected:
            problems.append(f"interruption {index} ({moment}) exited {rc}, expected {expected[0]}; "
                            f"stderr: {err.strip()[-400:]}")
        if after is not None and before is not None and after < before:
            problems.append(f"interruption {index}: the store went back from step {before} to {after}")
        if after is not None and after >= 0:
            bad = BlockStore(store).verify_all()
            if bad:
                problems.append(f"interruption {index}: the committed store fails verification: {bad[0]}")
    # Run to the end: a kill may have landed after the last commit, so one clean run always follows.
    resumes = 0
    while True:
        resumes += 1
        rc, out, err = finish(launch(runs_dir, steps))
        if rc != 0:
            problems.append(f"the final resume exited {rc}: {err.strip()[-400:]}")
            break
        if trained_steps(runs_dir) >= steps or resumes >= 3:
            break
    return events, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to survive (default 20)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the fine-tune "
                        "(default: 2 x kills + 10, enough room for every kill to land inside the run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--workdir", default=None, help="parent folder of the scratch folder (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    steps = args.steps or 2 * args.kills + 10
    if steps < 4:
        parser.error("--steps must be at least 4")
    rng = random.Random(args.seed)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="offload-crash-", dir=args.workdir)
    began = time.monotonic()

    def say(line=""):
        print(line, flush=True)

    try:
        say("== crash test: kill -9 a fine-tune again and again, resume it, compare with an uninterrupted run ==")
        say(f"N (kills) = {args.kills}, K (steps) = {steps}, seed = {args.seed}; python {sys.version.split()[0]}, "
            f"torch {torch.__version__}, cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
        say("command: python finetune.py " + " ".join(finetune_args("RUNS", steps)))

        reference_runs = os.path.join(scratch, "reference")
        started = time.monotonic()
        rc, out, err, step_times = watched_run(reference_runs, steps)
        if rc != 0 or not step_times:
            say(f"the uninterrupted run failed (exit {rc}):\n{err[-3000:]}")
            say("bit-identical: no")
            return 1
        reference = snapshot(store_dir(reference_runs), reference_runs)
        say(f"reference: uninterrupted, {reference['step']} steps in {time.monotonic() - started:.1f}s; "
            f"{len(reference['tensors'])} tensors in {reference['files']} files")

        calibration_runs = os.path.join(scratch, "calibration")
        marks_path = os.path.join(scratch, "marks.json")
        rc, out, err = finish(launch(calibration_runs, steps, faults="commit.cleanup:999999999:raise", shim=True,
                                     CRASH_TEST_MARKS=marks_path))
        problems = []
        if rc != 0:
            say(f"the calibration run failed (exit {rc}):\n{err[-3000:]}")
            return 1
        calibration = Calibration(json.load(open(marks_path)), step_times)
        problems += [f"calibration run: {p}" for p in differences(reference,
                                                                   snapshot(store_dir(calibration_runs),
                                                                            calibration_runs))]
        per_step = calibration.per_step()
        say(f"calibration: start-up ~{calibration.startup_seconds:.1f}s, ~{calibration.step_seconds:.2f}s a step "
            "(reference run); fault-point passes a step: " + ", ".join(f"{p} {per_step[p]:.0f}" for p in POINTS))

        crash_runs = os.path.join(scratch, "crashed")
        events, crash_problems = crash_run(crash_runs, steps, args.kills, rng, calibration, say)
        problems += crash_problems
        kills = [e for e in events if e["kind"] in ("fault", "wall") and e["rc"] == -signal.SIGKILL]
        by_point = sorted({e["moment"].split("fault point ")[1].split(",")[0] for e in kills if e["kind"] == "fault"})
        say(f"kills landed: {len(kills)}/{args.kills} ({sum(e['kind'] == 'fault' for e in kills)} at fault points: "
            f"{', '.join(by_point)}; {sum(e['kind'] == 'wall' for e in kills)} by wall clock)")
        if len(kills) < args.kills:
            problems.append(f"only {len(kills)} of {args.kills} kills landed")
        graceful = {e["kind"]: e["rc"] for e in events if e["kind"] in ("sigterm", "sigint", "raise")}
        say("graceful stops and exception: " + ", ".join(f"{k} exit {v}" for k, v in graceful.items()))

        store = store_dir(crash_runs)
        final_left = leftovers(store)
        most = max((e["leftovers"] for e in events), default=0)
        bound = 2 * reference["files"] + 4  # one step's new files + the replaced ones + temporaries
        say(f"leftovers: at most {most} file(s) found right after an interruption (bound {bound}: one step's "
            f"files, never accumulating); {len(final_left)} after the final run")
        if final_left:
            problems.append(f"leftovers after the final run: {final_left[:5]}")
        if most > bound:
            problems.append(f"{most} leftover files after one interruption: they accumulate")
        temps = run_folder_temps(crash_runs)
        if temps:
            say(f"note: {len(temps)} temporary file(s) left in the run folder (not the store): {temps[:3]}")

        crashed = snapshot(store, crash_runs)
        diff = differences(reference, crashed)
        problems += diff
        ref_losses, crash_losses = train_losses(reference_runs), train_losses(crash_runs)
        same = [s for s in crash_losses if s in ref_losses and crash_losses[s] == ref_losses[s]]
        say(f"metrics.jsonl: {len(crash_losses)}/{steps} step records after the crashes, "
            f"{len(same)} with the reference's exact loss")
        if len(same) != len(crash_losses):
            problems.append("a step's loss in metrics.jsonl differs from the reference")
        say(f"final store: step {crashed['step']}, {len(crashed['tensors'])} tensors in {crashed['files']} files "
            "(weights, shadow, optimizer moments), trainer state "
            + ("equal" if crashed["extra"] == reference["extra"] else "DIFFERENT"))
        for problem in problems:
            say(f"problem: {problem}")
        say(f"bit-identical: {'no' if diff else 'yes'}")
        say(f"total {time.monotonic() - began:.0f}s")
        ok = not problems
        say("RESULT: PASS" if ok else "RESULT: FAIL")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept scratch folder {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
