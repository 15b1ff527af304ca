"""The fine-tuning loop behind ``finetune.py``: load data, step the streaming engine, evaluate, report, stop
cleanly and resume exactly. What a run prepares first is in ``setup`` (store, data, engine options), its folder
and lock in ``run_folder``, stopping in ``stopping``, sample generations in ``samples``.

Every command the run prints (``run_commands.RunCommand``) repeats its arguments, so it acts on this run only;
``--restart`` says what it deletes first. A run that fails before committing a step removes what it created
(``run_folder.RefusalCleanup``), keeping only a finished store it made. A loss far above its start is flagged
while the run goes on (``metrics.DivergenceWatch``) and in the summary.

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

import datetime
import math
import os
import sys
import time
import traceback

from offload_bitnet.argparsing import check_device
from offload_bitnet.distributed.commit import RankCommit
from offload_bitnet.distributed.env import (DistContext, RankError, TorchrunEnv, init_distributed,
                                            named_rank_errors, torchrun_command)
from offload_bitnet.distributed.launch import rank_share
from offload_bitnet.distributed.training import check_batch_split, train_rank
from offload_bitnet.engine.streaming import StreamingEngine
from offload_bitnet.errors import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, describe_error, pipe_safe,
                                   quiet_broken_pipe)
from offload_bitnet.judge import judge_finished_run
from offload_bitnet.notices import rank_label, set_rank
from offload_bitnet.progress import format_seconds
from offload_bitnet.store.blockstore import BlockStore, store_is_complete
from offload_bitnet.store.sizing import human
from offload_bitnet.tokenizers.base import ByteTokenizer
from offload_bitnet.tokenizers.loaders import open_tokenizer
from offload_bitnet.train import data as datalib
from offload_bitnet.train import reporting
from offload_bitnet.train.messages import TrainError, say
from offload_bitnet.train.metrics import (DiscardedMetrics, DivergenceWatch, MetricsLog, perplexity, plot_losses,
                                          write_status)
from offload_bitnet.train.plan import dry_run
from offload_bitnet.train.run_commands import RunCommand
from offload_bitnet.train.run_folder import (RefusalCleanup, RunLock, RunPaths, remove_leftover_temporaries,
                                             resolve_paths)
from offload_bitnet.train.runconfig import RunConfig, RunConfigError, resume_fingerprint
from offload_bitnet.train.runconfig_loading import parse_args
from offload_bitnet.train.samples import check_prompts, generate_samples
from offload_bitnet.train.schedule import make_schedule, quant_mix
from offload_bitnet.train.setup import (check_store_settings, default_lr, engine_options, files_digest, load_data,
                                        prepare_store, run_adapter_options, total_steps)
from offload_bitnet.train.stopping import Stopper

STATE_KEY = "train_state"
# Settings a resumed run may change without changing what the finished run computes... except its length,
# which re-plans the schedule from the current step on (said so when it happens).
LENGTH_KEYS = ("num_epochs", "num_train_iters")


# ---------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """One fine-tuning run over an open engine."""

    def __init__(self, config: RunConfig, engine: StreamingEngine, paths: RunPaths, command: RunCommand,
                 context: DistContext | None = None):
        """``context``: this process's rank in a data-parallel run (``distributed.training``); one process when
        None. Every rank runs the same loop on its share of each step; rank 0 alone reports, evaluates,
        generates samples and writes the run's records and outputs."""
        self.config = config
        self.context = context or DistContext()
        self.main = self.context.is_main
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
        self.metrics = MetricsLog(paths.metrics) if self.main else DiscardedMetrics()
        # The commits of a step without an optimizer step (a skipped one): on every rank or none.
        self.committer = RankCommit(self.context, self.store)

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
            self.committer.commit(self.store.step, extra)

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
        config, engine, context = self.config, self.engine, self.context
        state = context.together("resuming its state", self.initial_state)
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
        reporting.print_header(self)
        if start == 0 and config.eval_at_start and self.dataset.val and self.main:
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
                stop_reason = self.agreed_stop(stopper.reason(expected))
                if stop_reason:
                    break
                step = index + 1
                batch = [self.dataset.train[i] for i in self.order.indices(index)]
                # The step's micro-batches as one process cuts them (world size x grad_accum); this rank's share
                # of them (``distributed.launch.rank_share``: all of them alone).
                micro = datalib.micro_batches(batch, context.world_size * config.grad_accum, self.pad_id)
                lr, weight_decay = self.schedule.lr(step), self.schedule.weight_decay_at(step)
                mix = self.quant_mix_at(step)
                tokens = sum(int((labels[:, 1:] != datalib.IGNORE_INDEX).sum()) for _, labels in micro)
                began = time.perf_counter()
                done = self.state_after(state, step, lr, weight_decay, tokens, mix)
                stats = engine.train_step(rank_share(micro, context, config.grad_accum), lr=lr,
                                          weight_decay=weight_decay, quant_mix=mix,
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
                self.record_step(step, stats, tokens, lr, weight_decay, mix, step_times, session_started)
                if self.main and config.eval_every and step % config.eval_every == 0 and self.dataset.val:
                    self.evaluate(step)
                    last_eval_step = step
                if self.main and config.generate_every and step % config.generate_every == 0 and config.prompts:
                    self.generate(step)
                    last_generate_step = step
            engine.flush()
        finally:
            stopper.restore()
        finished = stop_reason is None
        last_step = state["step"]
        if not self.main:  # rank 0 evaluates, reports and writes the outputs
            return EXIT_OK if finished or stop_reason == "time limit" else 128 + (stopper.signal_number or 2)
        if finished:
            if self.dataset.val and last_eval_step != last_step:
                self.evaluate(last_step)
            if config.prompts and last_generate_step != last_step:
                self.generate(last_step)
        self.write_status(last_step, "finished" if finished else f"stopped ({stop_reason})")
        reporting.draw_plot(self)
        if finished:
            reporting.finish_outputs(self)
            if config.judge_model or config.judge_url:
                judge_finished_run(self, say=say)
        reporting.print_summary(self, finished)
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
        reporting.draw_plot(self)
        raise TrainError(f"{in_row} steps in a row had a non-finite loss or gradient (the last, step {step}: "
                         f"{stats.skipped}; lr {lr:.3g}). Nothing of those steps was applied: {where} holds optimizer "
                         f"step {self.committed_step()}, the last good one. Likely causes: a learning rate too high "
                         "for this model (lower --lr), or data the model cannot handle. Re-running the same command "
                         "continues after the skipped batches; to change --lr, start over with a lower one: "
                         f"{self.command.restart_with_lr()} (or use a new --experiment NAME)")

    # ------------------------------------------------------------------ reporting
    def record_step(self, step: int, stats, tokens: int, lr: float, weight_decay: float, mix: float | None,
                    step_times: list, session_started: float):
        """metrics.jsonl, status.json and (every ``log_every`` steps) the progress line. ``tokens``: the step's
        target tokens over every rank (``stats``: this rank's step)."""
        elapsed = time.perf_counter() - session_started
        recent = step_times[-10:]
        eta = (sum(recent) / len(recent)) * (self.total_steps - step)
        tokens_per_s = tokens / stats.wall_s if stats.wall_s > 0 else 0.0
        record = {"type": "train", "step": step, "store_step": stats.step, "loss": stats.loss, "lr": lr,
                  "weight_decay": weight_decay, "tokens": tokens, "wall_s": round(stats.wall_s, 4),
                  "compute_s": round(stats.compute_s, 4), "io_wait_s": round(stats.io_wait_s, 4),
                  "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written, "peak_rss": stats.peak_rss,
                  "spilled_bytes": stats.spilled_bytes, "load_wait_s": round(stats.load_wait_s, 4),
                  "writer_wait_s": round(stats.writer_wait_s, 4), "writer_work_s": round(stats.writer_work_s, 4),
                  "update_busy_s": round(stats.update_busy_s, 4), "write_busy_s": round(stats.write_busy_s, 4),
                  "epoch": round(self.order.epoch_at(step), 4),
                  "time": round(time.time(), 3)}
        if mix is not None:
            record["quant_mix"] = mix
        self.metrics.append(record)
        self.watch_divergence(record)
        if step % self.config.log_every == 0 or step == self.total_steps or step == 1:
            mixed = f" mix {mix:.2f}" if mix is not None else ""
            say(f"step {step}/{self.total_steps} loss {stats.loss:.4f} lr {lr:.2e}{mixed} | {tokens} tok "
                f"{tokens_per_s:,.0f} tok/s | {stats.wall_s:.2f}s (compute {stats.compute_s:.2f}s, io wait "
                f"{stats.io_wait_s:.2f}s) | read {human(stats.bytes_read)} written {human(stats.bytes_written)} | "
                f"peak RSS {human(stats.peak_rss)} | ETA {format_seconds(eta)}")
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

    def agreed_stop(self, reason: str | None) -> str | None:
        """Why the run stops before the next step, the same on every rank: a rank whose own limit or signal
        came stops every rank at this step boundary (alone: ``reason`` itself)."""
        stopping = self.context.all_gather_object(reason)
        return reason or next((f"{why}, on rank {rank}" for rank, why in enumerate(stopping) if why), None)

    def write_status(self, step: int, phase: str, **values):
        if not self.main:
            return
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

    def already_finished(self, state: dict) -> int:
        say(f"{self.paths.run_dir} already holds a finished run ({state['step']}/{self.total_steps} steps); "
            "nothing to train.")
        if self.lora and self.config.merge and not store_is_complete(self.paths.merged_dir):
            reporting.finish_outputs(self, keep_export=True)  # --merge added after the run finished: the adapters suffice
        reporting.print_summary(self, True)
        say(f"to train it from scratch again (this run is deleted): {self.command.restart}")
        say(f"to train it longer (N > {self.total_steps}): {self.command.longer()}")
        return EXIT_OK


# ---------------------------------------------------------------------------------------------- entry point
def run(config: RunConfig, argv: list[str], prog: str = "python finetune.py") -> int:
    """Run (or resume) the fine-tuning described by ``config``; returns the exit status."""
    paths = resolve_paths(config)
    if config.plot_only:
        say(f"loss plot: {plot_losses(paths.metrics, paths.plot, config.experiment_name)}")
        return EXIT_OK
    if config.dry_run:
        return dry_run(config, paths, RunCommand(argv, prog))
    check_device(config.device)
    if config.data:
        # Malformed, empty or non-UTF-8 data fails here, before anything is written, imported or locked (the
        # byte tokenizer reads every record; the model's own tokenizer checks again once the store is open).
        load_data(config, ByteTokenizer(), ByteTokenizer.vocab_size)
    context = init_distributed(config.device, config.dist_backend)  # one process outside torchrun
    if context.distributed:
        check_batch_split(config, context.world_size)  # a usage error, before anything is written
        try:
            return named_rank_errors(context)(train_rank)(config, paths, RunCommand(argv, prog), context)
        finally:
            context.close()
    rank_stores = paths.rank_stores()
    if rank_stores:
        raise TrainError(f"{paths.run_dir} holds a data-parallel run ({len(rank_stores)} rank stores): "
                         "resume it with torchrun and the same number of processes, or continue it on one process "
                         f"from one store: offload-bitnet gather {paths.run_dir} OUT, then train OUT")
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
            options = run_adapter_options(options, store, paths)
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
        prog = prog or torchrun_command(sys.argv[0]) or f"python {sys.argv[0]}"
    prog = prog or "python finetune.py"
    config = None
    try:
        launched = TorchrunEnv.from_environ()
        if launched is not None:  # rank 0 alone prints progress and warnings; every rank's errors name it
            set_rank(launched.rank, launched.world_size)
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
        named = "" if isinstance(error, RankError) else rank_label()  # a RankError names its rank already
        print(f"error: {named}{describe_error(error)}", file=sys.stderr, flush=True)
        return EXIT_USAGE if isinstance(error, RunConfigError) else EXIT_ERROR
