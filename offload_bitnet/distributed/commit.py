"""A step counts as committed only when every rank has committed it: the two-phase commit of the ranks'
stores, and the recovery that brings every rank back to the same step after a crash.

States of one rank's store (``k`` = the last step every rank has committed)::

    AT k                      manifest at k, nothing kept
      | phase 1: write step k+1's files beside k's, fsync them (``sync_writes``); barrier
    SWITCHED k+1 (keeps k)    phase 2: one atomic manifest switch to k+1, which records k and keeps its files
      | barrier: every rank has switched
    AT k+1                    ``release_previous``: one more switch drops the record, k's files are recycled

A crash anywhere leaves each store AT k, SWITCHED k+1 (keeps k) or AT k+1, and no two ranks more than one
step apart: no rank switches before every rank has synced (barrier 1), and none releases k before every rank
has switched (barrier 2). At start (``RankCommit.recover``) the ranks exchange their last commits, ordered by
``commit_key`` (the step, then a serial every commit counts: a skipped step commits its advanced data position
at the same step); the common one is the smallest; a store one commit ahead rolls back to the one it kept; a
store that keeps a previous commit releases it.
Stores of another model (a fingerprint of config and settings), of another world size or another rank (both
recorded in the manifest's ``extra["distributed"]``) are refused with the same message on every rank.
"""
from __future__ import annotations

import hashlib
import json

from offload_bitnet.distributed.env import DistContext, DistributedError
from offload_bitnet.store.blockstore import BlockStore

RECORD = "distributed"  # the key of the manifest's extra that records the run's world size and this rank


def store_fingerprint(store: BlockStore) -> str:
    """A short hash of the store's model config and settings: the ranks' stores of one run agree on it."""
    _, settings = store.settings.manifest_record()
    text = json.dumps({"config": store.config.to_dict(), "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def commit_key(manifest: dict) -> tuple[int, int]:
    """The order of a rank store's commits: ``(step, serial)``. Every commit across ranks counts one more
    serial, so a commit that keeps the step (a skipped step's advanced data position) is told from the one
    before it; stores made before serials were recorded count 0."""
    recorded = (manifest.get("extra") or {}).get(RECORD) or {}
    return manifest["step"], int(recorded.get("commit", 0))


class RankCommit:
    """One rank's side of the commits across ranks; with one process, plain ``BlockStore.commit``."""

    def __init__(self, context: DistContext, store: BlockStore):
        self.context = context
        self.store = store

    @property
    def record(self) -> dict:
        """What the manifest records of this run: its world size and this store's rank."""
        return {"world_size": self.context.world_size, "rank": self.context.rank}

    def _recorded(self, extra: dict | None, serial: int) -> dict:
        return dict(extra or {}, **{RECORD: dict(self.record, commit=serial)})

    def recover(self) -> int:
        """Bring every rank's store to the common committed step (rolling back a store one step ahead, releasing
        kept files); refuse stores that do not belong together. Collective: every rank calls it at start.
        Returns the common step."""
        store, context = self.store, self.context
        recorded = store.extra.get(RECORD)
        if not context.distributed:
            if recorded is not None and recorded.get("world_size", 1) != 1:
                raise DistributedError(self._world_size_message(recorded))
            return store.step
        previous = store.manifest.get("previous")
        mine = {"path": store.path, "step": store.step, "previous": store.previous_step,
                "fingerprint": store_fingerprint(store), "recorded": recorded, "key": commit_key(store.manifest),
                "previous_key": commit_key(previous) if previous else None}
        try:
            everyone = context.all_gather_object(mine)
        except Exception as error:
            raise self._lost_rank("the recovery at start (the ranks' exchange of their steps)", error) from error
        problem = self._check(everyone)  # every rank sees the same list, so every rank raises the same error
        if problem:
            raise DistributedError(problem)
        common = min(state["key"] for state in everyone)
        if mine["key"] != common:  # one commit ahead: back to the commit every rank made
            store.rollback(store.previous_step)
        store.release_previous()
        if {key: value for key, value in (store.extra.get(RECORD) or {}).items() if key != "commit"} != self.record:
            # no files change: the step stays
            store.commit(store.step, self._recorded(store.extra, commit_key(store.manifest)[1]))
        self._barrier(f"the recovery at step {store.step}")
        return store.step

    def commit(self, step: int, extra: dict | None = None):
        """Commit ``step`` on every rank, or on none: see the module's state diagram. Collective."""
        store, context = self.store, self.context
        if not context.distributed:
            store.commit(step, extra)
            return
        extra = self._recorded(store.extra if extra is None else extra, commit_key(store.manifest)[1] + 1)
        store.sync_writes()
        self._barrier(f"the commit of step {step} (its files are written and synced on this rank)")
        store.commit(step, extra, keep_previous=True)
        self._barrier(f"the commit of step {step} (this rank has switched to it)")
        store.release_previous()

    # ------------------------------------------------------------------ helpers
    def _barrier(self, where: str):
        try:
            self.context.barrier()
        except Exception as error:
            raise self._lost_rank(where, error) from error

    def _lost_rank(self, where: str, error: Exception) -> DistributedError:
        # a rank died or stopped answering: gloo and NCCL name no rank themselves
        return DistributedError(f"{self.context.describe()}: another rank stopped during {where} ({error}). "
                                "Relaunch the same command: every rank comes back to the last step all of them "
                                "committed.")

    def _world_size_message(self, recorded: dict) -> str:
        return (f"store {self.store.path} belongs to a run on {recorded.get('world_size')} ranks (it is rank "
                f"{recorded.get('rank')}'s share), and this run has {self.context.world_size}. Relaunch with "
                f"{recorded.get('world_size')} processes (torchrun --nproc_per_node / --nnodes), or start a new "
                "run from the model.")

    def _check(self, everyone: list[dict]) -> str | None:
        """What is wrong with the ranks' stores taken together (the same answer on every rank), or None."""
        world = self.context.world_size
        fingerprints = {state["fingerprint"] for state in everyone}
        if len(fingerprints) > 1:
            listing = "; ".join(f"rank {r}: {s['path']} ({s['fingerprint']})" for r, s in enumerate(everyone))
            return (f"the ranks' stores hold different models or settings: {listing}. Every rank must train a "
                    "store of the same model, created or imported with the same options.")
        for rank, state in enumerate(everyone):
            recorded = state["recorded"]
            if recorded is None:
                continue
            if recorded.get("world_size") != world:
                return (f"rank {rank}: store {state['path']} belongs to a run on {recorded.get('world_size')} "
                        f"ranks, and this run has {world}. Relaunch with {recorded.get('world_size')} processes "
                        "(torchrun --nproc_per_node / --nnodes), or start a new run from the model.")
            if recorded.get("rank") != rank:
                return (f"rank {rank} was given store {state['path']}, which is rank {recorded.get('rank')}'s "
                        "share of the run. Give each rank its own folder (check the ranks' order, or "
                        "--node_rank on each machine).")
        common = min(state["key"] for state in everyone)
        for rank, state in enumerate(everyone):
            if state["key"] != common and state["previous_key"] != common:
                steps = ", ".join(f"rank {r} at step {s['step']}" for r, s in enumerate(everyone))
                return (f"the ranks' stores are at steps that one run cannot leave ({steps}; rank {rank} keeps "
                        f"{'no earlier step' if state['previous'] is None else 'step %d' % state['previous']}): "
                        "they do not belong to one run, or were changed by hand. Restore the folders of one "
                        "run, or start a new run from the model.")
        return None
