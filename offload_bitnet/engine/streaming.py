"""The streaming engine: forward block by block, replay each block in backward, update it, write it back.

One optimizer step over G micro-batches (layer-major)::

    embed ──> block 0 ──> ... ──> block L-1 ──> norm+head: loss, dL/dh
      all G micro-batches pass through a block while it is loaded; each block's input is stashed
    head update <── block L-1 replay+AdamW <── ... <── block 0 replay+AdamW <── embedding update

Each block is read once in forward (the ``weights`` part only) and once in backward (weights, shadow and
optimizer moments), whatever G is. Three threads share the work:

- main: the compute (forward, replay, backward) and the embedding's update, which ends the step;
- prefetch: loads one unit ahead, in one stream for both passes, so the head loads while the last blocks
  run forward;
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
a matmul needs it (``model.LazyWeight``). Forward parts may stay resident across steps (``resident_bytes``). The engine knows scheduling, prefetch
and RNG replay, nothing about file formats.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from offload_bitnet.io.buffers import BufferPool
from offload_bitnet.io.faults import fault_point
from offload_bitnet.store.layout import Layout
from offload_bitnet.model.lora import ADAPTER_PROGRESS, AdapterSet, LoRAConfig
from offload_bitnet.model.loss import IGNORE_INDEX, chunked_cross_entropy, shift_labels
from offload_bitnet.model.block import LazyWeight, ProjectionMemo, block_forward, dropout_generator, rms_norm, rope_tables
from offload_bitnet.model.adamw import AdamWConfig, adamw_update
from offload_bitnet.io.safetensors import encoded_size
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.units import block_index, block_unit, is_block, unit_shapes
from offload_bitnet.engine.streams import ActivationStash, Prefetcher, ResidentWeights, WriteBehind
from offload_bitnet.model.ternary import quantize_weight

def default_compute_dtype(device) -> torch.dtype:
    """fp32 on CPU (16-bit matmul is far slower there), bf16 on CUDA and MPS."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class NonFiniteStep(ArithmeticError):
    """A step produced a non-finite loss or gradient and was skipped."""


def _check_finite(unit: str, name: str, *tensors, what: str = "gradient"):
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        # The extremes are non-finite exactly when some element is: one pass, no boolean tensor the size of the
        # weights, no conversion of 16-bit tensors, and no false alarm from a sum that overflows.
        low, high = torch.aminmax(tensor)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise NonFiniteStep(f"non-finite {what} in {unit} {name}")


class _StepContext:
    """What one training step's passes share."""

    def __init__(self, engine: "StreamingEngine", micro_batches, step: int, lr: float | None):
        self.step, self.lr = step, lr
        self.ids = [batch[0].to(engine.device) for batch in micro_batches]
        self.targets = [shift_labels(batch[0], batch[1]).to(engine.device) for batch in micro_batches]
        self.n_tokens = sum(int((t != IGNORE_INDEX).sum()) for t in self.targets)
        if self.n_tokens == 0:
            raise ValueError("no token in this batch has a target")
        self.quantize = engine.quantize * engine.quant_mix
        self.tables = {}  # rope tables per sequence length: micro-batches may differ in length
        for ids in self.ids:
            if ids.shape[1] not in self.tables:
                positions = torch.arange(ids.shape[1], device=engine.device)
                self.tables[ids.shape[1]] = rope_tables(engine.config, positions, engine.dtype)
        self.micro_range = range(len(self.ids))
        self.rng_states: dict = {}
        self.loss = 0.0


@dataclass
class StepStats:
    """What one optimizer step did and cost."""

    step: int
    loss: float
    tokens: int
    wall_s: float
    io_wait_s: float
    bytes_read: int      # read from disk during the step (units served from the write-behind buffer are free)
    bytes_written: int   # the size of the files this step writes (the writes finish in the background)
    peak_rss: int
    spilled_bytes: int = 0
    skipped: str | None = None   # why the step was skipped (non-finite loss or gradient), else None
    # The main thread's time apart from its own compute: waiting for loads, waiting for the writer (both in
    # ``io_wait_s``), and running queued updates itself because the writer's queue was full (in compute_s).
    load_wait_s: float = 0.0
    writer_wait_s: float = 0.0
    writer_work_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return max(self.wall_s - self.io_wait_s, 0.0)

    def line(self) -> str:
        return (f"step {self.step} loss {self.loss:.4f} tokens {self.tokens} time {self.wall_s:.2f}s "
                f"(compute {self.compute_s:.2f}s, io wait {self.io_wait_s:.2f}s) read {self.bytes_read / 2**20:.1f}MiB "
                f"written {self.bytes_written / 2**20:.1f}MiB peak_rss {self.peak_rss / 2**20:.0f}MiB")


@dataclass
class EngineOptions:
    """Knobs of the streaming engine."""

    device: str = "cpu"
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
    # pass, on the prefetch thread, which overlaps the compute. The default makes 7B and 13B blocks (0.8 and
    # 1.3 GB) dense and 34B and up lazy.
    dense_block_bytes: int = 2 << 30
    prefetch_depth: int = 1
    max_pending_writes: int = 1
    optim: AdamWConfig = field(default_factory=AdamWConfig)
    lora: LoRAConfig | None = None      # train adapters on a frozen, read-only base
    adapter_dir: str | None = None      # where adapters are saved each step (and resumed from)
    adapter_base: str | None = None     # adapter_config.json's base_model_name_or_path (default: the store)
    scratch_dir: str | None = None      # where activations beyond the budget spill (default STORE/scratch)


class StreamingEngine:
    """Train or evaluate a model held in a ``BlockStore``, one unit in memory at a time."""

    def __init__(self, store: BlockStore, options: EngineOptions | None = None):
        self.store = store
        self.options = options or EngineOptions()
        self.device = torch.device(self.options.device)
        self.dtype = self.options.compute_dtype or default_compute_dtype(self.device)
        self.config = store.config
        self.pool = BufferPool(self.options.pool_bytes if self.options.pool_bytes is not None
                               else self._default_pool_bytes())
        self.layout = Layout(store.settings, self.pool)
        self.quantize = 1.0 if store.settings.mode == "qat" else 0.0
        self.quant_mix = 1.0
        self.adapters = None
        self.step = store.step
        if self.options.lora is not None:
            if not self.options.adapter_dir:
                raise ValueError("LoRA training needs an adapter_dir to save the adapters in")
            if os.path.exists(os.path.join(self.options.adapter_dir, ADAPTER_PROGRESS)):
                self.adapters = AdapterSet.load(self.options.adapter_dir, self.config)
            else:
                self.adapters = AdapterSet(self.config, self.options.lora)
            self.step = self.adapters.step
        self.prefetcher = Prefetcher(self.options.prefetch_depth)
        self.writer = None
        if store.writable and self.options.lora is None:
            store.check_free_space()
            self.writer = WriteBehind(store, self.options.max_pending_writes)
        # Spilled activations go beside the adapters in LoRA runs: the base store stays untouched and shareable.
        scratch = self.options.scratch_dir or os.path.join(store.path, "scratch")
        memo_budget = self.options.memo_budget_bytes
        if memo_budget is None:
            memo_budget = 2 * 4 * self.config.block_param_count()
        self.stash = ActivationStash(self.options.activation_budget_bytes, scratch, memo_budget)
        self.resident = ResidentWeights(self.options.resident_bytes)

    def _default_pool_bytes(self) -> int:
        cfg, size = self.config, torch.empty((), dtype=self.dtype).element_size()
        block = cfg.block_param_count() * size if not self._lazy("block.000") else \
            max(o * i for o, i in cfg.projection_shapes.values()) * 4
        # At least 1 GiB: a small model's whole step then stays in reused buffers, as with no bound at all.
        return max(1 << 30, 2 * max(block, cfg.vocab_size * cfg.dim * 4))

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

    def _shadow_in_update(self, unit: str) -> bool:
        """Whether a ternary block's backward computes from its packed weights and leaves the 16-bit shadow to
        the update, which reads it on the writer thread (as it reads the moments): at full quantization the
        unpacked weights are the quantized shadow, bit for bit, so neither the main thread nor a queued update
        holds the shadow (at 7B that is 0.4 GB per block in flight)."""
        return self._needs_shadow(unit) and self.quant_mix == 1

    def _compute_weights(self, unit: str, masters: dict) -> dict[str, torch.Tensor]:
        """Compute tensors from masters (fp32, or 16-bit shadows): fake-quantized (mixed by ``quant_mix``)
        ternary projections."""
        tensors = {}
        for name, master in masters.items():
            weight = master
            if self.layout.is_ternary(unit, name):
                quantized = quantize_weight(master, out=self.layout.empty(master.shape, torch.float32, master.device))
                weight = quantized if self.quant_mix == 1 else master.float() + self.quant_mix * (quantized - master)
            tensors[name] = weight.to(self.dtype if weight.dim() >= 2 else torch.float32)
        return tensors

    def _lazy(self, unit: str) -> bool:
        """Whether a unit's projections are made one at a time (``model.LazyWeight``) rather than all at once:
        blocks whose dense compute weights exceed ``dense_block_bytes``."""
        dense = self.config.block_param_count() * torch.empty((), dtype=self.dtype).element_size()
        return is_block(unit) and dense > self.options.dense_block_bytes

    def _lazy_weights(self, unit: str, names, make_one, keep: bool, requires_grad: bool = False) -> dict:
        """``{name: tensor}`` with each projection a LazyWeight of ``make_one(name)``; norms made at once."""
        projections = self.config.projection_shapes
        return {name: LazyWeight(functools.partial(make_one, name), keep, requires_grad) if name in projections
                else make_one(name) for name in names}

    def _forward_job(self, unit: str, keep: bool = False):
        """Load what forward needs: the ``weights`` part only (the shadow too while quantization warms up).
        ``keep``: the step has several micro-batches (lazy projections are made once per pass, see _lazy)."""
        def job():
            fault_point("prefetch")
            weights = self._read(unit, "weights", will_modify=False)
            if unit == "embed":
                # As stored: a lookup converts only the rows it gathers (``_embed``), not the whole table.
                return {"weight": weights["weight"].to(self.device)}
            lazy = self._lazy(unit)
            if self.quant_mix != 1 and self._needs_shadow(unit):
                masters = self.layout.masters(unit, weights, self._read(unit, "shadow", will_modify=False),
                                              self.device, None if lazy else torch.float32)
                if lazy:
                    return self._lazy_weights(unit, list(masters), lambda name: self._compute_weights(
                        unit, {name: masters[name]})[name], keep)
                return self._compute_weights(unit, masters)
            if lazy:
                return self._lazy_weights(unit, self.layout.param_names(weights), lambda name: self.layout.forward_tensor(
                    weights, name, self.dtype, self.device), keep)
            return self.layout.forward_tensors(unit, weights, self.dtype, self.device)
        return job

    def _embed(self, input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Embedding lookup in the compute dtype (the same values as converting the table first)."""
        return F.embedding(input_ids, table).to(self.dtype)

    def _update_job(self, unit: str, with_moments: bool = True):
        """Load what the backward pass needs of a unit: its masters (ternary blocks: the 16-bit shadows, which
        the backward pass only quantizes; a queued update then holds half the bytes) and its moments."""
        def job():
            weights = self._read(unit, "weights")
            if self._shadow_in_update(unit):
                return unit, weights, None  # the weights part as it is: the backward pass makes the compute weights
            shadow = self._read(unit, "shadow") if self._needs_shadow(unit) else None
            # As stored where the update converts them (16-bit shadows; lazy blocks make compute weights one at
            # a time), else fp32.
            as_stored = shadow is not None or self._lazy(unit)
            masters = self.layout.masters(unit, weights, shadow, self.device, None if as_stored else torch.float32)
            return unit, masters, self._optim_part(unit) if with_moments else None
        return job

    def _read_stored(self, unit: str, part: str) -> dict:
        """A part as the store has it, for an update (on the writer thread, or on main when it takes a queued
        update over): every earlier write of the unit is in the store by then."""
        return self.store.read(unit, part, self.pool)

    def _moments_job(self, unit: str):
        return lambda: self._optim_part(unit)

    def _optim_part(self, unit: str, stored: bool = False) -> dict:
        """A unit's moments as stored (decoded one tensor at a time by its update); ``{}`` before the first
        update. ``stored``: as the store has them, not as a pending write has them (for the writer thread,
        where every earlier write already is in the store)."""
        if stored:
            part = self._read_stored(unit, "optim") if self.store.has_part(unit, "optim") else None
        else:
            part = self._read(unit, "optim")
        return part or {}

    def _frozen_job(self, unit: str, keep: bool = False):
        """Load a unit LoRA training keeps frozen (forward tensors; no masters, no moments)."""
        job = self._forward_job(unit, keep)
        return lambda: (unit, job(), None)

    def _head_unit(self) -> str:
        return "embed" if self.config.tie_embeddings else "head"

    def _block_params(self, layer: int, tensors: dict, trainable_adapters: bool = False) -> dict:
        if self.adapters is None:
            return tensors
        return {**tensors, **self.adapters.block_adapters(layer, self.device, trainable_adapters)}

    def _block_generator(self, step: int, micro: int, layer: int):
        if self.options.dropout > 0 or (self.adapters is not None and self.adapters.lora.dropout > 0):
            return dropout_generator(self.options.seed, step, micro, layer, self.device)
        return None

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, dim]``, streaming every block once."""
        input_ids = input_ids.to(self.device)
        cos, sin = rope_tables(self.config, torch.arange(input_ids.shape[1], device=self.device), self.dtype)
        units = ["embed"] + [block_unit(i) for i in range(self.config.n_layers)] + ["norm"]
        x = None
        for unit, tensors in zip(units, self.prefetcher.stream(self._forward_job(u) for u in units)):
            if unit == "embed":
                x = self._embed(input_ids, tensors["weight"])
            elif unit == "norm":
                x = rms_norm(x, tensors["weight"], self.config.norm_eps)
            else:
                params = self._block_params(block_index(unit), tensors)
                x = block_forward(params, x, self.config, cos, sin, quantize=self.quantize * self.quant_mix)
        return x

    def _head_weight(self) -> torch.Tensor:
        return self._forward_job(self._head_unit())()["weight"].to(self.dtype)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[B, T, vocab]``."""
        hidden = self.hidden_states(input_ids)
        return F.linear(hidden, self._head_weight()).float()

    @torch.no_grad()
    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Mean next-token cross-entropy (labels default to the inputs; -100 is ignored)."""
        targets = shift_labels(input_ids, labels).to(self.device)
        count = int((targets != IGNORE_INDEX).sum())
        if count == 0:
            raise ValueError("no token has a target: sequences need at least 2 tokens and labels other than -100")
        hidden = self.hidden_states(input_ids)
        total, _ = chunked_cross_entropy(hidden, self._head_weight(), targets, self.options.ce_chunk_tokens, 1.0,
                                         backward=False)
        return total / count

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor | None]], lr: float | None = None,
                   commit_extra: dict | None = None, quant_mix: float | None = None,
                   weight_decay: float | None = None) -> StepStats:
        """One AdamW step over ``micro_batches`` [(input_ids, labels or None)], streamed layer-major.

        ``lr`` and ``weight_decay`` override the configured AdamW values for this step (schedules).
        ``quant_mix`` (qat only) in [0, 1]: the weights and activations the step sees are
        ``W + quant_mix * (Q(W) - W)``; 1 (the default) is plain ternary training.

        A non-finite loss or gradient skips the step as a whole: nothing is updated or committed, the step
        counter stays, and ``StepStats.skipped`` says why.
        """
        if self.writer is None and self.adapters is None:
            raise RuntimeError("the store was opened read-only; open it writable to train")
        if quant_mix is not None:
            if not 0 <= quant_mix <= 1:
                raise ValueError(f"quant_mix must be in [0, 1], got {quant_mix}")
            self.quant_mix = float(quant_mix)
        self._step_optim = self.options.optim
        if weight_decay is not None:
            self._step_optim = dataclasses.replace(self.options.optim, weight_decay=weight_decay)
        started = time.perf_counter()
        read_before = self.store.bytes_read
        self._submitted_bytes = 0
        wait_before = self._wait_seconds()
        load_before = self.prefetcher.wait_seconds
        writer_before = (self.writer.wait_seconds, self.writer.stolen_seconds) if self.writer else (0.0, 0.0)
        ctx = _StepContext(self, micro_batches, self.step + 1, lr)
        skipped = None
        try:
            # One stream of loads for both passes: the first backward units load while the last blocks run forward.
            forward_units, backward_units = self._step_units()
            keep = len(ctx.ids) > 1
            loads = self.prefetcher.stream(itertools.chain((self._forward_job(u, keep) for u in forward_units),
                                                           self._backward_jobs(backward_units, keep)))
            hidden = self._forward_pass(ctx, forward_units, loads)
            loss = self._backward_pass(ctx, hidden, commit_extra, loads)
            self.step = ctx.step
        except NonFiniteStep as reason:
            loss, skipped = ctx.loss, str(reason)
            self._discard_step()
        finally:
            self.stash.clear()
        return StepStats(step=self.step, loss=loss, tokens=ctx.n_tokens, wall_s=time.perf_counter() - started,
                         io_wait_s=self._wait_seconds() - wait_before, bytes_read=self.store.bytes_read - read_before,
                         bytes_written=self._submitted_bytes, peak_rss=peak_rss_bytes(),
                         spilled_bytes=self.stash.spilled_bytes, skipped=skipped,
                         load_wait_s=self.prefetcher.wait_seconds - load_before,
                         writer_wait_s=self.writer.wait_seconds - writer_before[0] if self.writer else 0.0,
                         writer_work_s=self.writer.stolen_seconds - writer_before[1] if self.writer else 0.0)

    def _step_units(self) -> tuple[list[str], list[str]]:
        """The units a training step loads in its forward pass and in its backward pass, in order."""
        blocks = [block_unit(i) for i in range(self.config.n_layers)]
        backward = ["norm", self._head_unit()] + blocks[::-1]
        if self._head_unit() == "head" and self.adapters is None:
            backward.append("embed")
        return ["embed"] + blocks, backward

    def _backward_jobs(self, units: list[str], keep: bool = False):
        """Load jobs of the backward pass, in the order it takes them. Blocks' moments are left to their updates
        on the writer thread (read when the update runs, so queued updates hold no moments). The embedding's
        update ends the step on this thread: its moments load with it, and then (untied) its zeroed gradient, into
        which the token gradients are added. An untied head's moments come as a job of their own after its
        masters: its update starts during the cross-entropy, which overlaps their load."""
        for unit in units:
            if self.adapters is not None:
                yield self._frozen_job(unit, keep)
            elif unit == "head":
                yield self._update_job(unit, with_moments=False)
                yield self._moments_job(unit)
            else:
                yield self._update_job(unit, with_moments=unit in ("embed", "norm"))
                if unit == "embed" and self._head_unit() == "head":
                    shape = unit_shapes(self.config, unit)["weight"]
                    yield lambda: self.layout.empty(shape, torch.float32, self.device).zero_()

    def _forward_pass(self, ctx: "_StepContext", units: list[str], loads) -> list[torch.Tensor]:
        """Embed, then every block for all micro-batches while it is loaded; stash each block's input. Takes
        one item of ``loads`` per unit."""
        hidden = []
        with torch.no_grad():
            for unit, tensors in zip(units, loads):  # units first: zip stops before taking an extra load
                if unit == "embed":
                    hidden = [self._embed(i, tensors["weight"]) for i in ctx.ids]
                    # Block inputs come first in the activation budget; projection memos get what is left.
                    self.stash.reserve(self.config.n_layers * sum(h.numel() * h.element_size() for h in hidden))
                    continue
                layer = block_index(unit)
                params = self._block_params(layer, tensors)
                for m in ctx.micro_range:
                    self.stash.put((layer, m), hidden[m])
                    generator = self._block_generator(ctx.step, m, layer)
                    if generator is not None:
                        ctx.rng_states[(layer, m)] = generator.get_state()
                    cos, sin = ctx.tables[ctx.ids[m].shape[1]]
                    memo = ProjectionMemo()
                    hidden[m] = block_forward(params, hidden[m], self.config, cos, sin, quantize=ctx.quantize,
                                              dropout_p=self.options.dropout, generator=generator, memo=memo)
                    memo.replaying = True
                    self.stash.keep(("memo", layer, m), memo, memo.nbytes)
                del tensors, params
        return hidden

    def _backward_pass(self, ctx: "_StepContext", hidden: list[torch.Tensor], commit_extra, loads) -> float:
        """Loss and head update, then each block replayed and updated last to first, then the embedding."""
        cfg, lora = self.config, self.adapters is not None
        _, norm_masters, norm_moments = next(loads)
        head_unit, head_masters, head_moments = next(loads)
        norm_w = norm_masters["weight"].requires_grad_(not lora)
        head_w = head_masters["weight"].to(self.dtype)
        head_grad = None if lora else self.layout.empty(head_w.shape, head_w.dtype, head_w.device)
        head_update = None

        def update_head_rows(rows: slice, loss_so_far: float):
            """An untied head's update starts a row range at a time, while the cross-entropy still computes."""
            nonlocal head_update
            if not math.isfinite(ctx.loss + loss_so_far):
                raise NonFiniteStep(f"non-finite loss ({ctx.loss + loss_so_far})")
            if head_update is None:  # its moments were loaded during the cross-entropy's forward
                head_update = self._updater("head", head_masters, {"weight": head_grad}, next(loads), ctx,
                                            keep_masters=True)
            final = rows.stop == head_grad.shape[0]
            # Only the writer runs them, one after another (each range's update is cheap; the last makes the parts).
            self.writer.update("head", functools.partial(head_update, rows, final), ctx.step, stealable=False)

        grads = []
        for m in ctx.micro_range:
            h = hidden[m].detach().requires_grad_()
            with torch.enable_grad():
                normed = rms_norm(h, norm_w, cfg.norm_eps)
            last = m == ctx.micro_range[-1] and head_unit == "head" and not lora
            part, grad_normed = chunked_cross_entropy(normed, head_w, ctx.targets[m], self.options.ce_chunk_tokens,
                                                      1.0 / ctx.n_tokens, backward=True, weight_grad=head_grad,
                                                      accumulate=m > 0, on_weight_rows=update_head_rows if last else None)
            ctx.loss += part
            normed.backward(grad_normed)
            grads.append(h.grad)
        del hidden
        if not math.isfinite(ctx.loss):
            raise NonFiniteStep(f"non-finite loss ({ctx.loss})")
        if not lora:
            self._apply_update("norm", norm_masters, {"weight": norm_w.grad}, norm_moments, ctx)
        head_grad = head_grad.float() if head_unit == "embed" and not lora else None
        del head_w

        for _ in range(cfg.n_layers):
            unit, masters, moments = next(loads)
            layer = block_index(unit)
            update_masters = masters
            if lora:
                leaves = masters  # frozen base tensors
                params = self._block_params(layer, masters, trainable_adapters=True)
            elif self._shadow_in_update(unit):
                weights = masters  # the weights part: compute weights unpacked from it; the update reads the shadow
                if self._lazy(unit):
                    leaves = self._lazy_weights(unit, self.layout.param_names(weights), lambda name: (
                        self.layout.forward_tensor(weights, name, self.dtype, self.device)), keep=len(ctx.ids) > 1,
                        requires_grad=True)
                else:
                    leaves = self.layout.forward_tensors(unit, weights, self.dtype, self.device)
                for leaf in leaves.values():
                    if isinstance(leaf, torch.Tensor):
                        leaf.requires_grad_()
                params = leaves
                update_masters = {name: None if self.layout.is_ternary(unit, name) else leaf
                                  for name, leaf in leaves.items()}
            elif self._lazy(unit):
                leaves = self._lazy_weights(unit, list(masters), lambda name: self._compute_weights(
                    unit, {name: masters[name]})[name], keep=len(ctx.ids) > 1, requires_grad=True)
                for leaf in leaves.values():
                    if isinstance(leaf, torch.Tensor):
                        leaf.requires_grad_()
                params = leaves
            else:
                leaves = {n: t.requires_grad_() for n, t in self._compute_weights(unit, masters).items()}
                params = leaves
            for m in ctx.micro_range:
                # Replay from the stashed input with the RNG state saved before the forward pass.
                x = self.stash.pop((layer, m)).requires_grad_()
                generator = None
                if (layer, m) in ctx.rng_states:
                    generator = torch.Generator(device=self.device)
                    generator.set_state(ctx.rng_states.pop((layer, m)))
                cos, sin = ctx.tables[ctx.ids[m].shape[1]]
                with torch.enable_grad():
                    out = block_forward(params, x, cfg, cos, sin, quantize=ctx.quantize, dropout_p=self.options.dropout,
                                        generator=generator, memo=self.stash.take(("memo", layer, m)))
                out.backward(grads[m])
                grads[m] = x.grad
                del out, x
            if lora:
                adapters = {k: v for k, v in params.items() if k.endswith(".lora")}
                for key, adapter in adapters.items():
                    _check_finite(unit, key, adapter.lora_a.grad, adapter.lora_b.grad)
                self.adapters.update(layer, adapters, ctx.step, self._step_optim, ctx.lr)
                for key in adapters:
                    name = key[: -len(".lora")]
                    _check_finite(unit, name, *self.adapters.weights[(layer, name)].values(),
                                  what="adapter weight after the update")
            else:
                # Straight-through: dL/dW_q is the gradient of the shadow weight.
                grads_by_name = {n: leaf.grad.float() for n, leaf in leaves.items()}
                del masters
                self._apply_update(unit, update_masters, grads_by_name, moments, ctx)
            del leaves, params, update_masters

        if lora:
            self.adapters.save(self.options.adapter_dir, ctx.step, commit_extra,
                               base_model=self.options.adapter_base or self.store.path)
            return ctx.loss
        # Embedding: scatter the token gradients (plus the tied head's gradient) and update.
        if head_unit == "head":
            (_, embed_masters, embed_moments), embed_grad = next(loads), next(loads)
        else:
            embed_masters, embed_moments, embed_grad = head_masters, head_moments, head_grad
        for m in ctx.micro_range:
            embed_grad.index_add_(0, ctx.ids[m].reshape(-1), grads[m].reshape(-1, cfg.dim).float())
        # The last update runs here (nothing else is left to compute); the others ran on the writer thread, and the
        # step is complete (or found non-finite) once they all have.
        self._apply_update("embed", embed_masters, {"weight": embed_grad}, embed_moments, ctx, inline=True)
        self.writer.wait_for_updates()
        self.writer.commit(ctx.step, commit_extra)
        return ctx.loss

    def _discard_step(self):
        """Undo a step abandoned half-way: drop its written files (the store stays at its committed step) or
        reload the adapters from their last checkpoint."""
        self.resident.clear()  # it may hold forward parts of the abandoned updates
        if self.adapters is not None:
            directory = self.options.adapter_dir
            if os.path.exists(os.path.join(directory, ADAPTER_PROGRESS)):
                self.adapters = AdapterSet.load(directory, self.config)
            else:
                self.adapters = AdapterSet(self.config, self.options.lora)
            return
        error = self.writer.discard()
        if error is not None and not isinstance(error, NonFiniteStep):
            raise error
        self.store.remove_uncommitted_files()

    def _wait_seconds(self) -> float:
        return self.prefetcher.wait_seconds + (self.writer.wait_seconds if self.writer else 0.0)

    def _apply_update(self, unit, masters, grads, moments, ctx: "_StepContext", inline: bool = False):
        """AdamW on ``masters`` and the write of the result, so the caller must not touch these tensors again.

        The update runs on the writer thread, beside the compute of the next unit (``inline``: here). ``masters``
        may be 16-bit (the update makes fp32 copies); ``moments`` None: the update reads them."""
        update = self._updater(unit, masters, grads, moments, ctx)
        if inline:
            self.writer.write(unit, update(), ctx.step)
        else:
            self.writer.update(unit, update, ctx.step)

    def _updater(self, unit, masters, grads, moments, ctx: "_StepContext", keep_masters: bool = False):
        """The update of ``unit`` as a function ``update(rows=None, final=True)``: AdamW on ``rows`` (a slice of every
        master's first dimension; None: all of it), and when ``final``, the unit's new parts. Calls on disjoint row
        ranges in order, the last one final, make the same update as one call (AdamW is elementwise).
        ``keep_masters``: the caller still reads ``masters``, so the update changes fp32 copies of them."""
        step, optim, lr = ctx.step, self._step_optim, ctx.lr
        state = {}

        shapes = unit_shapes(self.config, unit)

        def moments_of(names) -> dict:
            """fp32 moments of ``names``, decoded from the stored part (read now when none was loaded)."""
            if "optim" not in state:
                state["optim"] = moments if moments is not None else self._optim_part(unit, stored=True)
            return self.layout.moments(state["optim"], {n: shapes[n] for n in names}, self.device)

        def master_of(name: str) -> torch.Tensor:
            """A master as given, or (None: see _shadow_in_update) from the stored shadow, read on first use;
            every earlier write of the unit is in the store by the time its update runs."""
            if masters[name] is not None:
                return masters[name]
            if "shadow" not in state:
                state["shadow"] = self._read_stored(unit, "shadow")
            return state["shadow"][name]

        def finish(parts: dict, unit_moments: dict):
            """Check the new weights of ``parts`` and add the encoded moments."""
            # Every master reaches these parts (qat: the shadow, and the scale derived from it), and a non-finite
            # gradient makes its weight non-finite, so this one check also catches bad gradients; and an lr so
            # large that the 16-bit weights overflow.
            for name, stored in {**parts["weights"], **parts.get("shadow", {})}.items():
                if stored.is_floating_point():
                    _check_finite(unit, name, stored, what="weight after the update (from a non-finite or huge "
                                                           "gradient or learning rate)")
            parts["optim"] = self.layout.encode_moments(unit_moments)
            return parts

        def made(parts: dict) -> dict:
            """The update's parts are final: the new forward part replaces the kept one (if kept)."""
            self._submitted_bytes += sum(encoded_size(tensors) for tensors in parts.values())
            self.resident.replace(unit, parts["weights"])
            return parts

        def update_each() -> dict[str, dict[str, torch.Tensor]]:
            """The whole update, one tensor at a time: the fp32 master and moments of one projection exist at
            once, not a block's worth (a 70B block is 3.4 GB in fp32, with its moments 10 GB)."""
            parts: dict[str, dict] = {}
            for name in list(masters):
                unit_moments = moments_of([name])
                master = self.layout.float32(master_of(name).detach())
                exp_avg, exp_avg_sq = unit_moments[name]
                adamw_update(master, grads.pop(name).float(), exp_avg, exp_avg_sq, step, optim, lr)
                for part, tensors in finish(self.layout.encode(unit, {name: master}), unit_moments).items():
                    parts.setdefault(part, {}).update(tensors)
                del master, unit_moments, exp_avg, exp_avg_sq
            return made(parts)

        def update(rows: slice | None = None, final: bool = True) -> dict[str, dict[str, torch.Tensor]]:
            fault_point("update")
            if rows is None and not keep_masters:
                return update_each()
            index = slice(None) if rows is None else rows
            if "masters" not in state:
                state["moments"] = moments_of(list(masters))
                state["masters"] = {name: self.layout.empty(master.shape, torch.float32, master.device) if keep_masters
                                    else self.layout.float32(master.detach()) for name, master in masters.items()}
            masters_32, unit_moments = state["masters"], state["moments"]
            for name, master in masters_32.items():
                if keep_masters:
                    master[index] = masters[name][index]
                exp_avg, exp_avg_sq = unit_moments[name]
                adamw_update(master[index], grads[name][index].float(), exp_avg[index], exp_avg_sq[index], step,
                             optim, lr)
            if not final:
                return {}
            parts = made(finish(self.layout.encode(unit, masters_32), unit_moments))
            # The fp32 masters and moments are encoded now: let them go although the caller (an untied head's
            # row-range jobs) may keep this function until the step ends (at 13B: 2 GB).
            state.clear()
            del masters_32, unit_moments
            return parts

        return update

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
