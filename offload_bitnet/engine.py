"""The streaming engine: forward block by block, replay each block in backward, update it, write it back.

One optimizer step over G micro-batches (layer-major)::

    embed ──> block 0 ──> ... ──> block L-1 ──> norm+head: loss, dL/dh
      all G micro-batches pass through a block while it is loaded; each block's input is stashed
    head update <── block L-1 replay+AdamW <── ... <── block 0 replay+AdamW <── embedding update

Each block is read once in forward (the ``weights`` part only) and once in backward (weights, shadow and
optimizer moments), whatever G is. Loads run one unit ahead on a background thread; writes and the final
commit run behind on another. The engine knows scheduling, prefetch and RNG replay, nothing about file formats.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .layout import Layout
from .model import block_forward, dropout_generator, rms_norm, rope_tables
from .optim import AdamWConfig, adamw_update
from .store import BlockStore, block_unit
from .streams import ActivationStash, Prefetcher, WriteBehind
from .ternary import quantize_weight

IGNORE_INDEX = -100


def default_compute_dtype(device) -> torch.dtype:
    """fp32 on CPU (16-bit matmul is far slower there), bf16 on CUDA and MPS."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shift_labels(input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets: position t predicts labels[t+1]; the last position predicts nothing."""
    labels = input_ids if labels is None else labels
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunked_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int, scale: float, backward: bool):
    """Sum of token cross-entropies times ``scale``, computed ``chunk_tokens`` rows of logits at a time.

    With ``backward``, gradients accumulate into ``head_weight.grad`` and the gradient w.r.t. ``hidden`` is
    returned; [tokens x vocab] logits never exist at once.
    """
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])
    targets = targets.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    grad_hidden = torch.zeros_like(hidden) if backward else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        chunk_targets = targets[start:stop]
        if not (chunk_targets != IGNORE_INDEX).any():
            continue
        with torch.enable_grad() if backward else torch.no_grad():
            chunk = hidden[start:stop].detach().requires_grad_(backward)
            logits = F.linear(chunk, head_weight).float()
            loss = F.cross_entropy(logits, chunk_targets, ignore_index=IGNORE_INDEX, reduction="sum") * scale
            if backward:
                loss.backward()
                grad_hidden[start:stop] = chunk.grad
        total += loss.detach().double().cpu()
    return total.item(), (grad_hidden.reshape(shape) if backward else None)


@dataclass
class StepStats:
    """What one optimizer step did and cost."""

    step: int
    loss: float
    tokens: int
    wall_s: float
    io_wait_s: float
    bytes_read: int
    bytes_written: int
    peak_rss: int
    spilled_bytes: int = 0

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
    ce_chunk_tokens: int = 1024
    prefetch_depth: int = 1
    max_pending_writes: int = 2
    optim: AdamWConfig = field(default_factory=AdamWConfig)


class StreamingEngine:
    """Train or evaluate a model held in a ``BlockStore``, one unit in memory at a time."""

    def __init__(self, store: BlockStore, options: EngineOptions | None = None):
        self.store = store
        self.options = options or EngineOptions()
        self.device = torch.device(self.options.device)
        self.dtype = self.options.compute_dtype or default_compute_dtype(self.device)
        self.config = store.config
        self.layout = Layout(store.settings)
        self.quantize = store.settings.mode == "qat"
        self.step = store.step
        self.prefetcher = Prefetcher(self.options.prefetch_depth)
        self.writer = WriteBehind(store, self.options.max_pending_writes) if store.writable else None
        self.stash = ActivationStash(self.options.activation_budget_bytes, os.path.join(store.path, "scratch"))

    # ------------------------------------------------------------------ loading
    def _read(self, unit: str, part: str):
        if self.writer is not None:
            pending = self.writer.pending_part(unit, part)
            if pending is not None:
                # A copy: the caller may update it in place while the writer still serializes the original.
                return {name: tensor.clone() for name, tensor in pending.items()}
        if part == "optim" and not self.store.has_part(unit, part):
            return None
        return self.store.read(unit, part)

    def _forward_job(self, unit: str):
        return lambda: self.layout.forward_tensors(unit, self._read(unit, "weights"), self.dtype, self.device)

    def _update_job(self, unit: str):
        """Load what an update needs: fp32 masters and moments."""
        def job():
            weights = self._read(unit, "weights")
            shadow = self._read(unit, "shadow") if self.store.settings.mode == "qat" and unit.startswith("block.") else None
            masters = self.layout.masters(unit, weights, shadow, self.device)
            return unit, masters, self.layout.moments(self._read(unit, "optim"), masters)
        return job

    def _head_unit(self) -> str:
        return "embed" if self.config.tie_embeddings else "head"

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
                x = F.embedding(input_ids, tensors["weight"])
            elif unit == "norm":
                x = rms_norm(x, tensors["weight"], self.config.norm_eps)
            else:
                x = block_forward(tensors, x, self.config, cos, sin, quantize=self.quantize)
        return x

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[B, T, vocab]``."""
        hidden = self.hidden_states(input_ids)
        head = self._forward_job(self._head_unit())()["weight"]
        return F.linear(hidden, head).float()

    @torch.no_grad()
    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Mean next-token cross-entropy (labels default to the inputs; -100 is ignored)."""
        targets = shift_labels(input_ids, labels).to(self.device)
        count = int((targets != IGNORE_INDEX).sum())
        if count == 0:
            raise ValueError("no token has a target: sequences need at least 2 tokens and labels other than -100")
        hidden = self.hidden_states(input_ids)
        head = self._forward_job(self._head_unit())()["weight"]
        total, _ = chunked_cross_entropy(hidden, head, targets, self.options.ce_chunk_tokens, 1.0, backward=False)
        return total / count

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor | None]], lr: float | None = None,
                   commit_extra: dict | None = None) -> StepStats:
        """One AdamW step over ``micro_batches`` [(input_ids, labels or None)], streamed layer-major."""
        if self.writer is None:
            raise RuntimeError("the store was opened read-only; open it writable to train")
        started = time.perf_counter()
        read_before, written_before = self.store.bytes_read, self.store.bytes_written
        wait_before = self.prefetcher.wait_seconds + self.writer.wait_seconds
        step = self.step + 1
        ids = [batch[0].to(self.device) for batch in micro_batches]
        targets = [shift_labels(batch[0], batch[1]).to(self.device) for batch in micro_batches]
        n_tokens = sum(int((t != IGNORE_INDEX).sum()) for t in targets)
        if n_tokens == 0:
            raise ValueError("no token in this batch has a target")
        cfg, opts = self.config, self.options
        cos, sin = rope_tables(cfg, torch.arange(ids[0].shape[1], device=self.device), self.dtype)
        micro_range = range(len(ids))

        # Forward: embed, then every block for all micro-batches while it is loaded.
        units = ["embed"] + [block_unit(i) for i in range(cfg.n_layers)]
        rng_states = {}
        hidden = []
        with torch.no_grad():
            for unit, tensors in zip(units, self.prefetcher.stream(self._forward_job(u) for u in units)):
                if unit == "embed":
                    hidden = [F.embedding(i, tensors["weight"]) for i in ids]
                    continue
                layer = int(unit.split(".")[1])
                for m in micro_range:
                    self.stash.put((layer, m), hidden[m])
                    generator = None
                    if opts.dropout > 0:
                        generator = dropout_generator(opts.seed, step, m, layer, self.device)
                        rng_states[(layer, m)] = generator.get_state()
                    hidden[m] = block_forward(tensors, hidden[m], cfg, cos, sin, quantize=self.quantize,
                                              dropout_p=opts.dropout, generator=generator)
                del tensors

        # Head: loss and dL/dh for each micro-batch, then update the final norm (and an untied head).
        backward_units = ["norm", self._head_unit()] + [block_unit(i) for i in reversed(range(cfg.n_layers))]
        if self._head_unit() == "head":
            backward_units.append("embed")
        loads = self.prefetcher.stream(self._update_job(u) for u in backward_units)
        _, norm_masters, norm_moments = next(loads)
        head_unit, head_masters, head_moments = next(loads)
        norm_w = norm_masters["weight"].requires_grad_()
        head_w = head_masters["weight"].to(self.dtype).requires_grad_()
        loss_sum = 0.0
        grads = []
        for m in micro_range:
            h = hidden[m].detach().requires_grad_()
            with torch.enable_grad():
                normed = rms_norm(h, norm_w, cfg.norm_eps)
            part, grad_normed = chunked_cross_entropy(normed, head_w, targets[m], opts.ce_chunk_tokens,
                                                      1.0 / n_tokens, backward=True)
            loss_sum += part
            normed.backward(grad_normed)
            grads.append(h.grad)
        del hidden
        self._apply_update("norm", norm_masters, {"weight": norm_w.grad}, norm_moments, step, lr)
        head_grad = head_w.grad.float()
        del head_w
        if head_unit == "head":
            self._apply_update("head", head_masters, {"weight": head_grad}, head_moments, step, lr)
            head_grad = None

        # Blocks, last to first: replay from the stashed input with the saved RNG state, backprop, update.
        for _ in range(cfg.n_layers):
            unit, masters, moments = next(loads)
            layer = int(unit.split(".")[1])
            leaves = {}
            for name, master in masters.items():
                weight = quantize_weight(master) if self.layout.is_ternary(unit, name) else master
                leaves[name] = weight.to(self.dtype if weight.dim() >= 2 else torch.float32).requires_grad_()
            for m in micro_range:
                x = self.stash.pop((layer, m)).requires_grad_()
                generator = None
                if opts.dropout > 0:
                    generator = torch.Generator(device=self.device)
                    generator.set_state(rng_states.pop((layer, m)))
                with torch.enable_grad():
                    out = block_forward(leaves, x, cfg, cos, sin, quantize=self.quantize,
                                        dropout_p=opts.dropout, generator=generator)
                out.backward(grads[m])
                grads[m] = x.grad
                del out, x
            # Straight-through: dL/dW_q is the gradient of the shadow weight.
            self._apply_update(unit, masters, {n: leaf.grad.float() for n, leaf in leaves.items()}, moments, step, lr)
            del leaves

        # Embedding: scatter the token gradients (plus the tied head's gradient) and update.
        if head_unit == "head":
            _, embed_masters, embed_moments = next(loads)
        else:
            embed_masters, embed_moments = head_masters, head_moments
        embed_grad = torch.zeros_like(embed_masters["weight"]) if head_grad is None else head_grad
        for m in micro_range:
            embed_grad.index_add_(0, ids[m].reshape(-1), grads[m].reshape(-1, cfg.dim).float())
        self._apply_update("embed", embed_masters, {"weight": embed_grad}, embed_moments, step, lr)

        self.writer.commit(step, commit_extra)
        self.step = step
        self.stash.clear()
        wait = self.prefetcher.wait_seconds + self.writer.wait_seconds - wait_before
        return StepStats(step=step, loss=loss_sum, tokens=n_tokens, wall_s=time.perf_counter() - started,
                         io_wait_s=wait, bytes_read=self.store.bytes_read - read_before,
                         bytes_written=self.store.bytes_written - written_before, peak_rss=peak_rss_bytes(),
                         spilled_bytes=self.stash.spilled_bytes)

    def _apply_update(self, unit, masters, grads, moments, step, lr):
        for name, master in masters.items():
            exp_avg, exp_avg_sq = moments[name]
            adamw_update(master.detach(), grads[name], exp_avg, exp_avg_sq, step, self.options.optim, lr)
        parts = self.layout.encode(unit, {n: m.detach() for n, m in masters.items()})
        parts["optim"] = self.layout.encode_moments(moments)
        self.writer.write(unit, parts, step)

    def flush(self):
        """Wait until every update is on disk and committed."""
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        """Flush, stop the background threads and release the store."""
        try:
            self.flush()
        finally:
            if self.writer is not None:
                self.writer.close()
            self.prefetcher.close()
            self.stash.clear()
            self.store.close()
