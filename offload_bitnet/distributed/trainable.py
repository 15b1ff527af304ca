"""The data-parallel training step: the engine's trainables (``engine/trainables.py``) with an owner-rank update.

Every rank runs the engine's step on its own micro-batches (``batching.rank_sequences``), with the loss
normalized by the step's global count of target tokens (all-reduced in ``backward_loads``, before the forward
pass), so the gradients the ranks sum are the ones one process would accumulate over all the micro-batches.

Full weights (qat, full), ``DistributedFullWeights``: after the replay of a unit on every rank, its fp32
gradients are reduced to the unit's owner (``sharding.shard_plan``: the only rank that stores its masters and
moments), one tensor at a time in sorted name order with ``dist.reduce``, so the sums are the same on every
run. The owner runs the same update as one process (``FullWeights._apply_update``, on its writer thread,
overlapping the replay of the next unit); the new forward weights (the encoded ``weights`` part) are broadcast
from the owner as one byte buffer after the *next* unit's reduce (so the update had the replay to run in),
and every rank writes them. The embedding's token gradients are gathered on its owner and added in global
micro-batch order (a sum over ranks would add them in another order). The step commits with ``RankCommit``:
every rank or none.

With 2 ranks x M micro-batches against 1 rank x 2M, each sum of two gradients is the same float either way
(``a + b == b + a``): the weights are bit-identical. With more micro-batches per rank the sums group
differently (``(g0 + g1) + (g2 + g3)``): equal within rounding.

LoRA, ``DistributedLoRA``: the adapters are small; their gradients are all-reduced (sum, sorted order) and every
rank runs the same AdamW on its copy, so every rank's adapters stay identical; each rank commits its own
adapter folder.

Every collective runs on the main thread in the same order on every rank (the writer and prefetch threads only
compute and do I/O), so the ranks can never wait on different collectives. All collectives go through
``torch.distributed`` on the process group ``env.init_distributed`` made.

Dropout masks are drawn per global micro-batch index (``StepContext.micro_offset``), so N ranks draw the masks
one process draws. Not (yet) across ranks: the quantization warm-up (``quant_mix < 1`` reads the shadow of
every block in forward, which only its owner has: refused with a message). A non-finite loss on any rank skips the step on every rank;
so does a non-finite gradient or updated weight found by an owner's update: before each broadcast of new
weights the owner says whether its update made them (``_agree_on_update``), and every rank skips the step
together (nothing commits) or, when the owner failed otherwise (a full disk), stops naming the owner.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import Counter

import torch
import torch.distributed as dist

from offload_bitnet.distributed.batching import local_target_tokens
from offload_bitnet.distributed.commit import RankCommit
from offload_bitnet.distributed.env import DistContext, DistributedError
from offload_bitnet.distributed.sharding import shard_plan
from offload_bitnet.engine.context import StepContext
from offload_bitnet.engine.stats import NonFiniteStep
from offload_bitnet.engine.step_plan import Load, StepPlan
from offload_bitnet.engine.trainables import FullWeights, HeadPass, LoRA
from offload_bitnet.engine.updates import make_update
from offload_bitnet.io.safetensors import encoded_size

HEAD_ROW_SLICES = 4  # chunked_cross_entropy's default row ranges of the head's gradient


def row_ranges(rows: int, slices: int = HEAD_ROW_SLICES) -> list[slice]:
    """The row ranges ``chunked_cross_entropy`` hands an untied head's update (the first get one row more)."""
    size, extra = divmod(rows, slices)
    bounds = [i * size + min(i, extra) for i in range(slices + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def pack_bytes(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A part's tensors, in sorted name order, as one flat uint8 buffer (one broadcast per unit, any dtype)."""
    return torch.cat([tensors[name].detach().contiguous().reshape(-1).view(torch.uint8) for name in sorted(tensors)])


def unpack_bytes(buffer: torch.Tensor, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The tensors of ``pack_bytes``, given ``{name: (shape, dtype)}``."""
    out, offset = {}, 0
    for name in sorted(shapes):
        shape, dtype = shapes[name]
        size = math.prod(shape) * dtype.itemsize
        out[name] = buffer[offset:offset + size].view(dtype).reshape(shape).clone()
        offset += size
    if offset != buffer.numel():
        raise DistributedError(f"a broadcast unit has {buffer.numel()} bytes where this rank expects {offset}")
    return out


class _RankStep:
    """What both distributed trainables share: the global token count and the agreement on a finite loss."""

    context: DistContext
    seconds: Counter  # time on this rank's main thread in each collective, over the run (for benchmarks)

    @contextlib.contextmanager
    def _timed(self, what: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - started

    def _global_tokens(self, ctx: StepContext):
        if ctx.quant_mix != 1 and self.engine.store.settings.mode == "qat" and self.engine.adapters is None:
            raise DistributedError("the quantization warm-up (--quant-warmup, quant_mix < 1) is not supported "
                                   "across ranks yet: it reads every block's shadow in forward, and only the "
                                   "block's owner has it. Train without it, or on one process.")
        with self._timed("reduce"):
            ctx.n_tokens = self.context.all_reduce_sum_int([local_target_tokens(ctx.targets)])[0]
        ctx.micro_offset = self.context.rank * len(ctx.ids)  # every rank runs as many micro-batches
        self._loss_agreed = False

    def _agree_on_loss(self, ctx: StepContext):
        """All ranks learn the step's total loss (ctx.loss becomes it), or that some rank's was not finite: then
        every rank skips the step (NonFiniteStep)."""
        failed = self._loss_agreement(ctx.loss, finite=True)
        if failed:
            raise NonFiniteStep(f"non-finite loss on {failed} of {self.context.world_size} ranks")
        ctx.loss = self._total_loss

    def _loss_agreement(self, loss: float, finite: bool) -> int:
        totals = torch.tensor([loss if finite else 0.0, 0.0 if finite else 1.0], dtype=torch.float64)
        with self._timed("reduce"):
            self.context.all_reduce_sum_(totals)
        self._loss_agreed = True
        self._total_loss = float(totals[0])
        return int(totals[1])

    def _discard_agreement(self):
        # A rank whose own loss was not finite raised before the agreement: join it, so the others learn.
        if not self._loss_agreed:
            self._loss_agreement(0.0, finite=False)


class DistributedFullWeights(_RankStep, FullWeights):
    """``FullWeights`` on one of several ranks: gradients reduced to each unit's owner, which updates it and
    broadcasts its new forward weights; the commit across ranks (see the module docstring)."""

    def __init__(self, engine, context: DistContext):
        super().__init__(engine)
        self.context = context
        self.plan = shard_plan(engine.config, context.world_size, engine.store.settings)
        self.committer = RankCommit(context, engine.store)
        self._unsent: list[str] = []  # units updated, their forward weights not yet broadcast
        self._made: dict[str, dict] = {}  # owned unit -> the new weights part its update made (until broadcast)
        self._failed: dict[str, NonFiniteStep] = {}  # owned unit -> why its update made no weights (until broadcast)
        self._shapes: dict[str, dict] = {}  # unit -> {name: (shape, dtype)} of its weights part (never changes)
        self._loss_agreed = False
        self.seconds = Counter()

    def owns(self, unit: str) -> bool:
        return self.plan.owner(unit) == self.context.rank

    # ------------------------------------------------------------------ the step
    def backward_loads(self, ctx: StepContext) -> list[Load]:
        self._global_tokens(ctx)
        self._unsent = []
        return super().backward_loads(ctx)

    def head_pass(self, plan: StepPlan, ctx: StepContext) -> HeadPass:
        head = super().head_pass(plan, ctx)
        self._plan = plan
        if head.on_weight_rows is not None:
            # The same row-range products as one process (the same bits); the update waits for the reduce.
            head.on_weight_rows = lambda rows, loss_so_far: None
        return head

    def after_loss(self, head: HeadPass, ctx: StepContext):
        self._agree_on_loss(ctx)
        self._reduce_and_update("norm", head.norm_masters, {"weight": self.engine.grad_sums.summed(head.norm_weight)},
                                head.norm_moments, ctx)
        if self.engine.head_unit == "head":
            grads = {"weight": head.weight_grad}
            self._reduce(grads, "head")
            moments = self._plan.take("head", "moments")  # planned on every rank: empty but on the owner
            if self.owns("head"):
                update = self._keeping("head", make_update(self.engine, "head", head.masters, grads, moments, ctx,
                                                           keep_masters=True))
                ranges = row_ranges(head.weight_grad.shape[0])
                for rows in ranges:
                    self.engine.writer.update("head", functools.partial(update, rows, rows == ranges[-1]), ctx.step,
                                              stealable=False)
            self._unsent.append("head")
            head.weight_grad = head.masters = head.moments = head.on_weight_rows = None  # see FullWeights.after_loss
        head.weight = None  # a tied head's gradient stays as summed until its reduce (finish)
        self._plan = None

    def update_block(self, unit: str, params: dict, state, ctx: StepContext):
        # Taken out of ``params`` (the caller's): the compute weights go now, not after the update is queued,
        # which waits while the writer's queue is full (at 7B their fp32 copy is 0.8 GB).
        summed = self.engine.grad_sums.summed
        grads = {n: summed(params.pop(n)) for n in list(params)}  # reduced as summed (exact sums: float64)
        self._reduce_and_update(unit, state, grads, None, ctx)

    def finish(self, plan: StepPlan, ctx: StepContext, grads: list, head: HeadPass, commit_extra: dict | None):
        engine = self.engine
        embed_masters, embed_moments, embed_grad = self.embed_inputs(plan, head)
        if engine.head_unit != "head":  # the tied head's part, before the token gradients
            tied = {"weight": embed_grad}
            self._reduce(tied, "embed")
            embed_grad = tied["weight"].float()  # rounded once, after the sum over ranks (exact sums: float64)
        owner = self.plan.owner("embed")
        mine = [(ctx.ids[m].reshape(-1), grads[m].reshape(-1, engine.config.dim).float()) for m in ctx.micro_range]
        gathered = [None] * self.context.world_size if self.owns("embed") else None
        with self._timed("gather"):
            dist.gather_object(mine, gathered, dst=owner)
        if self.owns("embed"):
            for rank_batches in gathered:  # global micro-batch order: rank 0's, then rank 1's, ...
                for ids, token_grads in rank_batches:
                    embed_grad.index_add_(0, ids, token_grads)
            self._apply_update("embed", embed_masters, {"weight": embed_grad}, embed_moments, ctx, inline=True)
        self._unsent.append("embed")
        self._broadcast_unsent(ctx)
        with self._timed("writes"):
            engine.writer.wait_for_updates()
            engine.writer.flush()  # every write on disk before the commit's collectives, which run here on main
        with self._timed("commit"):
            self.committer.commit(ctx.step, commit_extra)

    def discard(self):
        self._discard_agreement()
        try:
            super().discard()  # waits for the writer's queue: updates still running add to _made and _failed
        finally:
            self._made.clear()
            self._failed.clear()

    def _apply_update(self, unit, masters, grads, moments, ctx: StepContext, inline: bool = False):
        """``FullWeights._apply_update``, keeping the new weights part for the broadcast (no read of it back)."""
        update = self._keeping(unit, make_update(self.engine, unit, masters, grads, moments, ctx))
        if inline:
            self.engine.writer.make_and_write(unit, update, ctx.step)
        else:
            self.engine.writer.update(unit, update, ctx.step)

    def _keeping(self, unit: str, update):
        def update_and_keep(*args):
            try:
                parts = update(*args)
            except NonFiniteStep as reason:
                # Not the writer's failure (it would surface at this rank's next call to the writer, wherever that
                # falls between the collectives): every rank learns of it at the unit's broadcast, and skips.
                self._failed[unit] = reason
                return {}
            if "weights" in parts:  # the final call (an untied head's row ranges make it at the last one)
                self._made[unit] = parts["weights"]
            return parts
        return update_and_keep

    # ------------------------------------------------------------------ collectives
    def _reduce(self, grads: dict[str, torch.Tensor], unit: str):
        """Sum each gradient over the ranks onto ``unit``'s owner, in place (sorted names: a fixed order)."""
        owner = self.plan.owner(unit)
        for name in sorted(grads):
            if not grads[name].is_contiguous() or grads[name].dtype not in (torch.float32, torch.float64):
                grads[name] = grads[name].float().contiguous()  # float64: exact sums, reduced as they are
            with self._timed("reduce"):
                dist.reduce(grads[name], dst=owner, op=dist.ReduceOp.SUM)

    def _reduce_and_update(self, unit, masters, grads, moments, ctx: StepContext):
        """Reduce ``unit``'s gradients to its owner, which queues its update; then broadcast the units before it
        (their updates ran during this unit's replay)."""
        self._reduce(grads, unit)
        if self.owns(unit):
            self._apply_update(unit, masters, grads, moments, ctx)
        self._broadcast_unsent(ctx)
        self._unsent.append(unit)

    def _broadcast_unsent(self, ctx: StepContext):
        """Broadcast the new forward weights of the units updated so far from their owners; every other rank
        writes them as its own version for this step."""
        engine = self.engine
        for unit in self._unsent:
            owner = self.plan.owner(unit)
            failure = None
            if self.owns(unit):
                with self._timed("owner update wait"):
                    try:  # waits while its update runs; raises a failed job's error
                        engine.writer.pending_part(unit, "weights")
                        failure = self._failed.pop(unit, None)
                    except Exception as error:  # noqa: BLE001 - told to every rank first, then raised
                        failure = error
            self._agree_on_update(unit, owner, failure)
            if self.owns(unit):
                buffer = pack_bytes(self._made.pop(unit))
            else:
                shapes = self._weights_shapes(unit)
                buffer = torch.empty(sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values()),
                                     dtype=torch.uint8)
            with self._timed("broadcast"):
                dist.broadcast(buffer, src=owner)
            if not self.owns(unit):
                weights = unpack_bytes(buffer, shapes)
                ctx.add_submitted(encoded_size(weights))
                engine.resident.replace(unit, weights)
                engine.writer.write(unit, {"weights": weights}, ctx.step)
        self._unsent = []

    def _agree_on_update(self, unit: str, owner: int, failure: BaseException | None):
        """The owner of ``unit`` tells every rank whether its update made the new weights: when the update found
        a non-finite gradient or weight, every rank skips the step (NonFiniteStep; nothing is committed, as on
        one process); when it failed otherwise, the owner raises its error and every other rank stops naming it,
        instead of waiting in the broadcast until the group times out."""
        status = torch.tensor([0 if failure is None else 1 if isinstance(failure, NonFiniteStep) else 2],
                              dtype=torch.uint8)
        with self._timed("broadcast"):
            dist.broadcast(status, src=owner)
        if self.owns(unit) and failure is not None:
            raise failure
        if int(status) == 1:
            raise NonFiniteStep(f"non-finite gradient or weight in the update of {unit} (on its owner, rank "
                                f"{owner})")
        if int(status) == 2:
            raise DistributedError(f"rank {owner} failed while updating {unit}, which it owns (its own error says "
                                   "why); this rank stops with it. Fix that and run the same command again: every "
                                   "rank resumes from the last step all of them committed.")

    def _weights_shapes(self, unit: str) -> dict:
        """Names, shapes and dtypes of a unit's weights part, read once per run (the first step's version)."""
        if unit not in self._shapes:
            with self._timed("weights read"):
                current = self.engine._read(unit, "weights", will_modify=False)
            self._shapes[unit] = {name: (tuple(t.shape), t.dtype) for name, t in current.items()}
        return self._shapes[unit]


class DistributedLoRA(_RankStep, LoRA):
    """``LoRA`` on one of several ranks: adapter gradients all-reduced (sorted order), the same AdamW on every
    rank's copy."""

    def __init__(self, engine, adapters, checkpoint, context: DistContext):
        super().__init__(engine, adapters, checkpoint)
        self.context = context
        self._loss_agreed = False
        self.seconds = Counter()

    def backward_loads(self, ctx: StepContext) -> list[Load]:
        self._global_tokens(ctx)
        return super().backward_loads(ctx)

    def after_loss(self, head: HeadPass, ctx: StepContext):
        self._agree_on_loss(ctx)
        super().after_loss(head, ctx)

    def update_block(self, unit: str, params: dict, state, ctx: StepContext):
        sums = self.engine.grad_sums
        for key in sorted(k for k in params if k.endswith(".lora")):
            adapter = params[key]
            for leaf in (adapter.lora_a, adapter.lora_b):
                with self._timed("reduce"):
                    self.context.all_reduce_sum_(sums.summed_or_zeros(leaf))
        super().update_block(unit, params, state, ctx)

    def finish(self, plan: StepPlan, ctx: StepContext, grads: list, head: HeadPass, commit_extra: dict | None):
        super().finish(plan, ctx, grads, head, commit_extra)
        with self._timed("commit"):
            self.context.barrier()  # every rank committed its copy of the step's adapters

    def discard(self):
        self._discard_agreement()
        super().discard()


def distribute(engine, context: DistContext):
    """Make ``engine`` train as ``context``'s rank (its trainable becomes the distributed one). Nothing changes
    on a single process. Returns the engine."""
    if not context.distributed:
        return engine
    trainable = engine.trainable
    if isinstance(trainable, LoRA):
        engine.trainable = DistributedLoRA(engine, trainable.adapters, trainable.checkpoint, context)
    elif isinstance(trainable, FullWeights):
        engine.trainable = DistributedFullWeights(engine, context)
    else:
        raise DistributedError(f"{type(trainable).__name__} cannot train across ranks")
    return engine
