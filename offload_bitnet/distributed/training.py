"""``finetune.py`` on one rank of a data-parallel run under torchrun: the run's start on each rank (its lock, the
model's store prepared once per machine, its own store or the shared LoRA base, the trainer) and the LoRA
adapters kept identical on every rank with one adapter folder.

What each rank does (the trainer's loop is the one-process loop; world size 1 is the degenerate case):

* every rank takes its own lock (``RUN/run.rank<R>.lock``; rank 0's is ``run.lock``), so a second launch of the
  same run is refused on every rank;
* the first process on each machine (``LOCAL_RANK`` 0) prepares the model's store as one process would (creates
  the demo model, imports MODEL, or reads a store given as MODEL: that one is only read under torchrun), then
  every rank makes or reopens its own ``RUN/store.rank<R>`` from it (``launch.open_rank_store``) and trains
  that; a LoRA run reads the base, read-only, on every rank;
* every stage that can fail on one rank alone (lock, store, data, the resumed state) ends with an agreement
  (``DistContext.together``): a failure on any rank stops every rank with the failing rank named, instead of
  leaving the others waiting in a collective;
* rank 0 alone prints progress and writes metrics.jsonl, status.json, the plot and the export, and runs
  validation and samples (the other ranks wait for it at the next step's first collective).

LoRA: every rank computes the same adapters (their gradients are all-reduced), so one adapter folder holds the
run: rank 0 commits it (``SharedAdapterCheckpoint``); at start it sends what it restored to the other ranks.
A crash of any rank at any moment leaves that folder at one committed step, which every rank resumes from.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import torch.distributed as dist

from offload_bitnet.distributed.batching import per_rank_batch
from offload_bitnet.distributed.env import DistContext, DistributedError
from offload_bitnet.distributed.launch import open_rank_store
from offload_bitnet.distributed.sharding import shard_plan
from offload_bitnet.distributed.trainable import distribute
from offload_bitnet.model.lora import AdapterCheckpoint, AdapterSet
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.sizing import human
from offload_bitnet.train.messages import TrainError, set_quiet
from offload_bitnet.train.run_commands import RunCommand
from offload_bitnet.train.run_folder import RefusalCleanup, RunLock, RunPaths, remove_leftover_temporaries
from offload_bitnet.train.runconfig import RunConfig, RunConfigError


def check_batch_split(config: RunConfig, world_size: int):
    """``--batch-size`` must split into ``world_size x --grad-accum`` equal micro-batches (a usage error listing
    the values that do)."""
    try:
        per_rank_batch(config.batch_size, world_size, config.grad_accum)
    except ValueError as error:
        raise RunConfigError(str(error)) from None


def train_rank(config: RunConfig, paths: RunPaths, command: RunCommand, context: DistContext) -> int:
    """Run (or resume) ``config`` as ``context``'s rank; returns the exit status (the same on every rank)."""
    from offload_bitnet.train.trainer import Trainer  # the trainer imports this package's step
    if config.quant_warmup > 0 and not config.is_lora:
        raise TrainError("--quant-warmup is not supported across ranks yet: the warm-up reads every block's "
                         "master weights in forward, and each rank has only its share of them. Run the warm-up "
                         "on one process, then continue the run under torchrun.")
    set_quiet(not context.is_main)
    paths = dataclasses.replace(paths, rank=context.rank)
    # A refusal removes what the run created but the rank stores: like a finished import they are kept (a copy of
    # the model's store that a relaunch reuses), and removing a store while torchrun stops the rank could leave
    # half of one behind.
    cleanup = RefusalCleanup(paths)
    lock = None
    try:
        lock = context.together("taking its lock on the run folder", _lock, paths)
        context.together("preparing the model's store", _prepare_once_per_machine, config, paths, command, context)
        context.together("checking the model's store", _check_model_store, config, paths)
        store = _open_store(config, paths, context)
        try:
            engine = context.together("opening its engine", _engine, config, store, paths, context)
        except BaseException:
            store.close()
            raise
        try:
            trainer = context.together("reading the data", Trainer, config, engine, paths, command, context)
            try:
                return trainer.run()
            finally:
                if trainer.steps_run:
                    cleanup.disarm()
        finally:
            engine.close()
    except BaseException:
        if lock is not None:
            lock.release()
        cleanup.undo()  # a no-op once the run has committed a step
        raise
    finally:
        if lock is not None:
            lock.release()


def _lock(paths: RunPaths) -> RunLock:
    os.makedirs(paths.run_dir, exist_ok=True)
    return RunLock(paths.lock)


def _prepare_once_per_machine(config: RunConfig, paths: RunPaths, command: RunCommand, context: DistContext):
    """The model's store as one process prepares it (create, import, --restart), by the first rank of each
    machine; a store given as MODEL is only checked (every rank trains its own copy)."""
    from offload_bitnet.train.setup import prepare_store
    if paths.rank_stores() and config.is_lora:
        raise TrainError(f"{paths.run_dir} holds the stores of a data-parallel run of the model's weights, not "
                         f"a LoRA run: use another --experiment NAME, or start over: {command.restart}")
    if context.local_rank == 0:
        prepare_store(config, paths, command)


def _check_model_store(config: RunConfig, paths: RunPaths):
    from offload_bitnet.train.setup import check_store_settings
    model = BlockStore(paths.store_dir)
    try:
        check_store_settings(config, model)
    finally:
        model.close()


def _open_store(config: RunConfig, paths: RunPaths, context: DistContext) -> BlockStore:
    """A LoRA base, read-only on every rank; else this rank's own store, at the step every rank committed."""
    if config.is_lora:
        return context.together("opening the base store", BlockStore, paths.store_dir)
    store, _ = open_rank_store(context, paths.store_dir, paths.run_dir, progress=None)
    if context.local_rank == 0:  # every rank of this machine holds its lock now
        remove_leftover_temporaries(paths.run_dir)
    return store


def _engine(config: RunConfig, store: BlockStore, paths: RunPaths, context: DistContext):
    from offload_bitnet.engine.streaming import StreamingEngine
    from offload_bitnet.train.setup import engine_options, run_adapter_options
    options = engine_options(config, store, paths)
    if config.is_lora:
        options = run_adapter_options(options, store, paths,
                                      share=lambda checkpoint: SharedAdapterCheckpoint(checkpoint, context))
    return distribute(StreamingEngine(store, options), context)


class SharedAdapterCheckpoint:
    """One adapter folder for every rank's identical adapters: rank 0 commits it; at the first ``restore`` it
    sends what it read (or fresh adapters) to the other ranks, and every rank keeps a copy of the last commit
    in RAM (adapters are small) to undo an abandoned step without a collective."""

    def __init__(self, checkpoint: AdapterCheckpoint, context: DistContext):
        self.checkpoint, self.context = checkpoint, context
        self.directory, self.base_model = checkpoint.directory, checkpoint.base_model
        self._committed: AdapterSet | None = None

    def exists(self) -> bool:
        return self._committed is not None or self.checkpoint.exists()

    def restore(self, config, lora) -> AdapterSet:
        """The adapters of the last commit (rank 0's folder), the same on every rank. Collective the first time."""
        if self._committed is None:
            sent = [self.checkpoint.restore(config, lora) if self.context.is_main else None]
            if self.context.distributed:
                dist.broadcast_object_list(sent, src=0)
            self._committed = sent[0]
        return copy.deepcopy(self._committed)

    def commit(self, adapters: AdapterSet, step: int, extra: dict | None = None):
        """Rank 0 writes step ``step``'s adapters; every rank remembers them as the last commit."""
        if self.context.is_main:
            self.checkpoint.commit(adapters, step, extra)
        else:
            adapters.step, adapters.extra = step, extra or {}
        self._committed = copy.deepcopy(adapters)


def dry_run_lines(config: RunConfig, model_config, settings, world_size: int) -> list[str]:
    """What ``--dry-run`` adds for a data-parallel run on ``world_size`` ranks: each rank's share of a step and,
    training the weights, of the master weights and moments, its disk and its bytes per step."""
    check_batch_split(config, world_size)
    size = per_rank_batch(config.batch_size, world_size, config.grad_accum)
    lines = [f"data parallel: {world_size} ranks; each step every rank runs {config.grad_accum} micro-batch(es) of "
             f"{size} sequence(s) ({config.batch_size} sequences per step in all)"]
    if config.is_lora:
        return lines + ["  LoRA: every rank reads the base store (on its own machine's disk) and keeps the same "
                        "adapters; rank 0 writes the adapter folder"]
    plan = shard_plan(model_config, world_size, settings)
    lines.append(f"  master weights and moments: {human(plan.single_owned_bytes)} on one process, split by bytes:")
    return lines + ["  " + line for line in plan.describe()]


def planned_world_size(config: RunConfig, environ=None) -> int:
    """The world size a dry run plans for: ``--world-size``, else torchrun's ``WORLD_SIZE``, else 1."""
    environ = os.environ if environ is None else environ
    if config.world_size is not None:
        return config.world_size
    try:
        return int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={environ['WORLD_SIZE']!r} is not a number") from None
