"""One store from the ranks' stores of a distributed run: for ``offload-bitnet export`` (and ``info``, ``verify``)
of a run, and ``offload-bitnet gather`` to continue it on one process.

A run on N ranks keeps ``RUN/store.rank<R>`` on each rank's machine: every unit's forward ``weights`` on every
rank, the ``shadow`` (master weights) and ``optim`` (moments) on the unit's owner only (``sharding.py``). To
export a run trained on several machines, first copy every rank's folder into one run folder, e.g. from the
machine of rank 1: ``rsync -a HOST1:RUN/store.rank1 RUN/`` (the copies are read-only inputs; only the
committed files are needed, and a copy taken while the run is stopped is consistent).
"""
from __future__ import annotations

import glob
import os
import re
import shutil

from offload_bitnet.distributed.commit import RECORD, store_fingerprint
from offload_bitnet.distributed.env import DistributedError
from offload_bitnet.distributed.sharding import OWNED_PARTS, rank_store_dir
from offload_bitnet.progress import Progress
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.tokenizers.base import copy_store_tokenizer

_RANK_FOLDER = re.compile(r"store\.rank(\d+)$")


def rank_store_paths(path: str) -> list[str] | None:
    """The ranks' store folders of the distributed run that ``path`` names (the run folder, or one rank's store
    folder in it), in rank order; None when ``path`` is an ordinary store. Raises DistributedError, saying
    which folder to copy, when some rank's store is missing."""
    path = os.path.abspath(path)
    manifest = os.path.join(path, "manifest.json")
    if os.path.exists(manifest):
        if not _RANK_FOLDER.search(os.path.basename(path)):
            return None
        path = os.path.dirname(path)
    found = {int(_RANK_FOLDER.search(p).group(1)): p for p in glob.glob(os.path.join(path, "store.rank*"))
             if _RANK_FOLDER.search(p) and os.path.exists(os.path.join(p, "manifest.json"))}
    if not found:
        return None
    first = BlockStore(found[min(found)])
    world_size = first.extra.get(RECORD, {}).get("world_size", max(found) + 1)
    first.close()
    missing = [rank for rank in range(world_size) if rank not in found]
    if missing:
        copies = "; ".join(f"rsync -a HOST_OF_RANK_{r}:{rank_store_dir(path, r)} {path}/" for r in missing)
        raise DistributedError(f"{path} is a run on {world_size} ranks and lacks the store of rank(s) "
                               f"{', '.join(map(str, missing))}: copy each from the machine that ran it ({copies}), "
                               "then run the command again.")
    return [found[rank] for rank in range(world_size)]


def open_rank_stores(paths: list[str]) -> list[BlockStore]:
    """The ranks' stores, read-only, checked to belong to one run at one committed step."""
    stores = [BlockStore(p) for p in paths]
    steps = {s.step for s in stores}
    if len({store_fingerprint(s) for s in stores}) > 1:
        raise DistributedError(f"the stores {', '.join(paths)} hold different models or settings: they are not "
                               "the ranks of one run")
    for rank, store in enumerate(stores):
        recorded = store.extra.get(RECORD, {})
        if recorded.get("rank") != rank or recorded.get("world_size") != len(stores):
            raise DistributedError(f"{store.path} records rank {recorded.get('rank')} of "
                                   f"{recorded.get('world_size')}, not rank {rank} of {len(stores)}")
        if "previous" in store.manifest:
            steps.add(store.manifest["previous"]["step"])
    if len(steps) > 1:
        listing = ", ".join(f"rank {r} at step {s.step}" for r, s in enumerate(stores))
        raise DistributedError(f"the ranks' stores are not at one step ({listing}): the run stopped inside a "
                               "commit. Relaunch it (every rank comes back to the common step), then export.")
    return stores


def gather_store(paths: list[str], out_dir: str, parts=("weights",) + OWNED_PARTS, progress=None) -> str:
    """Write one store at ``out_dir`` with the ranks' units, each part from the unit's owner (``weights``:
    rank 0's, the same on every rank), at the run's committed step; the ranks' record is left out, so it is an
    ordinary single-process store. ``parts``: which parts to gather (an export needs no moments)."""
    stores = open_rank_stores(paths)
    first = stores[0]
    extra = {key: value for key, value in first.extra.items() if key != RECORD}
    out = BlockStore.create(out_dir, first.config, first.settings, extra)
    try:
        for index, unit in enumerate(first.units):
            for part in parts:
                holders = [s for s in stores if s.has_part(unit, part)]
                if holders:
                    out.write(unit, part, holders[0].read(unit, part), first.step)
            if progress:
                progress(index + 1, len(first.units), unit)
        copy_store_tokenizer(first.path, first.extra, out_dir)
        out.commit(first.step)
    finally:
        out.close()
        for store in stores:
            store.close()
    return out_dir


def export_run(path: str, out: str, format: str, progress=True, **options) -> str:
    """``formats.export_model`` of a store, or of a distributed run (its run folder or one rank's store): the
    units gathered from the ranks' stores (forward and master weights, not the moments) into a store beside
    ``out``, exported, and removed. Returns what ``export_model`` returns."""
    from offload_bitnet.formats import export_model  # formats sit at the edge: imported only where exporting
    ranks = rank_store_paths(path)
    if ranks is None:
        return export_model(path, out, format=format, **options)
    gathered = os.path.abspath(out).rstrip(os.sep) + ".gathering"
    shutil.rmtree(gathered, ignore_errors=True)
    try:
        gather_store(ranks, gathered, parts=("weights", "shadow"), progress=gather_progress(ranks) if progress else None)
        return export_model(gathered, out, format=format, **options)
    finally:
        shutil.rmtree(gathered, ignore_errors=True)


def gather_progress(ranks: list[str]):
    """A progress bar for ``gather_store`` over ``ranks``' stores."""
    first = BlockStore(ranks[0])
    bar = Progress(len(first.units), f"gathering {len(ranks)} ranks' stores: units")
    first.close()
    return lambda done, total, unit: bar.update(done, unit)
