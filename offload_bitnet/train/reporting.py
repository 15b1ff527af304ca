"""What a run tells its user and leaves behind: the header before training, the summary and outputs at the end
(where everything is, the command that generates from it), the loss plot, the merged LoRA store and the export.
Functions of the ``Trainer`` whose run they report."""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from offload_bitnet.distributed.batching import per_rank_batch
from offload_bitnet.distributed.gather import export_run
from offload_bitnet.formats.merge import merge_lora
from offload_bitnet.progress import format_seconds
from offload_bitnet.store.blockstore import store_is_complete
from offload_bitnet.train.messages import say
from offload_bitnet.train.metrics import PlotUnavailable, perplexity, plot_losses, summarize
from offload_bitnet.train.run_commands import shown_path
from offload_bitnet.train.schedule import quant_mix

if TYPE_CHECKING:
    from offload_bitnet.train.trainer import Trainer


def print_header(trainer: "Trainer"):
    config, store = trainer.config, trainer.store
    say(trainer.dataset.summary())
    for note in trainer.dataset.stats.notes(config.max_seq_len):
        say(f"note: {note}")
    if not trainer.dataset.val:
        say("note: no validation set (--val-fraction 0, --val-data not given, or a single example)")
    if config.max_seq_len > store.config.max_seq_len:
        say(f"note: max_seq_len {config.max_seq_len} exceeds the model's trained context "
            f"({store.config.max_seq_len} tokens)")
    epochs = trainer.order.epoch_at(trainer.total_steps)
    say(f"model: {store.config.arch}, {store.config.param_count():,} parameters, mode {store.settings.mode}, "
        f"store {store.path}" + (" (frozen, read-only)" if trainer.lora else ""))
    if trainer.lora:
        adapters = trainer.engine.adapters
        count = adapters.parameter_count()
        say(f"LoRA: rank {adapters.lora.rank}, alpha {adapters.lora.alpha:g}, dropout {adapters.lora.dropout:g}, "
            f"targets {','.join(adapters.lora.targets)}: {count:,} trainable parameters "
            f"({100 * count / store.config.param_count():.2f}% of the model), saved in {trainer.paths.adapter_dir}")
    if trainer.warmup:
        say(f"quantization warmup: the ternary mix rises linearly from 0 to 1 over {trainer.warmup} steps"
            + (f"; note: the run ends at mix {quant_mix(trainer.total_steps, trainer.warmup):.2f}, before the "
               "model is fully ternary" if trainer.total_steps < trainer.warmup else ""))
    ranks = trainer.context.world_size
    if ranks > 1:
        say(f"data parallel: {ranks} ranks ({trainer.context.backend}); each trains its share of every step, "
            + ("the same adapters on every rank, saved by rank 0" if trainer.lora else
               f"its own store {shown_path(os.path.dirname(store.path))}/store.rank<R> (every unit's forward "
               "weights, its share of the master weights and moments)"))
    say(f"training: {trainer.total_steps} steps ({epochs:.2f} epochs) of {config.batch_size} sequences "
        f"({config.grad_accum} micro-batch(es) of {per_rank_batch(config.batch_size, ranks, config.grad_accum)}"
        f"{' per rank' if ranks > 1 else ''}), lr {trainer.lr:g} {config.schedule}"
        f", warmup {trainer.schedule.warmup_steps} steps, weight decay {config.weight_decay:g}")


def draw_plot(trainer: "Trainer"):
    if not trainer.config.plot:
        return
    try:
        say(f"loss plot: {plot_losses(trainer.paths.metrics, trainer.paths.plot, trainer.config.experiment_name)}")
    except PlotUnavailable as error:
        say(f"note: {error}")
    except ValueError as error:
        say(f"note: no loss plot: {error}")


def finish_outputs(trainer: "Trainer", keep_export: bool = False):
    """What a finished run leaves besides the store: the merged LoRA store and the export (with
    ``keep_export``, an export already there is kept)."""
    source = trainer.store.path
    if trainer.lora and trainer.config.merge:
        source = merge_adapters(trainer)
    if keep_export and trainer.config.export_path and os.path.exists(trainer.config.export_path):
        say(f"note: {trainer.config.export_path} exists; not exporting again (remove it to re-export)")
    elif trainer.config.export_path:
        say(f"exporting {source} to {trainer.config.export_path} (format {trainer.config.export_format})")
        options = {"gguf_type": trainer.config.gguf_type} if trainer.config.gguf_type else {}
        # A data-parallel run's stores are gathered first (from the rank folders on this machine).
        export_run(source, trainer.config.export_path, trainer.config.export_format, **options)


def merge_adapters(trainer: "Trainer") -> str:
    """Fold the adapters into a new 16-bit store (RUN_DIR/merged), replacing an older merge."""
    target = trainer.paths.merged_dir
    if os.path.exists(target):
        shutil.rmtree(target)
    say(f"merging the adapters of step {trainer.committed_step()} into {target}")
    return merge_lora(trainer.store.path, trainer.paths.adapter_dir, target, progress=True)


def print_summary(trainer: "Trainer", finished: bool):
    summary = summarize(trainer.metrics.read())
    say("")
    diverged = ", but its loss DIVERGED" if summary["diverged"] else ""
    say("summary: " + ("finished" if finished else "stopped early") + diverged)
    say(f"  steps {summary['steps']}/{trainer.total_steps}, {summary['tokens']:,} trained tokens, "
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
        say(f"  the learning rate (peak {trainer.lr:g}) is likely too high; start over with a lower one: "
            f"{trainer.command.restart_with_lr()}")
    if summary["first_loss"] is not None:
        say(f"  first loss {summary['first_loss']:.2f} -> last loss {summary['last_loss']:.2f}")
    print_outputs(trainer, finished)


def print_outputs(trainer: "Trainer", finished: bool):
    """The end of every summary: where the outputs are and the command that generates from them."""
    say(f"outputs in {shown_path(trainer.paths.run_dir)}:")
    if trainer.context.world_size > 1 and not trainer.lora:
        say(f"  model: the {trainer.context.world_size} ranks' stores {shown_path(trainer.paths.run_dir)}/store.rank<R> "
            f"(export them as one model: offload-bitnet export {shown_path(trainer.paths.run_dir)} OUT --format hf; "
            "rank 0's holds every unit's forward weights, so test_gen.py reads it as it is)")
    else:
        say(f"  model store: {shown_path(trainer.store.path)}" + (" (unchanged)" if trainer.lora else ""))
    merged = trainer.lora and store_is_complete(trainer.paths.merged_dir)
    if trainer.lora:
        say(f"  adapters (PEFT format): {shown_path(trainer.paths.adapter_dir)}")
        if merged:
            say(f"  merged store: {shown_path(trainer.paths.merged_dir)}")
    plot = f"; plot: {shown_path(trainer.paths.plot)}" if os.path.exists(trainer.paths.plot) else ""
    say(f"  metrics: {shown_path(trainer.paths.metrics)}{plot}")
    if finished and trainer.config.export_path:
        say(f"  export: {shown_path(trainer.config.export_path)}")
    prompt = trainer.config.prompts[0] if trainer.config.prompts else ("Hello!" if trainer.chat else "The")
    if trainer.lora and not merged:
        # The base has no --tokenizer of the run's own (it is shared, read-only): the command repeats it.
        say("generate with the adapters (those of the last committed step): " + trainer.command.generate(
            trainer.store.path, trainer.config.device, prompt, trainer.chat, adapter=trainer.paths.adapter_dir,
            tokenizer=trainer.config.tokenizer))
        if trainer.config.merge:  # a stopped run: it merges when it finishes
            say(f"the run folds them into {shown_path(trainer.paths.merged_dir)} when it finishes: "
                f"{trainer.command.resume}")
        else:
            say(f"to fold them into a store of their own (for exports){'' if finished else ' once the run ends'}: "
                f"{trainer.command.with_options('--merge')}")
    else:
        model = trainer.paths.merged_dir if trainer.lora else trainer.store.path
        say(f"generate: {trainer.command.generate(model, trainer.config.device, prompt, trainer.chat)}")
