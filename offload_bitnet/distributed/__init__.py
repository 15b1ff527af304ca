"""Data parallel training over ``torch.distributed`` (torchrun; gloo on CPU and Macs, NCCL on CUDA). Work in
progress (issue 13): the step works through the engine's API (``trainable.distribute``); ``finetune.py`` is
not wired yet.

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

How it will plug into the step (for the integrator, once the engine's "trainable" interface lands):

1. Start: ``context = init_distributed(args.device, args.dist_backend)``; the trainer's body runs under
   ``named_rank_errors(context)``; only ``context.is_main`` prints progress and writes metrics.jsonl,
   status.json and the plot. Each rank opens its own store, ``rank_store_dir(run_dir, rank)``, made from the
   model by ``make_rank_store`` (every unit's ``weights``; ``shadow`` and ``optim`` of the units
   ``shard_plan(...).owner(unit) == rank``). ``RankCommit(context, store).recover()`` gives the step to
   resume from.
2. Data: every rank draws the same step batch (same seed and data position) and runs
   ``rank_sequences(batch, world_size, grad_accum, rank)``; the loss scale is ``1 / global_target_tokens``.
3. Backward, full weights (qat, full): after the replay of block i on every rank, its fp32 gradients are
   reduced to ``owner(block i)`` (``dist.reduce``, one tensor at a time in the block's sorted tensor-name
   order, the same on every rank, so the sums are repeatable); the owner runs AdamW on its shadow and
   moments, re-quantizes and re-packs, and broadcasts the new ``weights`` part from itself
   (``dist.broadcast``, same order); every rank writes that ``weights`` part, the owner also its ``shadow`` and
   ``optim``. The reduce of block i overlaps the replay of block i-1, as the writer overlaps updates today;
   the embedding, norm and head go the same way at their point of the backward.
4. LoRA: adapters are small: all-reduce their gradients (sum, fixed order), and every rank runs the same
   AdamW on its copy (identical on every rank; no broadcast needed).
5. Commit: the writer's ``store.commit(step, extra)`` becomes ``RankCommit.commit(step, extra)``: every rank
   commits the step or none does, and a relaunch after ``kill -9`` of any rank brings all back to one step.
"""
