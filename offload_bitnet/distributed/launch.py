"""What a training run does at start on each rank, and how it takes its share of a step: for the trainer
(``finetune.py`` under torchrun) and for scripts that drive the engine themselves (README "Data parallel")."""
from __future__ import annotations

import os
import shutil

from offload_bitnet.distributed.commit import RankCommit
from offload_bitnet.distributed.env import DistContext
from offload_bitnet.distributed.rank_stores import make_rank_store
from offload_bitnet.distributed.sharding import rank_store_dir, shard_plan
from offload_bitnet.store.blockstore import BlockStore, store_is_complete


def open_rank_store(context: DistContext, model_store: str, run_dir: str, progress=None) -> tuple[BlockStore, int]:
    """This rank's store in ``run_dir`` (``store.rank<R>``), made from ``model_store`` at the first launch (every
    unit's weights, the owned masters and moments; one whose creation was interrupted is made again), open for
    writing and brought to the step every rank has committed (``RankCommit.recover``). Collective. Returns
    ``(store, step)``.

    Each rank reads ``model_store`` on its own machine at the first launch only (on several machines, each needs
    a copy of the model's store, or of its own ``store.rank<R>``)."""
    path = rank_store_dir(run_dir, context.rank)
    context.together("creating its store", _make_rank_store_once, context, model_store, path, progress)
    store = context.together("opening its store", BlockStore, path, writable=True)
    try:
        step = RankCommit(context, store).recover()
    except BaseException:
        store.close()
        raise
    return store, step


def _make_rank_store_once(context: DistContext, model_store: str, path: str, progress):
    if store_is_complete(path):
        return
    if os.path.exists(path):
        # Its creation was interrupted (no step committed yet): it holds nothing the model's store does not.
        shutil.rmtree(path)
    source = BlockStore(model_store)
    try:
        plan = shard_plan(source.config, context.world_size, source.settings)
        make_rank_store(source, path, plan, context.rank, progress).close()
    finally:
        source.close()


def rank_share(step_micro_batches: list, context: DistContext, grad_accum: int) -> list:
    """This rank's micro-batches of a step cut into ``world_size x grad_accum`` micro-batches (in the order one
    process with ``--grad-accum world_size x grad_accum`` runs them): rank r takes the ``grad_accum``
    consecutive ones from ``r x grad_accum`` (``batching.rank_micro_batches``)."""
    expected = context.world_size * grad_accum
    if len(step_micro_batches) != expected:
        raise ValueError(f"a step of {len(step_micro_batches)} micro-batches for {context.world_size} rank(s) x "
                         f"--grad-accum {grad_accum} (expected {expected})")
    first = context.rank * grad_accum
    return step_micro_batches[first:first + grad_accum]
