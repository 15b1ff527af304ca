"""Which rank owns each unit's master weights and AdamW moments, and what each rank stores and moves.

Every rank keeps the ``weights`` part (what forward reads) of every unit. The ``shadow`` and ``optim`` parts of
a unit live on its owner only. Owners hold contiguous ranges of units in forward order (``embed``, the blocks,
``norm``, ``head``), split so that the largest share of shadow + moment bytes is as small as it can be
(``store/sizing.py``'s exact part sizes): each rank's reduce and update work is then balanced, and the
gradients of a block go to one owner while the backward walks down the ranks' ranges one after the other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from offload_bitnet.model.config import ModelConfig
from offload_bitnet.store.blockstore import StoreSettings
from offload_bitnet.store.sizing import human, manifest_bytes_bound, part_bytes
from offload_bitnet.store.units import block_unit, is_block, unit_names

OWNED_PARTS = ("shadow", "optim")  # on the owner rank only; ``weights`` are on every rank


def rank_store_dir(run_dir: str, rank: int) -> str:
    """The store folder of ``rank`` in a run folder: ``RUN/store.rank<R>`` (on that rank's own disk)."""
    return os.path.join(run_dir, f"store.rank{rank}")


def owned_bytes(config: ModelConfig, settings: StoreSettings) -> dict[str, int]:
    """unit -> bytes of its shadow and moment parts (what only its owner stores and writes)."""
    block = sum(part_bytes(config, block_unit(0), part, settings) for part in OWNED_PARTS)
    return {unit: block if is_block(unit) else sum(part_bytes(config, unit, part, settings) for part in OWNED_PARTS)
            for unit in unit_names(config)}


def contiguous_split(sizes: list[int], parts: int) -> list[range]:
    """Cut ``sizes`` into ``parts`` consecutive ranges (some may be empty when there are more parts than
    items) minimizing the largest range's sum; ties keep earlier ranges as large as allowed (deterministic)."""
    if parts < 1:
        raise ValueError(f"cannot split over {parts} ranks")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)

    def cuts_for(limit: int) -> list[int] | None:  # greedy: each range takes as many items as fit in ``limit``
        cuts, start = [0], 0
        for _ in range(parts):
            stop = start
            while stop < len(sizes) and prefix[stop + 1] - prefix[start] <= limit:
                stop += 1
            cuts.append(stop)
            start = stop
        return cuts if start == len(sizes) else None

    low, high = max(sizes, default=0), prefix[-1]
    while low < high:  # the smallest feasible largest-range sum
        middle = (low + high) // 2
        if cuts_for(middle) is None:
            low = middle + 1
        else:
            high = middle
    cuts = cuts_for(low)
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


@dataclass
class RankShare:
    """What one rank owns, stores and moves per optimizer step."""

    rank: int
    units: list[str]            # the units whose shadow and moments it owns, in forward order
    owned_bytes: int            # shadow + moment bytes on its disk
    disk_bytes: int             # everything on its disk after the first step: all weights, owned parts, manifest
    written_per_step: int       # all weights (the owners' new forward weights, broadcast) + its owned parts
    read_per_step: int          # forward and backward read every weights part; backward its owned parts
    peak_disk_bytes: int        # during a commit: the new versions beside the kept previous ones


@dataclass
class ShardPlan:
    """The owner of every unit for a model and world size, and each rank's share."""

    config: ModelConfig
    settings: StoreSettings
    world_size: int
    owners: dict[str, int]      # unit -> owner rank
    ranks: list[RankShare]
    single_owned_bytes: int     # shadow + moment bytes of the whole model (the single-rank store's)

    def owner(self, unit: str) -> int:
        return self.owners[unit]

    def describe(self) -> list[str]:
        """One line per rank, for the dry run."""
        lines = []
        for share in self.ranks:
            span = f"{share.units[0]}..{share.units[-1]}" if share.units else "nothing"
            lines.append(f"rank {share.rank}: owns {span} ({len(share.units)} units, "
                         f"{human(share.owned_bytes)} of master weights and moments, "
                         f"{100 * share.owned_bytes / max(self.single_owned_bytes, 1):.1f}%); disk "
                         f"{human(share.disk_bytes)} ({human(share.peak_disk_bytes)} while committing), "
                         f"per step writes {human(share.written_per_step)}, "
                         f"reads {human(share.read_per_step)}")
        return lines


def shard_plan(config: ModelConfig, world_size: int, settings: StoreSettings | None = None) -> ShardPlan:
    """Owners and per-rank bytes for ``config`` on ``world_size`` ranks (no store needed)."""
    settings = settings or StoreSettings()
    settings.validate()
    units = unit_names(config)
    owned = owned_bytes(config, settings)
    weights = {unit: part_bytes(config, unit, "weights", settings) for unit in units}
    all_weights = sum(weights.values())
    ranges = contiguous_split([owned[unit] for unit in units], world_size)
    owners = {units[i]: rank for rank, span in enumerate(ranges) for i in span}
    ranks = []
    for rank, span in enumerate(ranges):
        mine = [units[i] for i in span]
        mine_bytes = sum(owned[unit] for unit in mine)
        manifest = manifest_bytes_bound(config, settings)
        ranks.append(RankShare(rank, mine, mine_bytes, all_weights + mine_bytes + manifest,
                               all_weights + mine_bytes, 2 * all_weights + mine_bytes,
                               2 * (all_weights + mine_bytes) + manifest))
    return ShardPlan(config, settings, world_size, owners, ranks, sum(owned.values()))
