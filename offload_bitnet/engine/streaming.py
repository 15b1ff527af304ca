"""The streaming engine: forward block by block, replay each block in backward, update it, write it back.

One optimizer step over G micro-batches (layer-major)::

    embed ──> block 0 ──> ... ──> block L-1 ──> norm+head: loss, dL/dh
      all G micro-batches pass through a block while it is loaded; each block's input is stashed
    head update <── block L-1 replay+AdamW <── ... <── block 0 replay+AdamW <── embedding update

Each block is read once in forward (the ``weights`` part only) and once in backward (weights, shadow and
optimizer moments), whatever G is. Three threads share the work:

- main: the compute (forward, replay, backward) and the embedding's update, which ends the step;
- prefetch: loads one unit ahead, in one stream for both passes, so the head loads while the last blocks
  run forward. The stream is the step plan (``step_plan.py``): built once per step, each load named by unit
  and kind, and taken by name (``StepPlan.take``), so a step that disagrees with its plan fails loudly;
- writer: each unit's AdamW update (reading its moments then, so a queued update holds none), the write of
  the new version, and the commit. When its queue is full, main runs the oldest queued update itself rather
  than wait. Until a write lands, reads of that unit are served from memory. An untied head's update starts
  inside the cross-entropy, a row range at a time as its gradient rows are final (writer-only jobs, on copies
  of the rows the cross-entropy still reads), so it is mostly done before the first block's update arrives.

Memory stays a few units whatever the depth: the queue holds one update, loads run one unit ahead, buffers
come from a pool that reuses them (``buffers.py``), and the replay's projection memos (``model.ProjectionMemo``,
which spare the replay its matmuls) are capped at two blocks' worth. Within a unit it stays a few
projections: updates run one tensor at a time, a ternary block's backward computes from its packed weights
(the update reads the shadow itself), and blocks above ``dense_block_bytes`` make each projection only while
a matmul needs it (``model.LazyWeight``). Forward parts may stay resident across steps (``resident_bytes``).

What is trained is a plug-in (``trainables.py``: full weights, or LoRA adapters on a frozen base): it plans the
backward loads, makes each unit's parameters, runs the updates and the commit; this module runs the compute,
the same for both. Per-step values (lr, optimizer settings, quantization mix, bytes submitted) live in the
step's ``StepContext``, never on the engine. The engine knows scheduling, prefetch and RNG replay, nothing
about file formats (LoRA adapters come in RAM and commit to their owner's ``AdapterCheckpoint``).

The compute itself (block forward, the replay's backward, the head's cross-entropy, AdamW on one tensor) goes
through the engine's backend (``backend.py``), picked once from ``EngineOptions.device``: torch, or ``"mlx"``
(Apple MLX), which evaluates its lazy arrays before handing any tensor back, so none of the scheduling here
differs between the two.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from offload_bitnet.io.buffers import BufferPool
from offload_bitnet.io.faults import fault_point
from offload_bitnet.store.layout import Layout
from offload_bitnet.model.lora import AdapterCheckpoint, AdapterSet, LoRAConfig
from offload_bitnet.model.loss import IGNORE_INDEX, chunked_cross_entropy, shift_labels
from offload_bitnet.model.block import DENSE_BLOCK_BYTES, is_lazy_block, lazy_weights, rope_tables
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.units import block_index, block_unit, is_block
from offload_bitnet.engine.backend import make_backend
from offload_bitnet.engine.grad_sums import grad_sums
from offload_bitnet.engine.context import StepContext, check_quant_mix
from offload_bitnet.engine.stats import NonFiniteStep, StepStats, peak_rss_bytes
from offload_bitnet.engine.step_plan import Load, StepPlan
from offload_bitnet.engine.streams import ActivationStash, Prefetcher, ResidentWeights, WriteBehind
from offload_bitnet.engine.trainables import FullWeights, LoRA, Trainable
from offload_bitnet.model.ternary import quantize_weight

def default_compute_dtype(device) -> torch.dtype:
    """fp32 on CPU (16-bit matmul is far slower there), bf16 on CUDA and MPS."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def default_pool_bytes(config, dtype: torch.dtype, dense_block_bytes: int = DENSE_BLOCK_BYTES) -> int:
    """``EngineOptions.pool_bytes`` when None: two units' worth of fp32 work (a dense block's compute weights, or
    a lazy block's largest projection, or the embedding), at least 1 GiB (the plan predicts with it too)."""
    if is_lazy_block(config, dtype, dense_block_bytes):
        block = max(o * i for o, i in config.projection_shapes.values()) * 4
    else:
        block = config.block_param_count() * torch.empty((), dtype=dtype).element_size()
    # At least 1 GiB: a small model's whole step then stays in reused buffers, as with no bound at all.
    return max(1 << 30, 2 * max(block, config.vocab_size * config.dim * 4))


# Blocks whose fp32 gradients are at least this large hand each update straight to the writer instead of queueing
# it: a queued update holds them (0.8 GB at 7B), and at that size the writer is the bottleneck, so the queue
# bought no time (bench/scale.py 7b on 2 cores: peak RSS 8.13 -> 7.50 GiB, steps 548 / 537 -> 498 / 517 s).
HAND_OFF_GRAD_BYTES = 512 << 20


def default_pending_writes(config) -> int:
    """``EngineOptions.max_pending_writes`` when None: 1 queued update, or 0 (a hand-off) for big blocks."""
    return 0 if config.block_param_count() * 4 >= HAND_OFF_GRAD_BYTES else 1


@dataclass
class EngineOptions:
    """Knobs of the streaming engine."""

    device: str = "cpu"  # a torch device, or "mlx": the block math in Apple MLX (engine.backend.MLXBackend)
    compute_dtype: torch.dtype | None = None
    dropout: float = 0.0
    seed: int = 0
    activation_budget_bytes: int = 1 << 30
    # Of that budget, RAM for projection outputs kept from forward so the replay skips their matmuls (see
    # model.ProjectionMemo); blocks beyond it are replayed in full. None: as much as two blocks' fp32 weights,
    # a cap that does not grow with depth (peak memory stays a few blocks).
    memo_budget_bytes: int | None = None
    ce_chunk_tokens: int = 1024
    # RAM for forward parts (packed projections, norms, embedding, head) kept across steps, as read (see
    # streams.ResidentWeights): with room for all of them, forward reads nothing after the first step and a
    # LoRA base is read once per run. 0: off (every step reads them). A budget of its own, beside the
    # activation budget, so that turning it on never makes block inputs spill.
    resident_bytes: int = 0
    # Bytes the engine's BufferPool may hold before it releases unused buffers (reuse spares page faults; see
    # buffers.py). None: two units' worth of fp32 work (a dense block's compute weights, or the embedding), at
    # least 1 GiB; not a fixed share of RAM, which at 7B let 6 GB of buffers into the peak.
    pool_bytes: int | None = None
    # Blocks whose dense compute weights (fp32 on CPU) are larger than this are unpacked, computed and freed
    # one projection at a time, in forward and backward (``model.LazyWeight``): memory then stays a few
    # projections, not a few blocks (a 70B block is 3.4 GB in fp32). Smaller blocks are made dense once per
    # pass, on the prefetch thread, which overlaps the compute (the rule: ``model.is_lazy_block``).
    dense_block_bytes: int = DENSE_BLOCK_BYTES
    prefetch_depth: int = 1
    max_pending_writes: int | None = None  # updates queued for the writer; None: default_pending_writes
    # Sum the micro-batches' gradients of each weight in float64 (engine.grad_sums.ExactSums): exact, so any
    # order gives the same sum and N data-parallel ranks x G micro-batches train bit for bit what one process
    # trains with N x G; a block's summed gradients then take 8 bytes per parameter instead of 4.
    exact_grad_sums: bool = False
    optim: AdamWConfig = field(default_factory=AdamWConfig)
    # LoRA: train (or, without a checkpoint, apply) the in-RAM ``adapters`` on a frozen, read-only base, each
    # step committed to ``adapter_checkpoint``, whose owner made both (``AdapterCheckpoint.restore``).
    adapters: AdapterSet | None = None
    adapter_checkpoint: AdapterCheckpoint | None = None
    # The same, made here from a folder: ``lora`` for fresh adapters, resumed from ``adapter_dir`` when it holds a
    # commit (a shorthand for the two fields above; ``adapter_base``: adapter_config.json's
    # base_model_name_or_path, default the store).
    lora: LoRAConfig | None = None
    adapter_dir: str | None = None
    adapter_base: str | None = None
    scratch_dir: str | None = None      # where activations beyond the budget spill (default STORE/scratch)


class StreamingEngine:
    """Train or evaluate a model held in a ``BlockStore``, one unit in memory at a time."""

    def __init__(self, store: BlockStore, options: EngineOptions | None = None):
        self.store = store
        self.options = options or EngineOptions()
        # The compute backend, chosen once here (the step's scheduling is the same for all; see backend.py).
        self.backend = make_backend(self.options.device)
        self.device = self.backend.torch_device
        self.dtype = self.options.compute_dtype or default_compute_dtype(self.device)
        if self.options.exact_grad_sums and self.backend.name != "torch":
            raise ValueError(f"exact gradient sums (--exact-grad-sums) add in float64, which the {self.backend.name} "
                             "backend does not compute on this device: train without it, or on --device cpu/cuda")
        self.grad_sums = grad_sums(self.options.exact_grad_sums)
        self.config = store.config
        self.pool = BufferPool(self.options.pool_bytes if self.options.pool_bytes is not None
                               else self._default_pool_bytes())
        self.layout = Layout(store.settings, self.pool)
        self.quantize = 1.0 if store.settings.mode == "qat" else 0.0
        self.head_unit = "embed" if self.config.tie_embeddings else "head"
        self.trainable = self._make_trainable()
        self.step = self.trainable.committed_step
        self.prefetcher = Prefetcher(self.options.prefetch_depth)
        self.writer = None
        if store.writable and self.trainable.writes_store:
            store.check_free_space()
            pending = self.options.max_pending_writes
            self.writer = WriteBehind(store, default_pending_writes(self.config) if pending is None else pending)
        # Spilled activations go beside the adapters in LoRA runs: the base store stays untouched and shareable.
        scratch = self.options.scratch_dir or os.path.join(store.path, "scratch")
        memo_budget = self.options.memo_budget_bytes
        if memo_budget is None:
            memo_budget = 2 * 4 * self.config.block_param_count()
        self.stash = ActivationStash(self.options.activation_budget_bytes, scratch, memo_budget)
        self.resident = ResidentWeights(self.options.resident_bytes)

    def _make_trainable(self) -> Trainable:
        options = self.options
        adapters, checkpoint = options.adapters, options.adapter_checkpoint
        if adapters is None and options.lora is not None:
            if not options.adapter_dir:
                raise ValueError("LoRA training needs an adapter_dir to save the adapters in")
            checkpoint = AdapterCheckpoint(options.adapter_dir, options.adapter_base or self.store.path)
            adapters = checkpoint.restore(self.config, options.lora)
        elif adapters is None and checkpoint is not None:
            raise ValueError("EngineOptions.adapter_checkpoint needs the adapters it commits (adapters=...)")
        return FullWeights(self) if adapters is None else LoRA(self, adapters, checkpoint)

    @property
    def adapters(self) -> AdapterSet | None:
        """The LoRA adapters this engine applies (and trains), or None."""
        return self.trainable.adapters

    @adapters.setter
    def adapters(self, adapters: AdapterSet | None):
        # For callers that choose the adapters after opening the engine; the checkpoint, if any, stays.
        checkpoint = getattr(self.trainable, "checkpoint", None)
        self.trainable = FullWeights(self) if adapters is None else LoRA(self, adapters, checkpoint)

    def _default_pool_bytes(self) -> int:
        return default_pool_bytes(self.config, self.dtype, self.options.dense_block_bytes)

    # ------------------------------------------------------------------ loading
    def _read(self, unit: str, part: str, will_modify: bool = True):
        """A part's newest version. ``will_modify``: the caller may change the tensors in place (updates do; the
        forward pass does not, and may use a pending write's tensors as they are)."""
        if self.writer is not None:
            pending = self.writer.pending_part(unit, part)
            if pending is not None and not will_modify:
                return pending
            if pending is not None:
                # A copy: the caller updates it in place while the writer may still serialize the original.
                return {name: self.pool.copy(tensor) for name, tensor in pending.items()}
        if part == "optim" and not self.store.has_part(unit, part):
            return None
        if part != "weights":
            return self.store.read(unit, part, self.pool)
        kept = self.resident.get(unit)
        if kept is not None:
            return kept if not will_modify else {name: self.pool.copy(tensor) for name, tensor in kept.items()}
        # Kept tensors live for the run: plain memory, not the pool's (whose buffers are recycled per unit).
        tensors = self.store.read(unit, part, None if self.resident.budget_bytes > 0 else self.pool)
        self.resident.offer(unit, tensors)
        if will_modify and self.resident.get(unit) is tensors:
            return {name: self.pool.copy(tensor) for name, tensor in tensors.items()}
        return tensors

    def _needs_shadow(self, unit: str) -> bool:
        return self.store.settings.mode == "qat" and is_block(unit)

    def shadow_in_update(self, unit: str, quant_mix: float) -> bool:
        """Whether a ternary block's backward computes from its packed weights and leaves the 16-bit shadow to
        the update, which reads it on the writer thread (as it reads the moments): at full quantization the
        unpacked weights are the quantized shadow, bit for bit, so neither the main thread nor a queued update
        holds the shadow (at 7B that is 0.4 GB per block in flight)."""
        return self._needs_shadow(unit) and quant_mix == 1

    def compute_weights(self, unit: str, masters: dict, quant_mix: float) -> dict[str, torch.Tensor]:
        """Compute tensors from masters (fp32, or 16-bit shadows): fake-quantized (mixed by ``quant_mix``)
        ternary projections."""
        tensors = {}
        for name, master in masters.items():
            weight = master
            if self.layout.is_ternary(unit, name):
                quantized = quantize_weight(master, out=self.layout.empty(master.shape, torch.float32, master.device))
                weight = quantized if quant_mix == 1 else master.float() + quant_mix * (quantized - master)
            tensors[name] = weight.to(self.dtype if weight.dim() >= 2 else torch.float32)
        return tensors

    def lazy(self, unit: str) -> bool:
        """Whether a unit's projections are made one at a time (``model.LazyWeight``) rather than all at once:
        blocks whose dense compute weights exceed ``dense_block_bytes``."""
        return is_block(unit) and is_lazy_block(self.config, self.dtype, self.options.dense_block_bytes)

    def lazy_weights(self, unit: str, names, make_one, keep: bool, requires_grad: bool = False) -> dict:
        """``{name: tensor}`` with each projection a LazyWeight of ``make_one(name)``; norms made at once."""
        return lazy_weights(self.config, names, make_one, keep, requires_grad)

    def forward_job(self, unit: str, quant_mix: float = 1.0, keep: bool = False):
        """Load what forward needs: the ``weights`` part only (the shadow too while quantization warms up).
        ``keep``: the step has several micro-batches (lazy projections are made once per pass, see lazy)."""
        def job():
            fault_point("prefetch")
            weights = self._read(unit, "weights", will_modify=False)
            if unit == "embed":
                # As stored: a lookup converts only the rows it gathers (``_embed``), not the whole table.
                return {"weight": weights["weight"].to(self.device)}
            lazy = self.lazy(unit)
            if quant_mix != 1 and self._needs_shadow(unit):
                masters = self.layout.masters(unit, weights, self._read(unit, "shadow", will_modify=False),
                                              self.device, None if lazy else torch.float32)
                if lazy:
                    return self.lazy_weights(unit, list(masters), lambda name: self.compute_weights(
                        unit, {name: masters[name]}, quant_mix)[name], keep)
                return self.compute_weights(unit, masters, quant_mix)
            if lazy:
                return self.lazy_weights(unit, self.layout.param_names(weights), lambda name: self.layout.forward_tensor(
                    weights, name, self.dtype, self.device), keep)
            return self.layout.forward_tensors(unit, weights, self.dtype, self.device)
        return job

    def _embed(self, input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Embedding lookup in the compute dtype (the same values as converting the table first)."""
        return F.embedding(input_ids, table).to(self.dtype)

    def update_job(self, unit: str, quant_mix: float, with_moments: bool = True):
        """Load what the backward pass needs of a unit, as ``(masters, moments)``: its masters (ternary blocks:
        the 16-bit shadows, which the backward pass only quantizes; a queued update then holds half the bytes)
        and its moments (None: its update reads them)."""
        def job():
            weights = self._read(unit, "weights")
            if self.shadow_in_update(unit, quant_mix):
                return weights, None  # the weights part as it is: the backward pass makes the compute weights
            shadow = self._read(unit, "shadow") if self._needs_shadow(unit) else None
            # As stored where the update converts them (16-bit shadows; lazy blocks make compute weights one at
            # a time), else fp32.
            as_stored = shadow is not None or self.lazy(unit)
            masters = self.layout.masters(unit, weights, shadow, self.device, None if as_stored else torch.float32)
            return masters, self._optim_part(unit) if with_moments else None
        return job

    def moments_job(self, unit: str):
        """Load a unit's moments alone (an untied head's, whose update starts during the cross-entropy)."""
        return lambda: self._optim_part(unit)

    def _read_stored(self, unit: str, part: str):
        """A part as the store has it, for an update (on the writer thread, or on main when it takes a queued
        update over): every earlier write of the unit is in the store by then. Each tensor is read when the
        update asks for it (``BlockStore.read_lazily``): an update holds one projection's old version at a time."""
        return self.store.read_lazily(unit, part, self.pool)

    def _optim_part(self, unit: str, stored: bool = False) -> dict:
        """A unit's moments as stored (decoded one tensor at a time by its update); ``{}`` before the first
        update. ``stored``: as the store has them, not as a pending write has them (for the writer thread,
        where every earlier write already is in the store)."""
        if stored:
            part = self._read_stored(unit, "optim") if self.store.has_part(unit, "optim") else None
        else:
            part = self._read(unit, "optim")
        return part or {}

    def _block_generator(self, step: int, micro: int, layer: int):
        if self.options.dropout > 0 or self.trainable.uses_dropout():
            return self.backend.dropout_rng(self.options.seed, step, micro, layer)
        return None

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, quant_mix: float = 1.0) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, dim]``, streaming every block once. ``quant_mix`` (qat): see
        ``train_step``."""
        quant_mix = check_quant_mix(quant_mix)
        input_ids = input_ids.to(self.device)
        cos, sin = rope_tables(self.config, torch.arange(input_ids.shape[1], device=self.device), self.dtype)
        units = ["embed"] + [block_unit(i) for i in range(self.config.n_layers)] + ["norm"]
        x = None
        for unit, tensors in zip(units, self.prefetcher.stream(self.forward_job(u, quant_mix) for u in units)):
            if unit == "embed":
                x = self._embed(input_ids, tensors["weight"])
            elif unit == "norm":
                x = self.backend.rms_norm(x, tensors["weight"], self.config.norm_eps)
            else:
                params = self.trainable.forward_params(block_index(unit), tensors)
                x = self.backend.block_forward(params, x, self.config, cos, sin, quantize=self.quantize * quant_mix)
        return x

    def _head_weight(self, quant_mix: float) -> torch.Tensor:
        return self.forward_job(self.head_unit, quant_mix)()["weight"].to(self.dtype)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, quant_mix: float = 1.0) -> torch.Tensor:
        """fp32 logits ``[B, T, vocab]``."""
        hidden = self.hidden_states(input_ids, quant_mix)
        return self.backend.linear(hidden, self._head_weight(quant_mix)).float()

    @torch.no_grad()
    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, quant_mix: float = 1.0) -> float:
        """Mean next-token cross-entropy (labels default to the inputs; -100 is ignored)."""
        targets = shift_labels(input_ids, labels).to(self.device)
        count = int((targets != IGNORE_INDEX).sum())
        if count == 0:
            raise ValueError("no token has a target: sequences need at least 2 tokens and labels other than -100")
        hidden = self.hidden_states(input_ids, quant_mix)
        total, _ = chunked_cross_entropy(hidden, self._head_weight(quant_mix), targets, self.options.ce_chunk_tokens,
                                         1.0, backward=False)
        return total / count

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor | None]], lr: float | None = None,
                   commit_extra: dict | None = None, quant_mix: float | None = None,
                   weight_decay: float | None = None) -> StepStats:
        """One AdamW step over ``micro_batches`` [(input_ids, labels or None)], streamed layer-major.

        ``lr`` and ``weight_decay`` override the configured AdamW values for this step (schedules).
        ``quant_mix`` (qat only) in [0, 1]: the weights and activations the step sees are
        ``W + quant_mix * (Q(W) - W)``; None or 1 is plain ternary training. Like every per-step value it holds
        for this step only (evaluation takes its own: ``loss(..., quant_mix=)``).

        A non-finite loss or gradient skips the step as a whole: nothing is updated or committed, the step
        counter stays, and ``StepStats.skipped`` says why.
        """
        self.trainable.check_can_train()
        started = time.perf_counter()
        read_before = self.store.bytes_read
        wait_before = self._wait_seconds()
        load_before = self.prefetcher.wait_seconds
        writer_before = self._writer_seconds()
        ctx = StepContext(self, micro_batches, self.step + 1, lr, self.options.optim,
                          1.0 if quant_mix is None else quant_mix, weight_decay)
        skipped = None
        try:
            plan = StepPlan(self.step_loads(ctx), self.prefetcher)
            hidden = self._forward_pass(ctx, plan)
            loss = self._backward_pass(ctx, hidden, commit_extra, plan)
            plan.finish()
            self.step = ctx.step
        except NonFiniteStep as reason:
            loss, skipped = ctx.loss, str(reason)
            self._discard_step()
        finally:
            self.stash.clear()
        writer = [after - before for after, before in zip(self._writer_seconds(), writer_before)]
        return StepStats(step=self.step, loss=loss, tokens=ctx.n_tokens, wall_s=time.perf_counter() - started,
                         io_wait_s=self._wait_seconds() - wait_before, bytes_read=self.store.bytes_read - read_before,
                         bytes_written=ctx.submitted_bytes, peak_rss=peak_rss_bytes(),
                         spilled_bytes=self.stash.spilled_bytes, skipped=skipped,
                         load_wait_s=self.prefetcher.wait_seconds - load_before, writer_wait_s=writer[0],
                         writer_work_s=writer[1], update_busy_s=writer[2], write_busy_s=writer[3])

    def step_loads(self, ctx: StepContext) -> list[Load]:
        """The step plan: the forward loads (the embedding, then each block), then the trainable's backward loads,
        in one stream, so the first backward units load while the last blocks run forward."""
        forward = [Load(unit, "forward", self.forward_job(unit, ctx.quant_mix, ctx.keep))
                   for unit in ["embed"] + [block_unit(i) for i in range(self.config.n_layers)]]
        return forward + self.trainable.backward_loads(ctx)

    def _forward_pass(self, ctx: StepContext, plan: StepPlan) -> list[torch.Tensor]:
        """Embed, then every block for all micro-batches while it is loaded; stash each block's input."""
        with torch.no_grad():
            table = plan.take("embed", "forward")["weight"]
            hidden = [self._embed(i, table) for i in ctx.ids]
            del table
            # Block inputs come first in the activation budget; projection memos get what is left.
            self.stash.reserve(self.config.n_layers * sum(h.numel() * h.element_size() for h in hidden))
            for layer in range(self.config.n_layers):
                params = self.trainable.forward_params(layer, plan.take(block_unit(layer), "forward"))
                for m in ctx.micro_range:
                    self.stash.put((layer, m), hidden[m])
                    generator = self._block_generator(ctx.step, ctx.micro_offset + m, layer)
                    if generator is not None:
                        ctx.rng_states[(layer, m)] = self.backend.save_rng(generator)
                    cos, sin = ctx.tables[ctx.ids[m].shape[1]]
                    memo = self.backend.new_memo()
                    hidden[m] = self.backend.block_forward(params, hidden[m], self.config, cos, sin,
                                                           quantize=ctx.quantize, dropout_p=self.options.dropout,
                                                           rng=generator, memo=memo)
                    if memo is not None:
                        memo.replaying = True
                        self.stash.keep(("memo", layer, m), memo, memo.nbytes)
                del params
        return hidden

    def _backward_pass(self, ctx: StepContext, hidden: list[torch.Tensor], commit_extra, plan: StepPlan) -> float:
        """Loss (and the head's update, which starts during it), then each block replayed and updated last to
        first, then the trainable's last update and the commit."""
        cfg, trainable = self.config, self.trainable
        head = trainable.head_pass(plan, ctx)
        grads = []
        for m in ctx.micro_range:
            last = m == ctx.micro_range[-1]
            part, grad_hidden = self.backend.head_loss(hidden[m], head, ctx.targets[m], cfg.norm_eps,
                                                       self.options.ce_chunk_tokens, 1.0 / ctx.n_tokens,
                                                       accumulate=m > 0,
                                                       on_weight_rows=head.on_weight_rows if last else None)
            ctx.loss += part
            grads.append(grad_hidden)
        del hidden
        if not math.isfinite(ctx.loss):
            raise NonFiniteStep(f"non-finite loss ({ctx.loss})")
        trainable.after_loss(head, ctx)

        for layer in reversed(range(cfg.n_layers)):
            unit = block_unit(layer)
            params, state = trainable.block_params(unit, plan, ctx)
            for m in ctx.micro_range:
                # Replay from the stashed input with the RNG state saved before the forward pass.
                x = self.stash.pop((layer, m))
                generator = None
                if (layer, m) in ctx.rng_states:
                    generator = self.backend.restore_rng(ctx.rng_states.pop((layer, m)))
                cos, sin = ctx.tables[ctx.ids[m].shape[1]]
                grads[m] = self.backend.block_backward(params, x, grads[m], cfg, cos, sin, quantize=ctx.quantize,
                                                       dropout_p=self.options.dropout, rng=generator,
                                                       memo=self.stash.take(("memo", layer, m)))
                del x
            trainable.update_block(unit, params, state, ctx)
            del params, state

        trainable.finish(plan, ctx, grads, head, commit_extra)
        return ctx.loss

    def _discard_step(self):
        """Undo a step abandoned half-way (see ``Trainable.discard``)."""
        try:
            self.trainable.discard()  # waits for the writer: an update still running puts its parts in resident
        finally:
            self.resident.clear()  # it may hold forward parts of the abandoned updates

    def _writer_seconds(self) -> tuple[float, float, float, float]:
        """The writer's running totals: waited for, run by callers, making updates, writing (zeros without one)."""
        if self.writer is None:
            return (0.0,) * 4
        return (self.writer.wait_seconds, self.writer.stolen_seconds, self.writer.update_seconds,
                self.writer.write_seconds)

    def _wait_seconds(self) -> float:
        return self.prefetcher.wait_seconds + (self.writer.wait_seconds if self.writer else 0.0)

    def flush(self):
        """Wait until every update is on disk and committed."""
        if self.writer is not None:
            self.writer.flush()

    def __enter__(self) -> "StreamingEngine":
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Flush, stop the background threads and release the store."""
        try:
            self.flush()
        finally:
            if self.writer is not None:
                self.writer.close()
            self.prefetcher.close()
            self.stash.clear()
            self.resident.clear()
            self.store.close()
            self.pool.release()
