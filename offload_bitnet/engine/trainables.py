"""What a training step trains: the one ``Trainable`` interface and its two implementations, ``FullWeights``
(every unit's weights, qat or full: AdamW on disk, committed with the store) and ``LoRA`` (adapters in RAM on a
frozen base, committed to an ``AdapterCheckpoint``). The engine's step (``streaming.py``) runs the compute, the
same for both: forward, the cross-entropy, each block's replay; it asks the trainable what to load, how to make a
unit's parameters and which of them get gradients, and hands it the gradients to update and the commit.

The interface, in the order a step calls it:

- ``backward_loads(ctx)``: the backward part of the step plan (``step_plan.Load`` per unit and kind);
- ``head_pass(plan, ctx)``: the final norm and head for the cross-entropy (``HeadPass``: which get gradients,
  and an optional row-range callback that starts the head's update during the cross-entropy);
- ``after_loss(head, ctx)``: the updates of what the cross-entropy's backward reached (the final norm);
- ``block_params(unit, plan, ctx)`` -> ``(params, state)``: a block's parameters for its replay, with the
  leaves that get gradients requiring grad; ``update_block(unit, params, state, ctx)``: its update from them;
- ``finish(plan, ctx, grads, head, commit_extra)``: the last update (the embedding) and the step's commit;
- ``discard()``: undo a step abandoned half-way; ``forward_params(layer, tensors)``: a block's forward tensors
  with what the trainable adds (the adapters); ``committed_step``.

How later work plugs in behind it, without a change to the engine's step:

- several ranks (an owner-rank update): a trainable whose ``update_block`` reduces the block's gradients to the
  rank that owns the block; the owner runs the same AdamW (``updates.make_update``, or ``AdapterSet.update``)
  and broadcasts the new forward weights, which the others take in their next ``forward`` load; ``finish``
  commits on the owners only. Loads of masters and moments are then planned by ``backward_loads`` on the
  owner only (other ranks plan ``frozen`` loads, as LoRA does).
- a second compute backend (MLX, ``engine.backend``): the trainables need no change. Their leaves stay torch
  tensors that require grad; the backend makes its own arrays from them for each block call and sums its
  gradients into their ``.grad``, as autograd does; every AdamW (``updates.make_update``, and the adapters'
  through ``AdapterSet.update``) is the backend's ``adamw_update``; the step plan, the prefetch, the writer and
  the commit are unchanged.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from offload_bitnet.engine.context import StepContext
from offload_bitnet.engine.stats import NonFiniteStep, check_finite
from offload_bitnet.engine.step_plan import Load, StepPlan
from offload_bitnet.engine.updates import make_update
from offload_bitnet.model.lora import AdapterCheckpoint, AdapterSet
from offload_bitnet.store.units import block_index, block_unit, unit_shapes


@dataclass
class HeadPass:
    """The final norm and head as the cross-entropy uses them."""

    norm_weight: torch.Tensor                  # requires grad when the norm is trained
    weight: torch.Tensor | None                # the head in the compute dtype (None once the cross-entropy is done)
    weight_grad: torch.Tensor | None = None    # the head's gradient buffer, or None when the head is frozen
    on_weight_rows: Callable | None = None     # the cross-entropy's row-range callback (an untied head's update)
    masters: dict | None = None                # for the trainable: what the head's update starts from
    moments: dict | None = None
    norm_masters: dict | None = None
    norm_moments: dict | None = None


class Trainable:
    """What a step trains and how (see the module docstring for the order of the calls)."""

    adapters: AdapterSet | None = None
    writes_store = False  # whether its updates write the store (the engine then runs a writer thread)

    def check_can_train(self):
        """Raise RuntimeError when this engine cannot train (opened read-only, no place to commit)."""

    @property
    def committed_step(self) -> int:
        raise NotImplementedError

    def uses_dropout(self) -> bool:
        """Whether blocks draw random numbers beside the engine's own dropout (the adapters' dropout)."""
        return False

    def forward_params(self, layer: int, tensors: dict) -> dict:
        return tensors

    def backward_loads(self, ctx: StepContext) -> list[Load]:
        raise NotImplementedError

    def head_pass(self, plan: StepPlan, ctx: StepContext) -> HeadPass:
        raise NotImplementedError

    def after_loss(self, head: HeadPass, ctx: StepContext):
        head.weight = None

    def block_params(self, unit: str, plan: StepPlan, ctx: StepContext) -> tuple[dict, object]:
        raise NotImplementedError

    def update_block(self, unit: str, params: dict, state, ctx: StepContext):
        raise NotImplementedError

    def finish(self, plan: StepPlan, ctx: StepContext, grads: list, head: HeadPass, commit_extra: dict | None):
        raise NotImplementedError

    def discard(self):
        raise NotImplementedError


class FullWeights(Trainable):
    """Every unit's weights (qat: ternary blocks with 16-bit shadows; full: 16-bit weights), AdamW moments on
    disk, each update on the writer thread, committed with the store."""

    writes_store = True

    def __init__(self, engine):
        self.engine = engine

    def check_can_train(self):
        if self.engine.writer is None:
            raise RuntimeError("the store was opened read-only; open it writable to train")

    @property
    def committed_step(self) -> int:
        return self.engine.store.step

    def backward_loads(self, ctx: StepContext) -> list[Load]:
        """Blocks' moments are left to their updates on the writer thread (read when the update runs, so queued
        updates hold no moments). The embedding's update ends the step on this thread: its moments load with it,
        and then (untied) its zeroed gradient, into which the token gradients are added. An untied head's moments
        come as a load of their own after its masters: its update starts during the cross-entropy, which
        overlaps their load."""
        engine, mix = self.engine, ctx.quant_mix
        loads = [Load("norm", "masters", engine.update_job("norm", mix, with_moments=True))]
        if engine.head_unit == "head":
            loads += [Load("head", "masters", engine.update_job("head", mix, with_moments=False)),
                      Load("head", "moments", engine.moments_job("head"))]
        else:
            loads.append(Load("embed", "masters", engine.update_job("embed", mix, with_moments=True)))
        loads += [Load(block_unit(i), "masters", engine.update_job(block_unit(i), mix, with_moments=False))
                  for i in reversed(range(engine.config.n_layers))]
        if engine.head_unit == "head":
            shape = unit_shapes(engine.config, "embed")["weight"]
            loads += [Load("embed", "masters", engine.update_job("embed", mix, with_moments=True)),
                      Load("embed", "grad", lambda: engine.layout.empty(shape, torch.float32, engine.device).zero_())]
        return loads

    def head_pass(self, plan: StepPlan, ctx: StepContext) -> HeadPass:
        engine = self.engine
        norm_masters, norm_moments = plan.take("norm", "masters")
        head_unit = engine.head_unit
        masters, moments = plan.take(head_unit, "masters")
        weight = masters["weight"].to(engine.dtype)
        sums = engine.grad_sums
        head = HeadPass(norm_weight=sums.track(norm_masters["weight"].requires_grad_(True)), weight=weight,
                        weight_grad=engine.layout.empty(weight.shape, sums.buffer_dtype(weight.dtype), weight.device),
                        masters=masters, moments=moments, norm_masters=norm_masters, norm_moments=norm_moments)
        if head_unit == "head":
            head.on_weight_rows = self._head_row_updates(head, plan, ctx)
        return head

    def _head_row_updates(self, head: HeadPass, plan: StepPlan, ctx: StepContext):
        """An untied head's update starts a row range at a time, while the cross-entropy still computes."""
        # The callback holds the tensors, not ``head``: head -> callback -> head would be a reference cycle, and
        # the head's buffers would wait for the garbage collector instead of going back to the pool at once.
        masters, weight_grad = head.masters, head.weight_grad
        update = None

        def update_head_rows(rows: slice, loss_so_far: float):
            nonlocal update
            if not math.isfinite(ctx.loss + loss_so_far):
                raise NonFiniteStep(f"non-finite loss ({ctx.loss + loss_so_far})")
            if update is None:  # its moments were loaded during the cross-entropy's forward
                update = make_update(self.engine, "head", masters, {"weight": weight_grad},
                                     plan.take("head", "moments"), ctx, keep_masters=True)
            final = rows.stop == weight_grad.shape[0]
            # Only the writer runs them, one after another (each range's update is cheap; the last makes the parts).
            self.engine.writer.update("head", functools.partial(update, rows, final), ctx.step, stealable=False)
        return update_head_rows

    def after_loss(self, head: HeadPass, ctx: StepContext):
        self._apply_update("norm", head.norm_masters, {"weight": self.engine.grad_sums.summed(head.norm_weight)},
                           head.norm_moments, ctx)
        head.weight = None
        if self.engine.head_unit == "embed":
            head.weight_grad = head.weight_grad.float()
        else:
            # An untied head's update holds what it needs; the step must not hold its fp32 masters (0.5 GB at 7B)
            # through the blocks' backward.
            head.weight_grad = head.masters = head.moments = head.on_weight_rows = None

    def block_params(self, unit: str, plan: StepPlan, ctx: StepContext) -> tuple[dict, object]:
        engine = self.engine
        masters, _ = plan.take(unit, "masters")
        update_masters = masters
        if engine.shadow_in_update(unit, ctx.quant_mix):
            weights = masters  # the weights part: compute weights unpacked from it; the update reads the shadow
            if engine.lazy(unit):
                leaves = engine.lazy_weights(unit, engine.layout.param_names(weights), lambda name: (
                    engine.layout.forward_tensor(weights, name, engine.dtype, engine.device)), keep=ctx.keep,
                    requires_grad=True)
            else:
                leaves = engine.layout.forward_tensors(unit, weights, engine.dtype, engine.device)
            for leaf in leaves.values():
                if isinstance(leaf, torch.Tensor):
                    leaf.requires_grad_()
            update_masters = {name: None if engine.layout.is_ternary(unit, name) else leaf
                              for name, leaf in leaves.items()}
        elif engine.lazy(unit):
            leaves = engine.lazy_weights(unit, list(masters), lambda name: engine.compute_weights(
                unit, {name: masters[name]}, ctx.quant_mix)[name], keep=ctx.keep, requires_grad=True)
            for leaf in leaves.values():
                if isinstance(leaf, torch.Tensor):
                    leaf.requires_grad_()
        else:
            leaves = {n: t.requires_grad_() for n, t in engine.compute_weights(unit, masters, ctx.quant_mix).items()}
        for leaf in leaves.values():
            engine.grad_sums.track(leaf)
        return leaves, update_masters

    def update_block(self, unit: str, params: dict, state, ctx: StepContext):
        # Straight-through: dL/dW_q is the gradient of the shadow weight.
        # Taken out of ``params`` (the caller's): the compute weights go now, not after the update is queued,
        # which waits while the writer's queue is full (at 7B their fp32 copy is 0.8 GB).
        summed = self.engine.grad_sums.summed
        grads_by_name = {n: summed(params.pop(n)).float() for n in list(params)}
        self._apply_update(unit, state, grads_by_name, None, ctx)

    def embed_inputs(self, plan: StepPlan, head: HeadPass) -> tuple[dict, dict, torch.Tensor]:
        """The embedding's masters, moments and gradient buffer: its own loads (untied), or the tied head's."""
        if self.engine.head_unit == "head":
            masters, moments = plan.take("embed", "masters")
            return masters, moments, plan.take("embed", "grad")
        return head.masters, head.moments, head.weight_grad

    def finish(self, plan: StepPlan, ctx: StepContext, grads: list, head: HeadPass, commit_extra: dict | None):
        """Embedding: scatter the token gradients (plus the tied head's gradient) and update; then commit."""
        engine = self.engine
        embed_masters, embed_moments, embed_grad = self.embed_inputs(plan, head)
        for m in ctx.micro_range:
            embed_grad.index_add_(0, ctx.ids[m].reshape(-1), grads[m].reshape(-1, engine.config.dim).float())
        # The last update runs here (nothing else is left to compute); the others ran on the writer thread, and the
        # step is complete (or found non-finite) once they all have.
        self._apply_update("embed", embed_masters, {"weight": embed_grad}, embed_moments, ctx, inline=True)
        engine.writer.wait_for_updates()
        engine.writer.commit(ctx.step, commit_extra)

    def _apply_update(self, unit, masters, grads, moments, ctx: StepContext, inline: bool = False):
        """AdamW on ``masters`` and the write of the result, so the caller must not touch these tensors again.

        The update runs on the writer thread, beside the compute of the next unit (``inline``: here). ``masters``
        may be 16-bit (the update makes fp32 copies); ``moments`` None: the update reads them."""
        update = make_update(self.engine, unit, masters, grads, moments, ctx)
        if inline:
            self.engine.writer.make_and_write(unit, update, ctx.step)
        else:
            self.engine.writer.update(unit, update, ctx.step)

    def discard(self):
        """Drop the abandoned step's written files: the store stays at its committed step."""
        error = self.engine.writer.discard()
        if error is not None and not isinstance(error, NonFiniteStep):
            raise error
        self.engine.store.remove_uncommitted_files()


class LoRA(Trainable):
    """LoRA adapters (``AdapterSet``, in RAM) on a frozen, read-only base: every unit loads its forward tensors
    only, the adapters are updated block by block on the main thread, and the step commits to ``checkpoint``
    (the caller's: the engine does no adapter file I/O). Without a checkpoint it only applies the adapters."""

    def __init__(self, engine, adapters: AdapterSet, checkpoint: AdapterCheckpoint | None = None):
        self.engine, self.adapters, self.checkpoint = engine, adapters, checkpoint

    def check_can_train(self):
        if self.checkpoint is None:
            raise RuntimeError("these adapters were opened for evaluation only: training them needs an "
                               "adapter_checkpoint (EngineOptions) to commit each step to")

    @property
    def committed_step(self) -> int:
        return self.adapters.step

    def uses_dropout(self) -> bool:
        return self.adapters.lora.dropout > 0

    def forward_params(self, layer: int, tensors: dict, trainable: bool = False) -> dict:
        return {**tensors, **self.adapters.block_adapters(layer, self.engine.device, trainable)}

    def backward_loads(self, ctx: StepContext) -> list[Load]:
        engine = self.engine
        units = ["norm", engine.head_unit] + [block_unit(i) for i in reversed(range(engine.config.n_layers))]
        return [Load(unit, "frozen", engine.forward_job(unit, ctx.quant_mix, ctx.keep)) for unit in units]

    def head_pass(self, plan: StepPlan, ctx: StepContext) -> HeadPass:
        norm = plan.take("norm", "frozen")
        head = plan.take(self.engine.head_unit, "frozen")
        return HeadPass(norm_weight=norm["weight"].requires_grad_(False), weight=head["weight"].to(self.engine.dtype))

    def block_params(self, unit: str, plan: StepPlan, ctx: StepContext) -> tuple[dict, object]:
        frozen = plan.take(unit, "frozen")
        params = self.forward_params(block_index(unit), frozen, trainable=True)
        for key in params:
            if key.endswith(".lora"):
                self.engine.grad_sums.track(params[key].lora_a)
                self.engine.grad_sums.track(params[key].lora_b)
        return params, None

    def update_block(self, unit: str, params: dict, state, ctx: StepContext):
        layer = block_index(unit)
        adapters = {k: v for k, v in params.items() if k.endswith(".lora")}
        summed = self.engine.grad_sums.summed
        for key, adapter in adapters.items():
            check_finite(unit, key, summed(adapter.lora_a), summed(adapter.lora_b))
        self.adapters.update(layer, adapters, ctx.step, ctx.optim, ctx.lr, adamw=self.engine.backend.adamw_update,
                             grad_of=summed)
        for key in adapters:
            name = key[: -len(".lora")]
            check_finite(unit, name, *self.adapters.weights[(layer, name)].values(),
                         what="adapter weight after the update")

    def finish(self, plan: StepPlan, ctx: StepContext, grads: list, head: HeadPass, commit_extra: dict | None):
        self.checkpoint.commit(self.adapters, ctx.step, commit_extra)

    def discard(self):
        """Back to the adapters of the last commit (updates of the abandoned step changed them in place)."""
        self.adapters = self.checkpoint.restore(self.engine.config, self.adapters.lora)
