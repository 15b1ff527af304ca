"""The fine-tuning loop behind ``finetune.py``: prepare a store, load data, step the streaming engine,
evaluate, report, stop cleanly and resume exactly.

Run folder ``RUNS_DIR/EXPERIMENT/``::

    store/          the model being trained (created or imported here; a MODEL that is a store trains in place)
    adapter/        --mode lora: the adapters (PEFT format) and their optimizer state; the store stays frozen
    merged/         --mode lora --merge: the adapters folded into a new 16-bit store
    run.json        what the run was made from (checked when re-running the same experiment)
    run.lock        who runs it (one run per folder)
    metrics.jsonl   one record per step and per evaluation   status.json  the latest state   loss.png

Every command the run prints (``run_commands.RunCommand``) repeats its arguments, so it acts on this run only;
``--restart`` says what it deletes first. A run that fails before committing a step removes what it created
(``RefusalCleanup``), keeping only a finished store it made. A loss far above its start is flagged while the
run goes on (``metrics.DivergenceWatch``) and in the summary.

Resuming: each optimizer step commits, atomically with the weights (LoRA: with the adapters, in
``adapter/adapter_state.json``), a ``train_state``: the run it belongs to, the step, the data position
(examples consumed), the lr, weight decay and quantization mix used, the steps skipped, and the settings that
determine the result. Everything random is a function of (seed, step): batches come from seeded per-epoch
shuffles (``data.BatchOrder``) and dropout masks from (seed, step, micro-batch, layer), so re-running the same
command continues from the last committed step bit for bit.

A step whose loss or gradient is not finite is skipped by the engine (nothing is updated or committed); the
trainer records the skip (committing the advanced data position) and stops after ``max_skipped_steps`` in a row.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback

import torch

from offload_bitnet.train import data as datalib
from offload_bitnet.model.config import ConfigError
from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine
from offload_bitnet.errors import pipe_safe, quiet_broken_pipe
from offload_bitnet.formats.adapters import peft_base_model
from offload_bitnet.model.lora import AdapterCheckpoint, LoRAConfig
from offload_bitnet.train.metrics import DivergenceWatch, MetricsLog, PlotUnavailable, perplexity, plot_losses, summarize, write_status
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.progress import format_seconds
from offload_bitnet.train.run_commands import RunCommand, shown_path
from offload_bitnet.train.runconfig import RunConfig, RunConfigError, parse_args, resume_fingerprint
from offload_bitnet.train.schedule import make_schedule, quant_mix
from offload_bitnet.store.sizing import folder_bytes, human
from offload_bitnet.store.blockstore import BlockStore, StoreError, StoreSettings, no_master_weights
from offload_bitnet.tokenizers.runtime import ByteTokenizer

STATE_KEY = "train_state"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Settings a resumed run may change without changing what the finished run computes... except its length,
# which re-plans the schedule from the current step on (said so when it happens).
LENGTH_KEYS = ("num_epochs", "num_train_iters")


class TrainError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def say(message: str = ""):
    print(message, flush=True)


def mib(count: float) -> str:
    return f"{count / 2**20:.1f}MiB"


# ---------------------------------------------------------------------------------------------- run folder
@dataclasses.dataclass
class RunPaths:
    """Where a run keeps its files."""

    run_dir: str
    store_dir: str
    origin: str            # "demo" (created here), "import" (imported here), "store" (trained in place) or
                           # "cache" (a LoRA base: the shared cached import, only read)

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
        return os.path.join(self.run_dir, "run.lock")


def resolve_paths(config: RunConfig) -> RunPaths:
    """The run folder and the store a run trains."""
    run_dir = os.path.abspath(config.run_dir)
    if config.is_demo:
        return RunPaths(run_dir, os.path.join(run_dir, "store"), "demo")
    from offload_bitnet.formats import detect_format

    if detect_format(config.model) == "store":  # raises a clear ValueError for anything unreadable
        return RunPaths(run_dir, os.path.abspath(config.model), "store")
    if config.is_lora:  # LoRA only reads its base: share the cached import instead of a copy per run
        from offload_bitnet.formats import default_store_dir

        return RunPaths(run_dir, default_store_dir(config.model), "cache")
    return RunPaths(run_dir, os.path.join(run_dir, "store"), "import")


def store_is_complete(path: str) -> bool:
    """A store whose creation or import finished (its first commit made step 0)."""
    try:
        with open(os.path.join(path, "manifest.json")) as handle:
            return json.load(handle).get("step", -1) >= 0
    except (OSError, ValueError):
        return False


def source_label(config: RunConfig) -> str:
    return f"new {config.size} BitNet model (seed {config.seed})" if config.is_demo else os.path.abspath(config.model)


def run_outputs(paths: RunPaths) -> list[str]:
    """What ``clear_run`` removes, as it exists now: the run's records, its adapters and merge, and a store made
    in the run folder (never one trained in place)."""
    files = [p for p in (paths.metrics, paths.status, paths.plot, paths.run_json) if os.path.exists(p)]
    folders = [p for p in (paths.adapter_dir, paths.merged_dir) if os.path.isdir(p)]
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
        self.handle = open(path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise TrainError(f"the run in {os.path.dirname(path)} is in use by {holder}; wait for it to finish or "
                             "stop it before starting it again") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        self.handle.flush()

    def release(self):
        if self.handle is None:
            return
        self.handle.truncate(0)  # `offload-bitnet status` must not take a live process that ran it for its holder
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


class RefusalCleanup:
    """Removes what a run that failed before committing a step created in its run folder (run.json, run.lock,
    records, adapters, spill files, an unfinished store; the folder itself when it was new and is then empty),
    so that a refused run writes nothing. A finished store created or imported here is kept: hours of import
    must not be lost to a refusal, and re-running the command uses it."""

    def __init__(self, paths: RunPaths):
        self.paths = paths
        self.new_folder = not os.path.exists(paths.run_dir)
        candidates = (paths.run_json, paths.lock, paths.metrics, paths.status, paths.plot, paths.adapter_dir,
                      os.path.join(paths.run_dir, "scratch"))
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


def check_prompts(config: RunConfig, tokenizer, chat: bool, context: int):
    """Refuse a --prompt that does not fit the model's context (now, not after hours of training)."""
    for prompt in config.prompts:
        length = len(encode_prompt(tokenizer, prompt, chat))
        if length >= context:
            raise TrainError(f"the prompt {prompt[:40]!r}... has {length} tokens; the model's context is "
                             f"{context}. Shorten it.")


def prepare_store(config: RunConfig, paths: RunPaths, command: RunCommand) -> None:
    """Create (demo) or import the store into the run folder unless a finished one is already there."""
    os.makedirs(paths.run_dir, exist_ok=True)
    if config.restart:
        restart_run(config, paths, command)
    recorded = check_run_folder(config, paths, command)
    if paths.origin == "cache":
        from offload_bitnet.formats import ensure_store

        paths.store_dir = ensure_store(config.model, progress=True)  # imports, or says it uses the cache
    elif paths.origin != "store" and not store_is_complete(paths.store_dir):
        if os.path.exists(paths.store_dir):
            say(f"removing the unfinished store {paths.store_dir} (its creation or import was interrupted)")
            shutil.rmtree(paths.store_dir)
        if paths.origin == "demo":
            say(f"creating a {config.size} BitNet model in {paths.store_dir} (random init, seed {config.seed}); "
                f"re-running the same command resumes this run, {command.restart} starts it over")
            from offload_bitnet.store.write import create_model

            create_model(paths.store_dir, size=config.size, arch="bitnet", mode=config.store_mode,
                         state_dtype=config.state_dtype or "fp32", seed=config.seed)
        else:
            from offload_bitnet.formats import hf, import_model

            if not config.is_lora and hf.is_packed_checkpoint(config.model):  # refused before a long import
                raise TrainError(no_master_weights(f"{config.model} is a packed BitNet checkpoint"))
            say(f"importing {config.model} into {paths.store_dir} (the original is left untouched)")
            import_model(config.model, paths.store_dir, import_settings(config), progress=True)
        if config.tokenizer:  # the run's own copy carries the tokenizer it is trained with (test_gen, exports)
            from offload_bitnet.tokenizers.loaders import install_tokenizer

            install_tokenizer(paths.store_dir, config.tokenizer)
    if not recorded or config.restart:
        write_json(paths.run_json, {"source": source_label(config), "store": paths.store_dir,
                                    "training": training_kind(config),
                                    "created": datetime.datetime.now().isoformat(timespec="seconds")})


def import_settings(config: RunConfig) -> StoreSettings | None:
    """Store settings for an import: the importer's defaults unless --mode (qat/full), --quant-warmup or
    --state-dtype asks otherwise."""
    if config.store_mode is None and config.state_dtype is None:
        return None
    mode = config.store_mode or guess_mode(config.model)
    return StoreSettings(mode=mode, state_dtype=config.state_dtype or "fp32")


def guess_mode(model_path: str) -> str:
    """qat for a BitNet Hugging Face folder, full otherwise (the importers' own default)."""
    config_path = os.path.join(model_path, "config.json")
    text = open(config_path).read().lower() if os.path.isfile(config_path) else ""
    return "qat" if "bitnet" in text else "full"


def read_json(path: str) -> dict | None:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_json(path: str, value: dict):
    from offload_bitnet.io.files import write_file_atomic

    write_file_atomic(path, (json.dumps(value, indent=1) + "\n").encode())


def check_store_settings(config: RunConfig, store: BlockStore):
    """Mode and optimizer-state dtype are fixed when a store is made; refuse a request to change them, and
    training the weights of a store that has none to train (packed-only)."""
    if not config.is_lora:
        store.require_master_weights()
    if config.quant_warmup > 0 and store.settings.mode != "qat":
        raise TrainError(f"{config.describe('quant_warmup')} needs a qat store (full-precision shadow weights "
                         f"with a ternary copy), but {store.path} is a {store.settings.mode} store. Import the "
                         "model with --mode qat: python finetune.py MODEL --mode qat --quant-warmup N ... (under a "
                         "new --experiment NAME, or with --restart), or offload-bitnet import MODEL OUT --mode qat.")
    wanted_mode = None if config.is_lora else config.store_mode
    for name, wanted, actual in (("mode", wanted_mode, store.settings.mode),
                                 ("state_dtype", None if config.is_lora else config.state_dtype,
                                  store.settings.state_dtype)):
        if wanted is not None and wanted != actual:
            raise TrainError(f"{config.describe(name)} differs from the store's {name} {actual!r} "
                             f"({store.path}); it is fixed when a store is created or imported. Drop the option, "
                             "or train a fresh import under a new --experiment NAME.")


def default_lr(config: RunConfig, store: BlockStore) -> float:
    if config.lr is not None:
        return config.lr
    if config.is_lora:
        return 2e-4
    return 1e-4 if store.settings.mode == "qat" else 2e-5


# ---------------------------------------------------------------------------------------------- stopping
class Stopper:
    """Turns SIGINT/SIGTERM and the time limits into a request to stop at the next step boundary."""

    def __init__(self, config: RunConfig, clock=time.time):
        self.requested: str | None = None
        self.signal_number: int | None = None
        self.deadline = None
        self._clock = clock  # seconds since the epoch; tests pass a fixed one
        now = clock()
        if config.max_hours is not None:
            self.deadline = now + config.max_hours * 3600
        if config.until is not None:
            hour, minute = map(int, config.until.split(":"))
            target = datetime.datetime.fromtimestamp(now).replace(hour=hour, minute=minute, second=0, microsecond=0)
            if target.timestamp() <= now:
                target += datetime.timedelta(days=1)
            self.deadline = min(self.deadline or math.inf, target.timestamp())
        self._previous = {}

    def install(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)

    def restore(self):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame):
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now; the store stays at its last committed step
        self.signal_number = number
        self.requested = signal.Signals(number).name
        print(f"\n{self.requested} received: finishing the current step, then stopping "
              "(Ctrl-C again to abort at once; the store keeps its last committed step)", flush=True)

    def reason(self, next_step_seconds: float) -> str | None:
        """Why to stop before the next step, or None."""
        if self.requested:
            return self.requested
        if self.deadline is not None and self._clock() + next_step_seconds > self.deadline:
            return "time limit"
        return None


# ---------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """One fine-tuning run over an open engine."""

    def __init__(self, config: RunConfig, engine: StreamingEngine, paths: RunPaths, command: RunCommand):
        self.config = config
        self.engine = engine
        self.store = engine.store
        self.paths = paths
        self.command = command
        self.watch = DivergenceWatch()  # rebuilt from the kept records when the run starts
        self.diverging: set[str] = set()
        self.steps_run = 0  # steps this process committed (trained or skipped)
        self.lora = engine.adapters is not None
        # Quantization warmup: each step says which mix of full-precision and ternary weights it trains.
        self.warmup = config.quant_warmup if self.store.settings.mode == "qat" and not self.lora else 0
        self.metrics = MetricsLog(paths.metrics)
        from offload_bitnet.tokenizers.loaders import open_tokenizer

        self.tokenizer = open_tokenizer(self.store.path, self.store.extra.get("tokenizer"), config.tokenizer)
        self.pad_id = datalib.pad_value(self.tokenizer)
        self.dataset = load_data(config, self.tokenizer, self.store.config.vocab_size)
        self.lr = default_lr(config, self.store)
        self.total_steps = total_steps(config, self.dataset)
        self.schedule = make_schedule(config.schedule, self.lr, self.total_steps, config.warmup_fraction,
                                      config.eta_min, config.weight_decay, config.stage2_lr_fraction)
        self.order = datalib.BatchOrder(len(self.dataset.train), config.batch_size, config.seed)
        self.fingerprint = dict(resume_fingerprint(config), lr=self.lr,
                                data_sha256=files_digest(config.data + config.val_data))
        self.chat = "chat" in self.dataset.stats.kinds  # prompts become user turns, like the training data
        check_prompts(config, self.tokenizer, self.chat, self.store.config.max_seq_len)

    # ------------------------------------------------------------------ resume state
    # Where the committed step and its extra live: the store's manifest, or for LoRA the adapter checkpoint
    # (adapter/adapter_state.json), since the base store is never written.
    def committed_step(self) -> int:
        return self.engine.adapters.step if self.lora else self.store.step

    def committed_extra(self) -> dict:
        return self.engine.adapters.extra if self.lora else self.store.extra

    def commit_state(self, state: dict):
        """Commit ``state`` without an optimizer step (after a skipped step), so the data position it advanced
        survives a restart: the manifest (or the adapter checkpoint) is rewritten at the same step."""
        extra = {**{k: v for k, v in self.committed_extra().items() if k != STATE_KEY}, STATE_KEY: state}
        if self.lora:
            self.engine.options.adapter_checkpoint.commit(self.engine.adapters, self.engine.adapters.step, extra)
        else:
            self.engine.flush()  # the writer is idle after this, so the manifest can be replaced here
            self.store.commit(self.store.step, extra)

    def initial_state(self) -> dict:
        """The saved state of this run (resuming) or a fresh one starting at the store's current step."""
        saved = self.committed_extra().get(STATE_KEY)
        step_now = self.committed_step()
        fresh = {"run_dir": self.paths.run_dir, "base_step": step_now, "step": 0, "examples_seen": 0,
                 "skipped_steps": 0, "fingerprint": self.fingerprint}
        if self.lora:
            fresh["base_store_step"] = self.store.step
        if not saved or self.config.restart:
            return fresh
        if saved.get("run_dir") != self.paths.run_dir:
            say(f"note: {self.store.path} was last trained by the run in {saved.get('run_dir')} "
                f"(step {step_now}); starting a new run from its current weights")
            return fresh
        done = step_now - saved["base_step"]
        if done != saved.get("step", 0) - saved.get("skipped_steps", 0):
            where = self.paths.adapter_dir if self.lora else self.store.path
            raise TrainError(f"{where} is at step {step_now}, but its run state says {saved['base_step']} + "
                             f"{saved.get('step')} steps ({saved.get('skipped_steps', 0)} skipped): it was changed "
                             f"outside this run. Start a new run: {self.command.restart}")
        if self.lora and saved.get("base_store_step") != self.store.step:
            raise TrainError(f"the adapters in {self.paths.adapter_dir} were trained on {self.store.path} at step "
                             f"{saved.get('base_store_step')}, but that store is now at step {self.store.step}: its "
                             f"weights changed under the adapters. Train new adapters on it: {self.command.restart}")
        self.check_fingerprint(saved.get("fingerprint", {}))
        return dict(saved, fingerprint=self.fingerprint)

    def check_fingerprint(self, saved: dict):
        changed = [key for key, value in self.fingerprint.items()
                   if key not in LENGTH_KEYS and saved.get(key, value) != value]
        if changed:
            details = "; ".join("the data files' contents changed" if key == "data_sha256" else
                                f"{key}: was {saved[key]!r}, now {self.fingerprint[key]!r}" for key in changed)
            raise TrainError(f"this run in {self.paths.run_dir} was started with different settings ({details}), so "
                             "resuming would not continue the same run. Re-run with the original settings, use a "
                             f"new --experiment NAME, or start over (the run is deleted): {self.command.restart}")
        if any(saved.get(key) != self.fingerprint[key] for key in LENGTH_KEYS if key in saved):
            say(f"note: the run length changed; the schedule is re-planned for {self.total_steps} steps from here on")

    def state_after(self, state: dict, step: int, lr: float, weight_decay: float, tokens: int,
                    mix: float | None, skipped: bool = False) -> dict:
        """What is committed with step ``step`` (atomically with its weights or adapters): the data position
        always advances; a skipped step adds no tokens and no optimizer step."""
        skipped_steps = state.get("skipped_steps", 0) + int(skipped)
        values = dict(state, step=step, examples_seen=step * self.config.batch_size,
                      epoch=round(self.order.epoch_at(step), 6), lr=lr, weight_decay=weight_decay,
                      total_steps=self.total_steps,
                      tokens_seen=state.get("tokens_seen", 0) + (0 if skipped else tokens),
                      skipped_steps=skipped_steps, optimizer_step=state["base_step"] + step - skipped_steps,
                      finished=step >= self.total_steps)
        if mix is not None:
            values["quant_mix"] = mix
        return values

    def quant_mix_at(self, step: int) -> float | None:
        """The quantization mix of step ``step`` during a warmup (None otherwise: the engine's default)."""
        return quant_mix(step, self.warmup) if self.warmup else None

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        config, engine = self.config, self.engine
        state = self.initial_state()
        start = state["step"]
        if start >= self.total_steps:
            return self.already_finished(state)
        if start == 0:
            self.metrics.clear()
        else:
            dropped = self.metrics.truncate_after(start)
            dropped_note = f"; dropped {dropped} metric records of uncommitted steps" if dropped else ""
            say(f"resuming {self.paths.run_dir} at step {start}/{self.total_steps} (optimizer step "
                f"{self.committed_step()}){dropped_note}")
        self.watch = DivergenceWatch.of(self.metrics.read())
        self.diverging = {finding["metric"] for finding in self.watch.findings()}
        self.print_header()
        if start == 0 and config.eval_at_start and self.dataset.val:
            self.evaluate_baseline()
        # commit_extra replaces the extra wholesale: carry the rest (source, tokenizer) along.
        base_extra = {k: v for k, v in self.committed_extra().items() if k != STATE_KEY}
        stopper = Stopper(config)
        stopper.install()
        session_started = time.perf_counter()
        step_times: list[float] = []
        stop_reason = None
        skipped_in_row = 0
        last_eval_step = last_generate_step = None
        try:
            for index in range(start, self.total_steps):
                expected = (sum(step_times[-5:]) / len(step_times[-5:])) if step_times else 0.0
                stop_reason = stopper.reason(expected)
                if stop_reason:
                    break
                step = index + 1
                batch = [self.dataset.train[i] for i in self.order.indices(index)]
                micro = datalib.micro_batches(batch, config.grad_accum, self.pad_id)
                lr, weight_decay = self.schedule.lr(step), self.schedule.weight_decay_at(step)
                mix = self.quant_mix_at(step)
                tokens = sum(int((labels[:, 1:] != datalib.IGNORE_INDEX).sum()) for _, labels in micro)
                began = time.perf_counter()
                done = self.state_after(state, step, lr, weight_decay, tokens, mix)
                stats = engine.train_step(micro, lr=lr, weight_decay=weight_decay, quant_mix=mix,
                                          commit_extra={**base_extra, STATE_KEY: done})
                step_times.append(time.perf_counter() - began)
                self.steps_run += 1
                if stats.skipped:
                    skipped_in_row += 1
                    state = self.state_after(state, step, lr, weight_decay, tokens, mix, skipped=True)
                    self.commit_state(state)
                    self.record_skip(step, stats, lr, skipped_in_row)
                    if skipped_in_row >= config.max_skipped_steps:
                        self.stop_after_skips(step, stats, lr, skipped_in_row)
                    continue
                if not math.isfinite(stats.loss):  # the engine skips such steps; never record one as trained
                    raise TrainError(f"the engine applied step {step} with loss {stats.loss}; the run cannot trust "
                                     f"its weights. Start over with: {self.command.restart}")
                skipped_in_row = 0
                state = done
                self.record_step(step, stats, lr, weight_decay, mix, step_times, session_started)
                if config.eval_every and step % config.eval_every == 0 and self.dataset.val:
                    self.evaluate(step)
                    last_eval_step = step
                if config.generate_every and step % config.generate_every == 0 and config.prompts:
                    self.generate(step)
                    last_generate_step = step
            engine.flush()
        finally:
            stopper.restore()
        finished = stop_reason is None
        last_step = state["step"]
        if finished:
            if self.dataset.val and last_eval_step != last_step:
                self.evaluate(last_step)
            if config.prompts and last_generate_step != last_step:
                self.generate(last_step)
        self.write_status(last_step, "finished" if finished else f"stopped ({stop_reason})")
        self.draw_plot()
        if finished:
            self.finish_outputs()
            if config.judge_model or config.judge_url:
                from offload_bitnet.judge import judge_finished_run

                judge_finished_run(self, say=say)
        self.print_summary(finished)
        if finished:
            return EXIT_OK
        say(f"stopped at step {last_step}/{self.total_steps} ({stop_reason}); the "
            f"{'adapters are' if self.lora else 'store is'} saved at that step.")
        say(f"resume with: {self.command.resume}")
        return EXIT_OK if stop_reason == "time limit" else 128 + (stopper.signal_number or 2)

    def record_skip(self, step: int, stats, lr: float, in_row: int):
        """A skipped step: its batch is consumed, nothing was updated."""
        where = "adapters stay" if self.lora else "store stays"
        self.metrics.append({"type": "skip", "step": step, "reason": stats.skipped, "lr": lr,
                             "loss": stats.loss if math.isfinite(stats.loss) else None, "in_a_row": in_row,
                             "time": round(time.time(), 3)})
        say(f"step {step}/{self.total_steps} skipped: {stats.skipped} (lr {lr:.2e}); nothing was updated, the "
            f"{where} at optimizer step {self.committed_step()} ({in_row} in a row; the run stops at "
            f"{self.config.max_skipped_steps})")
        self.write_status(step, "training", skipped_steps_in_a_row=in_row, last_skip=stats.skipped)

    def stop_after_skips(self, step: int, stats, lr: float, in_row: int):
        """Too many non-finite steps in a row: stop with the last good weights (or adapters) in place."""
        where = self.paths.adapter_dir if self.lora else self.store.path
        self.write_status(step, f"stopped ({in_row} non-finite steps in a row)")
        self.draw_plot()
        raise TrainError(f"{in_row} steps in a row had a non-finite loss or gradient (the last, step {step}: "
                         f"{stats.skipped}; lr {lr:.3g}). Nothing of those steps was applied: {where} holds optimizer "
                         f"step {self.committed_step()}, the last good one. Likely causes: a learning rate too high "
                         "for this model (lower --lr), or data the model cannot handle. Re-running the same command "
                         "continues after the skipped batches; to change --lr, start over with a lower one: "
                         f"{self.command.restart_with_lr()} (or use a new --experiment NAME)")

    # ------------------------------------------------------------------ reporting
    def print_header(self):
        config, store = self.config, self.store
        say(self.dataset.summary())
        for note in self.dataset.stats.notes(config.max_seq_len):
            say(f"note: {note}")
        if not self.dataset.val:
            say("note: no validation set (--val-fraction 0, --val-data not given, or a single example)")
        if config.max_seq_len > store.config.max_seq_len:
            say(f"note: max_seq_len {config.max_seq_len} exceeds the model's trained context "
                f"({store.config.max_seq_len} tokens)")
        epochs = self.order.epoch_at(self.total_steps)
        say(f"model: {store.config.arch}, {store.config.param_count():,} parameters, mode {store.settings.mode}, "
            f"store {store.path}" + (" (frozen, read-only)" if self.lora else ""))
        if self.lora:
            adapters = self.engine.adapters
            count = adapters.parameter_count()
            say(f"LoRA: rank {adapters.lora.rank}, alpha {adapters.lora.alpha:g}, dropout {adapters.lora.dropout:g}, "
                f"targets {','.join(adapters.lora.targets)}: {count:,} trainable parameters "
                f"({100 * count / store.config.param_count():.2f}% of the model), saved in {self.paths.adapter_dir}")
        if self.warmup:
            say(f"quantization warmup: the ternary mix rises linearly from 0 to 1 over {self.warmup} steps"
                + (f"; note: the run ends at mix {quant_mix(self.total_steps, self.warmup):.2f}, before the "
                   "model is fully ternary" if self.total_steps < self.warmup else ""))
        say(f"training: {self.total_steps} steps ({epochs:.2f} epochs) of {config.batch_size} sequences "
            f"({config.grad_accum} micro-batch(es) of {config.micro_batch_size}), lr {self.lr:g} {config.schedule}"
            f", warmup {self.schedule.warmup_steps} steps, weight decay {config.weight_decay:g}")

    def record_step(self, step: int, stats, lr: float, weight_decay: float, mix: float | None, step_times: list,
                    session_started: float):
        """metrics.jsonl, status.json and (every ``log_every`` steps) the progress line."""
        elapsed = time.perf_counter() - session_started
        recent = step_times[-10:]
        eta = (sum(recent) / len(recent)) * (self.total_steps - step)
        tokens_per_s = stats.tokens / stats.wall_s if stats.wall_s > 0 else 0.0
        record = {"type": "train", "step": step, "store_step": stats.step, "loss": stats.loss, "lr": lr,
                  "weight_decay": weight_decay, "tokens": stats.tokens, "wall_s": round(stats.wall_s, 4),
                  "compute_s": round(stats.compute_s, 4), "io_wait_s": round(stats.io_wait_s, 4),
                  "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written, "peak_rss": stats.peak_rss,
                  "spilled_bytes": stats.spilled_bytes, "load_wait_s": round(stats.load_wait_s, 4),
                  "writer_wait_s": round(stats.writer_wait_s, 4), "writer_work_s": round(stats.writer_work_s, 4),
                  "epoch": round(self.order.epoch_at(step), 4),
                  "time": round(time.time(), 3)}
        if mix is not None:
            record["quant_mix"] = mix
        self.metrics.append(record)
        self.watch_divergence(record)
        if step % self.config.log_every == 0 or step == self.total_steps or step == 1:
            mixed = f" mix {mix:.2f}" if mix is not None else ""
            say(f"step {step}/{self.total_steps} loss {stats.loss:.4f} lr {lr:.2e}{mixed} | {stats.tokens} tok "
                f"{tokens_per_s:,.0f} tok/s | {stats.wall_s:.2f}s (compute {stats.compute_s:.2f}s, io wait "
                f"{stats.io_wait_s:.2f}s) | read {mib(stats.bytes_read)} written {mib(stats.bytes_written)} | "
                f"peak RSS {mib(stats.peak_rss)} | ETA {format_seconds(eta)}")
        self.write_status(step, "training", loss=stats.loss, lr=lr, eta_s=round(eta, 1), elapsed_s=round(elapsed, 1))

    def watch_divergence(self, record: dict):
        """Warn (and record in metrics.jsonl) when a loss goes far above its start, and when it comes back
        (the rule: metrics.DivergenceWatch)."""
        self.watch.add(record)
        findings = {finding["metric"]: finding for finding in self.watch.findings()}
        for metric in findings.keys() - self.diverging:
            finding = findings[metric]
            say(f"warning: the run is diverging: {finding['message']}. The learning rate (peak {self.lr:g}) is "
                f"likely too high; stop it (Ctrl-C) and start over with a lower one: {self.command.restart_with_lr()}")
            self.metrics.append({"type": "diverging", **finding, "time": round(time.time(), 3)})
        for metric in self.diverging - findings.keys():
            say(f"note: the {'training' if metric == 'train' else 'validation'} loss is back below its divergence "
                f"limit at step {record['step']}")
            self.metrics.append({"type": "recovered", "metric": metric, "step": record["step"],
                                 "time": round(time.time(), 3)})
        self.diverging = set(findings)

    def write_status(self, step: int, phase: str, **values):
        extra = {"adapter_dir": self.paths.adapter_dir, "adapter_step": self.committed_step()} if self.lora else {}
        findings = self.watch.findings()
        if findings:
            extra["diverging"] = [finding["message"] for finding in findings]
        extra["resume_command"] = self.command.resume  # for `offload-bitnet status` of a stopped run
        write_status(self.paths.status, {"phase": phase, "step": step, "total_steps": self.total_steps,
                                         "store": self.store.path, "store_step": self.store.step, **extra,
                                         "updated": datetime.datetime.now().isoformat(timespec="seconds"), **values})

    def evaluate_baseline(self):
        """Validation before the first step; during a quantization warmup both ends of the conversion: the
        full-precision model (mix 0) and the ternary model before any training (mix 1)."""
        if self.warmup:
            self.evaluate(0, mix=0.0, label="full precision, before the conversion")
            self.evaluate(0, mix=1.0, label="ternary, before any training")
        else:
            self.evaluate(0, label="before training")

    def evaluate(self, step: int, mix: float | None = None, label: str = "") -> float:
        """Token-weighted validation loss over the validation batches; logged with its perplexity. During a
        quantization warmup the model is evaluated at the mix of ``step`` (or ``mix``)."""
        if self.warmup:
            mix = self.quant_mix_at(step) if mix is None else mix
        total, count = 0.0, 0
        began = time.perf_counter()
        for ids, labels in datalib.eval_batches(self.dataset.val, self.config.eval_batch_size, self.pad_id,
                                                self.config.eval_max_batches):
            targets = int((labels[:, 1:] != datalib.IGNORE_INDEX).sum())
            total += self.engine.loss(ids, labels, quant_mix=1.0 if mix is None else mix) * targets
            count += targets
        loss = total / count
        record = {"type": "eval", "step": step, "val_loss": loss, "val_ppl": perplexity(loss), "tokens": count,
                  "seconds": round(time.perf_counter() - began, 3)}
        if mix is not None:
            record["quant_mix"] = mix
        self.metrics.append(record)
        self.watch_divergence(record)
        details = ", ".join(filter(None, [label, f"quant mix {mix:g}" if mix is not None else ""]))
        say(f"validation at step {step}{f' ({details})' if details else ''}: loss {loss:.4f} perplexity "
            f"{perplexity(loss):.2f} ({count} tokens, {time.perf_counter() - began:.1f}s)")
        return loss

    def generate(self, step: int):
        """Greedy samples from each prompt with offload_bitnet.generate (a LoRA run's adapters applied)."""
        texts = generate_samples(self.engine, self.tokenizer, self.config.prompts, self.config.max_new_tokens,
                                 self.config.seed, self.config.memory_budget_bytes, chat=self.chat)
        if texts is None:
            return
        for prompt, text in zip(self.config.prompts, texts):
            self.metrics.append({"type": "sample", "step": step, "prompt": prompt, "text": text})
            say(f"sample at step {step}: {prompt!r} -> {text!r}")

    def draw_plot(self):
        if not self.config.plot:
            return
        try:
            say(f"loss plot: {plot_losses(self.paths.metrics, self.paths.plot, self.config.experiment_name)}")
        except PlotUnavailable as error:
            say(f"note: {error}")
        except ValueError as error:
            say(f"note: no loss plot: {error}")

    def finish_outputs(self, keep_export: bool = False):
        """What a finished run leaves besides the store: the merged LoRA store and the export (with
        ``keep_export``, an export already there is kept)."""
        source = self.store.path
        if self.lora and self.config.merge:
            source = self.merge()
        if keep_export and self.config.export_path and os.path.exists(self.config.export_path):
            say(f"note: {self.config.export_path} exists; not exporting again (remove it to re-export)")
        elif self.config.export_path:
            from offload_bitnet.formats import export_model

            say(f"exporting {source} to {self.config.export_path} (format {self.config.export_format})")
            options = {"gguf_type": self.config.gguf_type} if self.config.gguf_type else {}
            export_model(source, self.config.export_path, self.config.export_format, **options)

    def merge(self) -> str:
        """Fold the adapters into a new 16-bit store (RUN_DIR/merged), replacing an older merge."""
        from offload_bitnet.formats.merge import merge_lora

        target = self.paths.merged_dir
        if os.path.exists(target):
            shutil.rmtree(target)
        say(f"merging the adapters of step {self.committed_step()} into {target}")
        return merge_lora(self.store.path, self.paths.adapter_dir, target, progress=True)

    def print_summary(self, finished: bool):
        summary = summarize(self.metrics.read())
        say("")
        diverged = ", but its loss DIVERGED" if summary["diverged"] else ""
        say("summary: " + ("finished" if finished else "stopped early") + diverged)
        say(f"  steps {summary['steps']}/{self.total_steps}, {summary['tokens']:,} trained tokens, "
            f"{format_seconds(summary['train_seconds'])} of training"
            + (f", {summary['skipped']} step(s) skipped (non-finite)" if summary.get("skipped") else ""))
        if summary["first_val_loss"] is not None and summary["first_val_step"] == 0:
            say(f"  validation loss before training {summary['first_val_loss']:.4f} (perplexity "
                f"{perplexity(summary['first_val_loss']):.2f})")
        if summary["best_val_loss"] is not None:
            say(f"  best validation loss {summary['best_val_loss']:.4f} (perplexity "
                f"{perplexity(summary['best_val_loss']):.2f}) at step {summary['best_val_step']}")
        if summary["last_val_loss"] is not None:
            say(f"  last validation loss {summary['last_val_loss']:.4f} (perplexity "
                f"{perplexity(summary['last_val_loss']):.2f}) at step {summary['last_val_step']}")
        for finding in summary["diverged"]:
            say(f"  WARNING: diverged: {finding['message']}")
        if summary["diverged"]:
            say(f"  the learning rate (peak {self.lr:g}) is likely too high; start over with a lower one: "
                f"{self.command.restart_with_lr()}")
        if summary["first_loss"] is not None:
            say(f"  first loss {summary['first_loss']:.2f} -> last loss {summary['last_loss']:.2f}")
        self.print_outputs(finished)

    def print_outputs(self, finished: bool):
        """The end of every summary: where the outputs are and the command that generates from them."""
        say(f"outputs in {shown_path(self.paths.run_dir)}:")
        say(f"  model store: {shown_path(self.store.path)}" + (" (unchanged)" if self.lora else ""))
        merged = self.lora and store_is_complete(self.paths.merged_dir)
        if self.lora:
            say(f"  adapters (PEFT format): {shown_path(self.paths.adapter_dir)}")
            if merged:
                say(f"  merged store: {shown_path(self.paths.merged_dir)}")
        plot = f"; plot: {shown_path(self.paths.plot)}" if os.path.exists(self.paths.plot) else ""
        say(f"  metrics: {shown_path(self.paths.metrics)}{plot}")
        if finished and self.config.export_path:
            say(f"  export: {shown_path(self.config.export_path)}")
        prompt = self.config.prompts[0] if self.config.prompts else ("Hello!" if self.chat else "The")
        if self.lora and not merged:
            # The base has no --tokenizer of the run's own (it is shared, read-only): the command repeats it.
            say("generate with the adapters (those of the last committed step): " + self.command.generate(
                self.store.path, self.config.device, prompt, self.chat, adapter=self.paths.adapter_dir,
                tokenizer=self.config.tokenizer))
            if self.config.merge:  # a stopped run: it merges when it finishes
                say(f"the run folds them into {shown_path(self.paths.merged_dir)} when it finishes: "
                    f"{self.command.resume}")
            else:
                say(f"to fold them into a store of their own (for exports){'' if finished else ' once the run ends'}: "
                    f"{self.command.with_options('--merge')}")
        else:
            model = self.paths.merged_dir if self.lora else self.store.path
            say(f"generate: {self.command.generate(model, self.config.device, prompt, self.chat)}")

    def already_finished(self, state: dict) -> int:
        say(f"{self.paths.run_dir} already holds a finished run ({state['step']}/{self.total_steps} steps); "
            "nothing to train.")
        if self.lora and self.config.merge and not store_is_complete(self.paths.merged_dir):
            self.finish_outputs(keep_export=True)  # --merge added after the run finished: the adapters suffice
        self.print_summary(True)
        say(f"to train it from scratch again (this run is deleted): {self.command.restart}")
        say(f"to train it longer (N > {self.total_steps}): {self.command.longer()}")
        return EXIT_OK


# ---------------------------------------------------------------------------------------------- helpers
def load_data(config: RunConfig, tokenizer, vocab_size: int) -> datalib.Dataset:
    """The run's dataset, checked against the model's vocabulary."""
    options = datalib.DataOptions(max_seq_len=config.max_seq_len, data_format=config.data_format,
                                  completion_only=not config.train_on_prompt,
                                  skip_bad_records=config.skip_bad_records, packing=config.packing)
    dataset = datalib.load_dataset(config.data, config.val_data, tokenizer, options, config.val_fraction, config.seed)
    top = dataset.max_token_id()
    if top >= vocab_size:
        raise TrainError(f"the tokenizer produced token id {top}, but the model's vocabulary has only {vocab_size} "
                         "entries: the store's tokenizer does not match its model")
    return dataset


def files_digest(paths: list[str]) -> str:
    """SHA-256 over the data files' bytes: a resumed run must read the same data, not just the same names."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def total_steps(config: RunConfig, dataset: datalib.Dataset) -> int:
    if config.num_train_iters is not None:
        return config.num_train_iters
    return dataset.steps_for_epochs(config.num_epochs if config.num_epochs is not None else 1.0, config.batch_size)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """A prompt as the model saw its training data: a user turn when it trains on chats, else plain text."""
    if chat:
        return datalib.chat_prompt_ids(tokenizer, prompt)
    return tokenizer.encode(prompt, bos=getattr(tokenizer, "add_bos", True))


def generate_samples(engine, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                     memory_budget: int, chat: bool = False) -> list[str] | None:
    """Greedy continuations of ``prompts`` from the weights committed so far, with the engine's LoRA adapters
    when it has them; None (said why) when this version has no ``offload_bitnet.generate``."""
    try:
        from offload_bitnet.generate import GenerationError, Generator, SamplingOptions, decode_continuation
    except ImportError:
        say("note: generation skipped: this version has no offload_bitnet/generate.py")
        return None
    engine.flush()  # the generator reads the store: let every update of the last step reach it
    generator = Generator(engine.store, device=str(engine.device), memory_budget=memory_budget,
                          adapters=engine.adapters)
    try:
        encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
        result = generator.generate(encoded, SamplingOptions(max_new_tokens=max_new_tokens, seed=seed),
                                    stop_ids=getattr(tokenizer, "stop_ids", None), pad_id=tokenizer.pad_id)
    except GenerationError as error:
        say(f"note: generation skipped: {error}")
        return None
    finally:
        generator.close()
    return [decode_continuation(tokenizer, p, t) for p, t in zip(encoded, result.tokens)]


def remove_leftover_temporaries(run_dir: str):
    """Delete ``*.tmp`` files a killed run left in its folder (half-written run.json, status, metrics)."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.endswith(".tmp"):
                os.remove(os.path.join(run_dir, name))


def engine_options(config: RunConfig, store: BlockStore, paths: RunPaths | None = None) -> EngineOptions:
    """The engine's settings for this run; with --mode lora, adapters saved in the run's adapter folder."""
    lora = None
    if config.is_lora:
        lora = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          targets=config.lora_target_list, init_seed=config.seed)
    return EngineOptions(device=config.device, dropout=config.dropout, seed=config.seed,
                         activation_budget_bytes=config.memory_budget_bytes,
                         resident_bytes=config.resident_budget_bytes,
                         optim=AdamWConfig(lr=default_lr(config, store), beta1=config.adam_beta1,
                                           beta2=config.adam_beta2, eps=config.adam_eps,
                                           weight_decay=config.weight_decay),
                         lora=lora, adapter_dir=paths.adapter_dir if lora and paths else None,
                         adapter_base=peft_base_model(store) if lora else None)


def check_device(device: str):
    if device == "mlx":  # the MLX backend: its one requirement is MLX itself
        if importlib.util.find_spec("mlx") is None:
            raise TrainError('--device mlx needs Apple MLX, which is not installed: pip install -e ".[mlx]"')
        return
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: this torch build or machine has no CUDA GPU; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"--device {device}: MPS is not available here; use --device cpu")


def resume_command(argv: list[str], prog: str) -> str:
    """The command that continues this run: the same arguments, without --restart."""
    return RunCommand(argv, prog).resume


# ---------------------------------------------------------------------------------------------- entry point
def run(config: RunConfig, argv: list[str], prog: str = "python finetune.py") -> int:
    """Run (or resume) the fine-tuning described by ``config``; returns the exit status."""
    paths = resolve_paths(config)
    if config.plot_only:
        say(f"loss plot: {plot_losses(paths.metrics, paths.plot, config.experiment_name)}")
        return EXIT_OK
    if config.dry_run:
        from offload_bitnet.train.plan import dry_run  # plan.py calls this module's checks, so it is imported when needed

        return dry_run(config, paths, RunCommand(argv, prog))
    check_device(config.device)
    if config.data:
        # Malformed, empty or non-UTF-8 data fails here, before anything is written, imported or locked (the
        # byte tokenizer reads every record; the model's own tokenizer checks again once the store is open).
        load_data(config, ByteTokenizer(), ByteTokenizer.vocab_size)
    # A refused run writes nothing: a store trained in place is opened (and locked: one run per store; a LoRA
    # base is only read) and checked before the run folder is made; then the run folder's lock is taken.
    store = BlockStore(paths.store_dir, writable=not config.is_lora) if paths.origin == "store" else None
    cleanup = RefusalCleanup(paths)
    try:
        if store is not None:
            check_store_settings(config, store)
        os.makedirs(paths.run_dir, exist_ok=True)
        lock = RunLock(paths.lock)
    except BaseException:
        if store is not None:
            store.close()
        cleanup.undo()
        raise
    try:
        return train(config, paths, RunCommand(argv, prog), cleanup, store)
    except Exception:
        lock.release()
        cleanup.undo()  # a no-op once the run has committed a step
        raise
    finally:
        lock.release()


def train(config: RunConfig, paths: RunPaths, command: RunCommand, cleanup: RefusalCleanup,
          store: BlockStore | None = None) -> int:
    """Prepare the store, open it (read-only under LoRA, which never writes it) unless ``store`` is it already
    open, and run the Trainer (``cleanup`` is disarmed once the Trainer is ready to start)."""
    try:
        prepare_store(config, paths, command)
        if store is None:  # writable takes the store's write lock; a LoRA base is only read
            store = BlockStore(paths.store_dir, writable=not config.is_lora)
    except BaseException:
        if store is not None:
            store.close()
        raise
    remove_leftover_temporaries(paths.run_dir)  # this run holds the run folder's lock (and the store's) now
    try:
        check_store_settings(config, store)
        options = engine_options(config, store, paths)
        if config.is_lora:
            # The trainer owns the adapter folder: it resumes the adapters from their last commit, and the engine
            # commits each step to it. Activations beyond the budget spill into the run folder, not STORE/scratch:
            # a LoRA base stays untouched (it may be read-only, or shared by several LoRA runs).
            checkpoint = AdapterCheckpoint(paths.adapter_dir, options.adapter_base or store.path)
            options = dataclasses.replace(options, adapters=checkpoint.restore(store.config, options.lora),
                                          adapter_checkpoint=checkpoint, lora=None, adapter_dir=None,
                                          scratch_dir=os.path.join(paths.run_dir, "scratch"))
        engine = StreamingEngine(store, options)
    except BaseException:
        store.close()
        raise
    try:
        trainer = Trainer(config, engine, paths, command)
        try:
            result = trainer.run()
        finally:
            if trainer.steps_run:
                cleanup.disarm()
        cleanup.disarm()
        return result
    finally:
        engine.close()


@pipe_safe
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``finetune.py``: parse the command line, run, and turn errors into one clear paragraph."""
    if argv is None:
        argv = sys.argv[1:]
        prog = prog or f"python {sys.argv[0]}"
    prog = prog or "python finetune.py"
    config = None
    try:
        config = parse_args(argv)
        return run(config, argv, prog)
    except SystemExit as exit_:  # argparse: usage errors and --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except BrokenPipeError:  # `finetune.py ... | head`: the reader is gone; the store keeps its last commit
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        print(f"\naborted; the store keeps its last committed step. Resume with: {RunCommand(argv, prog).resume}",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure becomes one readable paragraph
        if config is not None and config.debug:
            traceback.print_exc()
        print(f"error: {describe_error(error)}", file=sys.stderr, flush=True)
        return EXIT_USAGE if isinstance(error, RunConfigError) else EXIT_ERROR


def describe_error(error: BaseException) -> str:
    """The message of an expected failure; the type too, and a hint, for an unexpected one."""
    expected = (RunConfigError, TrainError, StoreError, ConfigError, datalib.DataError, PlotUnavailable)
    ours = type(error).__module__.startswith("offload_bitnet")  # the package's own error classes explain themselves
    if isinstance(error, expected) or type(error) is ValueError or ours:
        return str(error)
    if isinstance(error, OSError):
        return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    return f"unexpected {type(error).__name__}: {error} (run again with --debug for the traceback)"
