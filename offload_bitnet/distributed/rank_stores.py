"""Each rank's own store, made from a model's store: every unit's ``weights`` (what forward reads), its tokenizer
files, and the ``shadow`` and ``optim`` parts of the units the rank owns (``sharding.shard_plan``). The manifest records the
run's world size and the rank (``commit.RECORD``), so a store is never used by another rank or world size."""
from __future__ import annotations

from collections.abc import Callable

from offload_bitnet.distributed.commit import RECORD
from offload_bitnet.distributed.env import DistributedError
from offload_bitnet.distributed.sharding import OWNED_PARTS, ShardPlan
from offload_bitnet.store.blockstore import BlockStore, StoreError
from offload_bitnet.tokenizers.base import copy_store_tokenizer


def make_rank_store(source: BlockStore, path: str, plan: ShardPlan, rank: int,
                    progress: Callable[[int, int, str], None] | None = None) -> BlockStore:
    """Create ``rank``'s store at ``path`` from ``source`` (at its committed step; one part in memory at a time).
    Returns it open for writing. Refuses a plan made for another model or settings."""
    if plan.config.to_dict() != source.config.to_dict() or plan.settings != source.settings:
        raise DistributedError(f"the shard plan was made for another model or settings than {source.path}")
    if not 0 <= rank < plan.world_size:
        raise DistributedError(f"rank {rank} is not one of the plan's {plan.world_size} ranks")
    if source.step < 0:
        raise StoreError(f"{source.path} was never committed (its creation did not finish); re-create it")
    extra = dict(source.extra, **{RECORD: {"world_size": plan.world_size, "rank": rank}})
    store = BlockStore.create(path, source.config, source.settings, extra)
    try:
        units = source.units
        for index, unit in enumerate(units):
            for part in ("weights",) + (OWNED_PARTS if plan.owner(unit) == rank else ()):
                if source.has_part(unit, part):
                    store.write(unit, part, source.read(unit, part), source.step)
            if progress:
                progress(index + 1, len(units), unit)
        copy_store_tokenizer(source.path, source.extra, path)
        store.commit(source.step)
    except BaseException:
        store.close()
        raise
    return store

