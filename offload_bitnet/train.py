"""The fine-tuning loop behind ``finetune.py``: prepare a store, load data, step the streaming engine,
evaluate, report, stop cleanly and resume exactly.

Run folder ``RUNS_DIR/EXPERIMENT/``::

    store/          the model being trained (created or imported here; a MODEL that is a store trains in place)
    adapter/        --mode lora: the adapters (PEFT format) and their optimizer state; the store stays frozen
    merged/         --mode lora --merge: the adapters folded into a new 16-bit store
    run.json        what the run was made from (checked when re-running the same experiment)
    metrics.jsonl   one record per step and per evaluation   status.json  the latest state   loss.png

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
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import traceback

import torch

from . import data as datalib
from .config import ConfigError
from .engine import EngineOptions, StreamingEngine
from .errors import pipe_safe, quiet_broken_pipe
from .lora import LoRAConfig
from .metrics import MetricsLog, PlotUnavailable, perplexity, plot_losses, summarize, write_status
from .optim import AdamWConfig
from .progress import format_seconds
from .runconfig import RunConfig, RunConfigError, parse_args, resume_fingerprint
from .schedule import make_schedule, quant_mix
from .store import BlockStore, StoreError, StoreSettings, no_master_weights
from .tokenizer import ByteTokenizer
from .streams import ActivationStash

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


def human_bytes(count: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


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
    from .formats import detect_format

    if detect_format(config.model) == "store":  # raises a clear ValueError for anything unreadable
        return RunPaths(run_dir, os.path.abspath(config.model), "store")
    if config.is_lora:  # LoRA only reads its base: share the cached import instead of a copy per run
        from .formats import default_store_dir

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


def clear_run(paths: RunPaths):
    """Remove what a previous run left in the run folder (and a store made there, never one trained in place)."""
    for path in (paths.metrics, paths.status, paths.plot, paths.run_json):
        if os.path.exists(path):
            os.remove(path)
    for folder in (paths.adapter_dir, paths.merged_dir):
        if os.path.isdir(folder):
            shutil.rmtree(folder)
    if paths.origin in ("demo", "import") and os.path.isdir(paths.store_dir):
        shutil.rmtree(paths.store_dir)
    elif paths.origin == "cache" and os.path.isdir(os.path.join(paths.run_dir, "store")):
        shutil.rmtree(os.path.join(paths.run_dir, "store"))  # a LoRA base copy made before runs shared the cache


def training_kind(config: RunConfig) -> str:
    """What a run changes: ``lora`` (adapters beside a frozen store) or ``weights`` (the store itself)."""
    return "lora" if config.is_lora else "weights"


class RunLock:
    """An exclusive lock on a run folder: a LoRA run opens its store read-only (no store lock), so this keeps
    two runs from writing the same adapters."""

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
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def prepare_store(config: RunConfig, paths: RunPaths) -> None:
    """Create (demo) or import the store into the run folder unless a finished one is already there."""
    os.makedirs(paths.run_dir, exist_ok=True)
    if config.restart:
        if paths.origin == "store" and not config.is_lora:
            say(f"--restart: training already written into {paths.store_dir} cannot be undone; "
                "a new run starts from its current weights")
        else:
            say(f"--restart: removing the previous run in {paths.run_dir}")
        clear_run(paths)
    recorded = read_json(paths.run_json)
    if recorded and recorded.get("source") != source_label(config):
        raise TrainError(f"the run folder {paths.run_dir} belongs to a run of {recorded.get('source')}, not "
                         f"{source_label(config)}. Choose another name with --experiment NAME, or pass --restart "
                         "to replace that run.")
    if recorded and recorded.get("training", "weights") != training_kind(config):
        was = "a LoRA run (--mode lora)" if recorded.get("training") == "lora" else "a run that trains the weights"
        raise TrainError(f"the run folder {paths.run_dir} holds {was}; this command asks for "
                         f"{'LoRA' if config.is_lora else 'training the weights'}. Choose another name with "
                         "--experiment NAME, or pass --restart to replace that run.")
    if paths.origin == "cache":
        from .formats import ensure_store

        paths.store_dir = ensure_store(config.model, progress=True)  # imports, or says it uses the cache
    elif paths.origin != "store" and not store_is_complete(paths.store_dir):
        if os.path.exists(paths.store_dir):
            say(f"removing the unfinished store {paths.store_dir} (its creation or import was interrupted)")
            shutil.rmtree(paths.store_dir)
        if paths.origin == "demo":
            say(f"creating a {config.size} BitNet model in {paths.store_dir} (random init, seed {config.seed}); "
                "re-running the same command resumes this run, --restart starts it over")
            from .create import create_model

            create_model(paths.store_dir, size=config.size, arch="bitnet", mode=config.store_mode,
                         state_dtype=config.state_dtype or "fp32", seed=config.seed)
        else:
            from .formats import hf, import_model

            if not config.is_lora and hf.is_packed_checkpoint(config.model):  # refused before a long import
                raise TrainError(no_master_weights(f"{config.model} is a packed BitNet checkpoint"))
            say(f"importing {config.model} into {paths.store_dir} (the original is left untouched)")
            import_model(config.model, paths.store_dir, import_settings(config), progress=True)
        if config.tokenizer:  # the run's own copy carries the tokenizer it is trained with (test_gen, exports)
            from .formats.tokenizers import install_tokenizer

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
    from .store import write_file_atomic

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

    def __init__(self, config: RunConfig, engine: StreamingEngine, paths: RunPaths, resume_command: str):
        self.config = config
        self.engine = engine
        self.store = engine.store
        self.paths = paths
        self.resume_command = resume_command
        self.lora = engine.adapters is not None
        # Quantization warmup: each step says which mix of full-precision and ternary weights it trains.
        self.warmup = config.quant_warmup if self.store.settings.mode == "qat" and not self.lora else 0
        self.metrics = MetricsLog(paths.metrics)
        from .formats.tokenizers import open_tokenizer

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
        for prompt in config.prompts:  # fail now, not after hours of training
            length = len(encode_prompt(self.tokenizer, prompt, self.chat))
            if length >= self.store.config.max_seq_len:
                raise TrainError(f"the prompt {prompt[:40]!r}... has {length} tokens; the model's context is "
                                 f"{self.store.config.max_seq_len}. Shorten it.")

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
            self.engine.adapters.save(self.paths.adapter_dir, self.engine.adapters.step, extra,
                                      base_model=self.store.path)
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
                             "outside this run. Pass --restart to start a new run.")
        if self.lora and saved.get("base_store_step") != self.store.step:
            raise TrainError(f"the adapters in {self.paths.adapter_dir} were trained on {self.store.path} at step "
                             f"{saved.get('base_store_step')}, but that store is now at step {self.store.step}: its "
                             "weights changed under the adapters. Pass --restart to train new adapters on it.")
        self.check_fingerprint(saved.get("fingerprint", {}))
        return dict(saved, fingerprint=self.fingerprint)

    def check_fingerprint(self, saved: dict):
        changed = [key for key, value in self.fingerprint.items()
                   if key not in LENGTH_KEYS and saved.get(key, value) != value]
        if changed:
            details = "; ".join("the data files' contents changed" if key == "data_sha256" else
                                f"{key}: was {saved[key]!r}, now {self.fingerprint[key]!r}" for key in changed)
            raise TrainError(f"this run in {self.paths.run_dir} was started with different settings ({details}), so "
                             "resuming would not continue the same run. Re-run with the original settings, pass "
                             "--restart to start over, or use a new --experiment NAME.")
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
                                     "its weights. --restart starts over.")
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
                from .judge import judge_finished_run

                judge_finished_run(self, say=say)
        self.print_summary(finished)
        if finished:
            return EXIT_OK
        say(f"stopped at step {last_step}/{self.total_steps} ({stop_reason}); the "
            f"{'adapters are' if self.lora else 'store is'} saved at that step.")
        say(f"resume with: {self.resume_command}")
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
                         "continues after the skipped batches; to change --lr, use --restart or a new --experiment.")

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
                  "spilled_bytes": stats.spilled_bytes, "epoch": round(self.order.epoch_at(step), 4),
                  "time": round(time.time(), 3)}
        if mix is not None:
            record["quant_mix"] = mix
        self.metrics.append(record)
        if step % self.config.log_every == 0 or step == self.total_steps or step == 1:
            mixed = f" mix {mix:.2f}" if mix is not None else ""
            say(f"step {step}/{self.total_steps} loss {stats.loss:.4f} lr {lr:.2e}{mixed} | {stats.tokens} tok "
                f"{tokens_per_s:,.0f} tok/s | {stats.wall_s:.2f}s (compute {stats.compute_s:.2f}s, io wait "
                f"{stats.io_wait_s:.2f}s) | read {mib(stats.bytes_read)} written {mib(stats.bytes_written)} | "
                f"peak RSS {mib(stats.peak_rss)} | ETA {format_seconds(eta)}")
        self.write_status(step, "training", loss=stats.loss, lr=lr, eta_s=round(eta, 1), elapsed_s=round(elapsed, 1))

    def write_status(self, step: int, phase: str, **values):
        extra = {"adapter_dir": self.paths.adapter_dir, "adapter_step": self.committed_step()} if self.lora else {}
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
            self.engine.quant_mix = mix  # what every forward of the engine sees until the next train_step
        total, count = 0.0, 0
        began = time.perf_counter()
        for ids, labels in datalib.eval_batches(self.dataset.val, self.config.eval_batch_size, self.pad_id,
                                                self.config.eval_max_batches):
            targets = int((labels[:, 1:] != datalib.IGNORE_INDEX).sum())
            total += self.engine.loss(ids, labels) * targets
            count += targets
        loss = total / count
        record = {"type": "eval", "step": step, "val_loss": loss, "val_ppl": perplexity(loss), "tokens": count,
                  "seconds": round(time.perf_counter() - began, 3)}
        if mix is not None:
            record["quant_mix"] = mix
        self.metrics.append(record)
        details = ", ".join(filter(None, [label, f"quant mix {mix:g}" if mix is not None else ""]))
        say(f"validation at step {step}{f' ({details})' if details else ''}: loss {loss:.4f} perplexity "
            f"{perplexity(loss):.2f} ({count} tokens, {time.perf_counter() - began:.1f}s)")
        return loss

    def generate(self, step: int):
        """Greedy samples from each prompt: with offload_bitnet.generate from the store, or through the engine
        for a LoRA run (the adapters live in the engine, not in the store)."""
        if self.lora:
            texts = engine_samples(self.engine, self.tokenizer, self.config.prompts, self.config.max_new_tokens,
                                   chat=self.chat)
        else:
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
            from .formats import export_model

            say(f"exporting {source} to {self.config.export_path} (format {self.config.export_format})")
            export_model(source, self.config.export_path, self.config.export_format)

    def merge(self) -> str:
        """Fold the adapters into a new 16-bit store (RUN_DIR/merged), replacing an older merge."""
        from .merge import merge_lora

        target = self.paths.merged_dir
        if os.path.exists(target):
            shutil.rmtree(target)
        say(f"merging the adapters of step {self.committed_step()} into {target}")
        return merge_lora(self.store.path, self.paths.adapter_dir, target, progress=True)

    def print_summary(self, finished: bool):
        summary = summarize(self.metrics.read())
        say("")
        say("summary: " + ("finished" if finished else "stopped early"))
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
        say(f"  model store: {self.store.path}" + (" (unchanged)" if self.lora else ""))
        if self.lora:
            say(f"  adapters (PEFT format): {self.paths.adapter_dir}")
            if finished and self.config.merge:
                say(f"  merged store: {self.paths.merged_dir}")
        plot = f"; plot: {self.paths.plot}" if os.path.exists(self.paths.plot) else ""
        say(f"  metrics: {self.paths.metrics}{plot}")
        if finished and self.config.export_path:
            say(f"  export: {self.config.export_path}")
        if summary["first_loss"] is not None:
            say(f"first loss {summary['first_loss']:.2f} -> last loss {summary['last_loss']:.2f}")

    def already_finished(self, state: dict) -> int:
        say(f"{self.paths.run_dir} already holds a finished run ({state['step']}/{self.total_steps} steps); "
            "nothing to train.")
        if self.lora and self.config.merge and not store_is_complete(self.paths.merged_dir):
            self.finish_outputs(keep_export=True)  # --merge added after the run finished: the adapters suffice
        self.print_summary(True)
        demo = " " if self.config.is_demo else " MODEL ... "
        say(f"to train it from scratch again: python finetune.py{demo}--restart; to train longer: add "
            f"--num-train-iters N (N > {self.total_steps}) or --num-epochs E")
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
    """Greedy continuations of ``prompts`` from the weights committed so far; None (said why) when this
    version has no ``offload_bitnet.generate``."""
    try:
        from .generate import GenerationError, Generator, SamplingOptions, decode_continuation
    except ImportError:
        say("note: generation skipped: this version has no offload_bitnet/generate.py")
        return None
    engine.flush()  # the generator reads the store: let every update of the last step reach it
    generator = Generator(engine.store, device=str(engine.device), memory_budget=memory_budget)
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


@torch.no_grad()
def engine_samples(engine: StreamingEngine, tokenizer, prompts: list[str], max_new_tokens: int,
                   chat: bool = False) -> list[str]:
    """Greedy continuations computed with ``engine.logits`` (so LoRA adapters take part). Each new token
    re-runs the whole sequence: slow, but only for the few samples of a run."""
    from .generate import decode_continuation

    encoded = [encode_prompt(tokenizer, prompt, chat) for prompt in prompts]
    return [decode_continuation(tokenizer, ids, new)
            for ids, new in zip(encoded, engine_continuations(engine, tokenizer, encoded, max_new_tokens))]


@torch.no_grad()
def engine_continuations(engine: StreamingEngine, tokenizer, encoded: list[list[int]], max_new_tokens: int,
                         on_done=None) -> list[list[int]]:
    """The greedy new tokens after each prompt of ``encoded`` (token ids), computed with ``engine.logits`` so
    LoRA adapters take part; ``on_done(index)`` after each prompt."""
    stops = set(getattr(tokenizer, "stop_ids", None) or ([engine.config.eos_id] if engine.config.eos_id is not None
                                                         else []))
    results = []
    for index, ids in enumerate(encoded):
        new: list[int] = []
        while len(new) < max_new_tokens and len(ids) + len(new) < engine.config.max_seq_len:
            token = int(engine.logits(torch.tensor([ids + new]))[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
        results.append(new)
        if on_done is not None:
            on_done(index)
    return results


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
                         optim=AdamWConfig(lr=default_lr(config, store), beta1=config.adam_beta1,
                                           beta2=config.adam_beta2, eps=config.adam_eps,
                                           weight_decay=config.weight_decay),
                         lora=lora, adapter_dir=paths.adapter_dir if lora and paths else None)


def check_device(device: str):
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: this torch build or machine has no CUDA GPU; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"--device {device}: MPS is not available here; use --device cpu")


def resume_command(argv: list[str], prog: str) -> str:
    """The command that continues this run: the same arguments, without --restart."""
    kept = [a for a in argv if a not in ("--restart", "--dry-run", "--plot-only", "--recalibrate")]
    return f"{prog} {shlex.join(kept)}".strip()


# ---------------------------------------------------------------------------------------------- entry point
def run(config: RunConfig, argv: list[str], prog: str = "python finetune.py") -> int:
    """Run (or resume) the fine-tuning described by ``config``; returns the exit status."""
    paths = resolve_paths(config)
    if config.plot_only:
        say(f"loss plot: {plot_losses(paths.metrics, paths.plot, config.experiment_name)}")
        return EXIT_OK
    if config.dry_run:
        from .plan import dry_run  # plan.py calls this module's checks, so it is imported when needed

        return dry_run(config, paths)
    check_device(config.device)
    if config.data:
        # Malformed, empty or non-UTF-8 data fails here, before anything is written, imported or locked (the
        # byte tokenizer reads every record; the model's own tokenizer checks again once the store is open).
        load_data(config, ByteTokenizer(), ByteTokenizer.vocab_size)
    if config.is_lora:
        os.makedirs(paths.run_dir, exist_ok=True)
        lock = RunLock(paths.lock)  # the store is opened read-only, without its write lock: one run per folder
        try:
            return train(config, paths, argv, prog)
        finally:
            lock.release()
    return train(config, paths, argv, prog)


def train(config: RunConfig, paths: RunPaths, argv: list[str], prog: str) -> int:
    """Prepare the store, open it (read-only under LoRA, which never writes it) and run the Trainer."""
    prepare_store(config, paths)
    # Writable takes the store's write lock: one run per store. A LoRA base is only read.
    store = BlockStore(paths.store_dir, writable=not config.is_lora)
    remove_leftover_temporaries(paths.run_dir)  # this run holds the store's or the run folder's lock now
    try:
        check_store_settings(config, store)
        engine = StreamingEngine(store, engine_options(config, store, paths))
        if config.is_lora:
            # The engine spills activations beyond the budget into STORE/scratch. A LoRA base must stay untouched
            # (it may be read-only, or shared by several LoRA runs whose spill files would collide): spill into
            # the run folder instead. (To be replaced by an engine option for the spill folder.)
            engine.stash = ActivationStash(config.memory_budget_bytes, os.path.join(paths.run_dir, "scratch"))
    except BaseException:
        store.close()
        raise
    try:
        return Trainer(config, engine, paths, resume_command(argv, prog)).run()
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
        print("\naborted; the store keeps its last committed step. Re-run the same command to resume.",
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
