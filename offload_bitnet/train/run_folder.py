"""The run folder ``RUNS_DIR/EXPERIMENT/``: where a run keeps its files (``RunPaths``), the record of what it
was made from (run.json), its lock (one run per folder), ``--restart`` and the cleanup of a refused run.

    store/          the model being trained (created or imported here; a MODEL that is a store trains in place)
    adapter/        --mode lora: the adapters (PEFT format) and their optimizer state; the store stays frozen
    merged/         --mode lora --merge: the adapters folded into a new 16-bit store
    run.json        what the run was made from (checked when re-running the same experiment)
    run.lock        who runs it (one run per folder; run.rank<R>.lock: rank R of a data-parallel run)
    store.rank<R>/  torchrun: rank R's store (every unit's forward weights, its share of the masters and moments)
    metrics.jsonl   one record per step and per evaluation   status.json  the latest state   loss.png
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

from offload_bitnet.formats import default_store_dir, detect_format
from offload_bitnet.io.files import write_file_atomic
from offload_bitnet.io.locks import HolderLock, LockHeld
from offload_bitnet.store.blockstore import store_is_complete
from offload_bitnet.store.sizing import folder_bytes, human
from offload_bitnet.train.messages import TrainError, say
from offload_bitnet.train.run_commands import RunCommand
from offload_bitnet.train.runconfig import RunConfig


@dataclasses.dataclass
class RunPaths:
    """Where a run keeps its files."""

    run_dir: str
    store_dir: str
    origin: str            # "demo" (created here), "import" (imported here), "store" (trained in place) or
                           # "cache" (a LoRA base: the shared cached import, only read)
    rank: int = 0          # this process's rank in a data-parallel run (torchrun); 0 alone

    @property
    def metrics(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    @property
    def status(self) -> str:
        return os.path.join(self.run_dir, "status.json")

    @property
    def plot(self) -> str:
        return os.path.join(self.run_dir, "loss.png")

    @property
    def run_json(self) -> str:
        return os.path.join(self.run_dir, "run.json")

    @property
    def adapter_dir(self) -> str:
        return os.path.join(self.run_dir, "adapter")

    @property
    def merged_dir(self) -> str:
        return os.path.join(self.run_dir, "merged")

    @property
    def lock(self) -> str:
        """Each process of a run holds its own lock (rank 0's is the one-process run's)."""
        return os.path.join(self.run_dir, "run.lock" if self.rank == 0 else f"run.rank{self.rank}.lock")

    @property
    def scratch_dir(self) -> str:
        """Where a LoRA run spills activations (one folder per rank)."""
        return os.path.join(self.run_dir, "scratch" if self.rank == 0 else f"scratch.rank{self.rank}")

    def rank_stores(self) -> list[str]:
        """The stores of a data-parallel run in this folder (``store.rank<R>``: what it trains), if any."""
        return sorted(glob.glob(os.path.join(self.run_dir, "store.rank*")))


def resolve_paths(config: RunConfig) -> RunPaths:
    """The run folder and the store a run trains."""
    run_dir = os.path.abspath(config.run_dir)
    if config.is_demo:
        return RunPaths(run_dir, os.path.join(run_dir, "store"), "demo")
    if detect_format(config.model) == "store":  # raises a clear ValueError for anything unreadable
        return RunPaths(run_dir, os.path.abspath(config.model), "store")
    if config.is_lora:  # LoRA only reads its base: share the cached import instead of a copy per run
        return RunPaths(run_dir, default_store_dir(config.model), "cache")
    return RunPaths(run_dir, os.path.join(run_dir, "store"), "import")


def source_label(config: RunConfig) -> str:
    return f"new {config.size} BitNet model (seed {config.seed})" if config.is_demo else os.path.abspath(config.model)


def run_outputs(paths: RunPaths) -> list[str]:
    """What ``clear_run`` removes, as it exists now: the run's records, its adapters and merge, and a store made
    in the run folder (never one trained in place)."""
    files = [p for p in (paths.metrics, paths.status, paths.plot, paths.run_json) if os.path.exists(p)]
    folders = [p for p in (paths.adapter_dir, paths.merged_dir) if os.path.isdir(p)] + paths.rank_stores()
    if paths.origin in ("demo", "import") and os.path.isdir(paths.store_dir):
        folders.append(paths.store_dir)
    elif paths.origin == "cache" and os.path.isdir(os.path.join(paths.run_dir, "store")):
        folders.append(os.path.join(paths.run_dir, "store"))  # a LoRA base copy made before runs shared the cache
    return files + folders


def clear_run(paths: RunPaths):
    """Remove what a previous run left in the run folder (and a store made there, never one trained in place)."""
    for path in run_outputs(paths):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def restart_run(config: RunConfig, paths: RunPaths, command: RunCommand):
    """--restart: delete the run this command names, after saying what goes. A run folder holding a run of
    another model is deleted only when the command names it with --experiment (a model that merely shares
    its folder name with another must not replace that one's run)."""
    recorded = read_json(paths.run_json)
    if recorded and recorded.get("source") != source_label(config) and config.source_of("experiment") == "default":
        raise TrainError(f"--restart: the run folder {paths.run_dir} holds a run of {recorded.get('source')}, not of "
                         f"{source_label(config)}; nothing was deleted. To replace that run, name it: "
                         f"{command.restart_named(config.experiment_name)}; to keep it, "
                         "choose another name with --experiment NAME.")
    doomed = run_outputs(paths)
    status = read_json(paths.status) or {}
    if not doomed:
        say(f"--restart: {paths.run_dir} holds no previous run; starting it")
        return
    what = f"a run of {recorded.get('source')}" if recorded else "a run"
    if status.get("step") is not None:
        what += f" at step {status['step']}/{status.get('total_steps', '?')} ({status.get('phase', '?')})"
    say(f"--restart: deleting the run {paths.run_dir} ({what}): " + ", ".join(
        f"{os.path.relpath(p, paths.run_dir)}{'/' if os.path.isdir(p) else ''} ({human(folder_bytes(p))})"
        for p in doomed))
    if paths.origin == "store" and not config.is_lora:
        say(f"--restart: training already written into {paths.store_dir} cannot be undone; "
            "a new run starts from its current weights")
    clear_run(paths)


def training_kind(config: RunConfig) -> str:
    """What a run changes: ``lora`` (adapters beside a frozen store) or ``weights`` (the store itself)."""
    return "lora" if config.is_lora else "weights"


class RunLock:
    """An exclusive lock on a run folder, held by every run: it keeps two runs from writing the same records,
    adapters (a LoRA run opens its store read-only, without the store's lock) or store being created."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.lock = HolderLock(path)
        except LockHeld as held:
            raise TrainError(f"the run in {os.path.dirname(path)} is in use by {held.holder}; wait for it to finish "
                             "or stop it before starting it again") from None

    def release(self):
        self.lock.release()


class RefusalCleanup:
    """Removes what a run that failed before committing a step created in its run folder (run.json, run.lock,
    records, adapters, spill files, an unfinished store; the folder itself when it was new and is then empty),
    so that a refused run writes nothing. A finished store created or imported here is kept: hours of import
    must not be lost to a refusal, and re-running the command uses it."""

    def __init__(self, paths: RunPaths):
        self.paths = paths
        self.new_folder = not os.path.exists(paths.run_dir)
        candidates = (paths.run_json, paths.lock, paths.metrics, paths.status, paths.plot, paths.adapter_dir,
                      paths.scratch_dir)
        self.new_paths = [p for p in candidates if not os.path.exists(p)]
        self.new_store = paths.origin != "store" and not os.path.exists(paths.store_dir)
        self.armed = True

    def disarm(self):
        """The run has committed a step (or ended cleanly): whatever it wrote is part of it now."""
        self.armed = False

    def undo(self):
        if not self.armed:
            return
        doomed = list(self.new_paths)
        if self.new_store and not store_is_complete(self.paths.store_dir):
            doomed.append(self.paths.store_dir)
        elif self.new_store and self.paths.run_json in doomed:
            doomed.remove(self.paths.run_json)  # it records what the kept store was made from
        for path in doomed:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        if self.new_folder and os.path.isdir(self.paths.run_dir) and not os.listdir(self.paths.run_dir):
            os.rmdir(self.paths.run_dir)


def check_run_folder(config: RunConfig, paths: RunPaths, command: RunCommand) -> dict | None:
    """Refuse a run folder that holds another run (of another model, or the other kind of training); returns
    the folder's run record (None: a new run)."""
    recorded = read_json(paths.run_json)
    replace = command.restart_named(config.experiment_name)
    if recorded and recorded.get("source") != source_label(config):
        raise TrainError(f"the run folder {paths.run_dir} belongs to a run of {recorded.get('source')}, not "
                         f"{source_label(config)}. Choose another name with --experiment NAME, or replace that run "
                         f"(it is deleted): {replace}")
    if recorded and recorded.get("training", "weights") != training_kind(config):
        was = "a LoRA run (--mode lora)" if recorded.get("training") == "lora" else "a run that trains the weights"
        raise TrainError(f"the run folder {paths.run_dir} holds {was}; this command asks for "
                         f"{'LoRA' if config.is_lora else 'training the weights'}. Choose another name with "
                         f"--experiment NAME, or replace that run (it is deleted): {replace}")
    return recorded


def read_json(path: str) -> dict | None:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_json(path: str, value: dict):
    write_file_atomic(path, (json.dumps(value, indent=1) + "\n").encode())


def remove_leftover_temporaries(run_dir: str):
    """Delete ``*.tmp`` files a killed run left in its folder (half-written run.json, status, metrics)."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.endswith(".tmp"):
                os.remove(os.path.join(run_dir, name))
