"""Data parallel training over ``torch.distributed`` (torchrun; gloo on CPU and Macs, NCCL on CUDA):
``finetune.py`` under torchrun trains on every rank (``training.py``); scripts that drive the engine
themselves use ``launch.open_rank_store``, ``launch.rank_share`` and ``trainable.distribute``.

* ``training.py``: ``finetune.py`` on one rank (its lock, the model's store prepared once per machine, its own
  store, agreed setup stages, rank 0's reporting, one adapter folder for LoRA, the dry run's per-rank lines).
* ``trainable.py``: the distributed step, as the engine's trainables (full weights: gradients reduced to each
  unit's owner, its update, the new forward weights broadcast; LoRA: adapter gradients all-reduced).
* ``gather.py``: one store from the ranks' stores (export, info, verify and ``offload-bitnet gather``).

* ``env.py``: the torchrun environment, ``init_distributed`` (``init_process_group`` over ``env://``; a
  single-process ``DistContext`` outside torchrun, so nothing changes without it), collectives that do nothing
  alone, and ``named_rank_errors`` so that every rank's exception reaches the user as ``rank R of N: ...``.
* ``batching.py``: ``--batch-size`` stays the sequences per optimizer step; each rank takes
  ``batch_size / (world_size x grad_accum)`` per micro-batch, ``rank_micro_batches`` says which, and
  ``global_target_tokens`` is the loss's denominator (all-reduced).
* ``sharding.py``: the owner rank of each unit's master weights and moments (contiguous ranges balanced by
  bytes), the per-rank store folders (``RUN/store.rank<R>``) and each rank's bytes on disk and per step.
* ``rank_stores.py``: ``make_rank_store``: a rank's store from the model's (every ``weights`` part, the owned
  ``shadow`` and ``optim`` parts, the run's world size and the rank recorded in the manifest).
* ``commit.py``: the two-phase commit across ranks and the recovery at start (the state diagram is there).
"""
