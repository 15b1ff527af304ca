"""Text generation over a block store, streaming blocks with a per-block KV cache.

A generation step runs every unit in order (embed, blocks, final norm, head). The prompt is prefilled once,
block by block, filling each block's KV cache; every new token then streams all blocks again with a query of
length one. Prompts of different lengths are left-padded into one batch: padded keys are masked out and
rotary positions count real tokens only, so a batched prompt yields the same tokens as on its own.

Weights come through a cache sized by ``memory_budget`` bytes: a model whose compute tensors fit stays
resident (expanded, no work per token); one whose stored (packed/16-bit) tensors fit is kept compact and
expanded on use; a larger one keeps the first units that fit and streams the rest from disk for every token,
reading one unit ahead on a background thread. Evicting least-recently-used units would only thrash on this
strictly cyclic access pattern, so the resident set is chosen up front and never churns.

Blocks that are not kept expanded follow the engine's rule (``model.is_lazy_block``): one whose dense compute
weights exceed ``dense_block_bytes`` gets each projection made only while its matmul runs (``model.LazyWeight``),
so generation over a 70B block (3.4 GB in fp32, 0.2 GB packed) holds a few projections, not a few blocks.
"""
from __future__ import annotations

import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload_bitnet.argparsing import DeviceError, check_device
from offload_bitnet.engine.backend import is_mlx_device, make_backend
from offload_bitnet.engine.streaming import default_compute_dtype
from offload_bitnet.engine.streams import Prefetcher
from offload_bitnet.model.block import DENSE_BLOCK_BYTES, is_lazy_block, lazy_weights, rope_tables
from offload_bitnet.model.lora import AdapterSet
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.layout import Layout
from offload_bitnet.store.units import block_unit, is_block

DEFAULT_MEMORY_BUDGET = 2 << 30


class GenerationError(ValueError):
    """Generation cannot run with these inputs; the message says what to change."""


@dataclass
class SamplingOptions:
    """How the next token is chosen. ``temperature`` 0 means greedy (the default)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] | set[int] | None = None

    def validate(self):
        if self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


@dataclass
class Generation:
    """What ``Generator.generate`` produced and what it cost."""

    tokens: list[list[int]]            # new tokens per prompt, stop token excluded
    stop_reasons: list[str]            # "stop" (EOS / end of turn), "length" or "context"
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    bytes_read: int
    cache_policy: str

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole run (prefill included)."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the prompt was prefilled."""
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        total = self.prefill_s + self.decode_s
        return (f"{self.new_tokens} new tokens for {len(self.tokens)} prompt(s) in {total:.2f}s: "
                f"{self.tokens_per_s:.2f} tokens/s overall, {self.decode_tokens_per_s:.2f} tokens/s after a "
                f"{self.prompt_tokens}-token prefill of {self.prefill_s:.2f}s; weights {self.cache_policy}, "
                f"read {self.bytes_read / 2**20:.1f} MiB from the store")


# ---------------------------------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by ``penalty`` when positive, multiplied when not."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k, then outside the smallest nucleus of mass >= top_p, to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p (the first token always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, seen: torch.Tensor, options: SamplingOptions,
                generator: torch.Generator) -> torch.Tensor:
    """Next token per row ``[B]`` from fp32 logits ``[B, V]`` (on CPU, so a seed gives the same draws anywhere)."""
    logits = apply_repetition_penalty(logits.float().cpu(), seen, options.repetition_penalty)
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / options.temperature, options.top_k, options.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------- weights
class UnitCache:
    """Unit tensors kept in memory, LRU-ordered, at most ``budget_bytes``. ``get`` never evicts: which units
    are resident is decided by the caller (see the module docstring)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.entries: OrderedDict[str, dict] = OrderedDict()

    def get(self, key: str):
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: dict) -> bool:
        size = tensor_bytes(value)
        while self.entries and self.used_bytes + size > self.budget_bytes:
            _, old = self.entries.popitem(last=False)
            self.used_bytes -= tensor_bytes(old)
        if size > self.budget_bytes:
            return False
        self.entries[key] = value
        self.used_bytes += size
        return True

    def clear(self):
        self.entries.clear()
        self.used_bytes = 0


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Generator:
    """Autoregressive generation over a store, one unit of weights in flight at a time beyond the cache."""

    def __init__(self, store: BlockStore | str, device: str = "cpu", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 compute_dtype: torch.dtype | None = None, adapters: AdapterSet | None = None,
                 dense_block_bytes: int = DENSE_BLOCK_BYTES):
        """``adapters`` (LoRA, e.g. ``merge.load_adapters(RUN_DIR/adapter, config)``) are applied to the
        projections they target on every step, without merging them into the weights. ``dense_block_bytes``:
        blocks larger than this in the compute dtype are made one projection at a time (as the engine's
        ``EngineOptions.dense_block_bytes``)."""
        self.store = store if isinstance(store, BlockStore) else BlockStore(store)
        self.config = self.store.config
        # The compute backend (torch, or "mlx": Apple MLX, its KV caches held as MLX arrays); weights are read
        # and unpacked as torch CPU tensors either way.
        try:
            self.backend = make_backend(device if is_mlx_device(device) else check_device(device))
        except DeviceError as error:  # the Generator API reports every refusal as a GenerationError
            raise GenerationError(str(error)) from None
        self.device = self.backend.torch_device
        self.dtype = compute_dtype or default_compute_dtype(self.device)
        self.layout = Layout(self.store.settings)
        self.quantize = self.store.settings.mode == "qat"
        self.lazy_blocks = is_lazy_block(self.config, self.dtype, dense_block_bytes)
        self.units = (["embed"] + [block_unit(i) for i in range(self.config.n_layers)] + ["norm"])
        self.cache = UnitCache(max(int(memory_budget), 0))
        self.policy, self.resident = self._plan(max(int(memory_budget), 0))
        self.prefetcher = Prefetcher(depth=1)
        # What each block adds to its loaded weights: LoRA adapters enter as ``"<projection>.lora"`` entries,
        # which ``model.project`` adds to the projection's output (the engine's seam, so generation computes
        # exactly what training computed); no adapters, nothing added.
        self.block_additions = [adapters.block_adapters(layer, self.device) if adapters is not None else {}
                                for layer in range(self.config.n_layers)]

    def _plan(self, budget: int) -> tuple[str, set[str]]:
        """Choose what stays in memory: everything expanded, everything compact, or a prefix compact."""
        files = self.store.manifest["files"]
        compact = {unit: files[unit]["weights"]["bytes"] for unit in self.store.units}
        element = torch.tensor([], dtype=self.dtype).element_size()
        expanded = {}
        for unit in self.store.units:
            if is_block(unit):
                count = sum(o * i for o, i in self.config.projection_shapes.values())
                expanded[unit] = count * element + sum(self.config.norm_shapes.values()) * 4
            elif unit == "norm":
                expanded[unit] = self.config.dim * 4
            else:
                expanded[unit] = self.config.vocab_size * self.config.dim * element
        if sum(expanded.values()) <= budget:
            return "resident", set(self.store.units)
        if sum(compact.values()) <= budget:
            return "resident-compact", set(self.store.units)
        resident, used = set(), 0
        for unit in self.store.units:  # forward order; a unit too large to fit is skipped, later ones may fit
            if used + compact[unit] > budget:
                continue
            resident.add(unit)
            used += compact[unit]
        return f"streamed ({len(resident)}/{len(self.store.units)} units resident)", resident

    def _load(self, unit: str) -> dict:
        """Compute tensors of ``unit``: from the cache, or read (and cached when resident)."""
        cached = self.cache.get(unit)
        expand_cached = self.policy == "resident"
        if cached is None:
            part = self.store.read(unit, "weights")
            if expand_cached:
                cached = self.layout.forward_tensors(unit, part, self.dtype, self.device)
            else:
                cached = {name: t.to(self.device) for name, t in part.items()}
            if unit in self.resident:
                self.cache.put(unit, cached)
        if expand_cached:
            return cached
        if unit == "embed":
            # As stored: the lookup converts only the rows it gathers (``_step``), not the whole table per token.
            return cached
        if self.lazy_blocks and is_block(unit):
            # Made on the main thread, one projection per matmul, instead of all here on the loader thread.
            return lazy_weights(self.config, self.layout.param_names(cached), lambda name: self.layout.forward_tensor(
                cached, name, self.dtype, self.device))
        return self.layout.forward_tensors(unit, cached, self.dtype, self.device)

    @torch.no_grad()
    def _step(self, ids: torch.Tensor, positions: torch.Tensor, attn_mask, caches: list[dict]) -> torch.Tensor:
        """Run every unit over ``ids`` [B, T]; returns fp32 logits of the last position ``[B, V]``."""
        cos, sin = rope_tables(self.config, positions, self.dtype)
        tied = self.config.tie_embeddings
        # A tied head reuses the embedding loaded at the start of the step rather than reading it again.
        units = self.units + ([] if tied else ["head"])
        x = embedding = None
        stream = self.prefetcher.stream((lambda u=u: self._load(u)) for u in units)
        for index, (unit, tensors) in enumerate(zip(units, stream)):
            if unit == "embed":
                x = F.embedding(ids, tensors["weight"]).to(self.dtype)  # the same values as converting the table
                embedding = tensors["weight"] if tied else None
            elif is_block(unit):
                x = self.backend.block_forward({**tensors, **self.block_additions[index - 1]}, x, self.config,
                                               cos, sin, quantize=self.quantize, kv_cache=caches[index - 1],
                                               attn_mask=attn_mask)
            elif unit == "norm":
                x = self.backend.rms_norm(x[:, -1], tensors["weight"], self.config.norm_eps)
            else:
                embedding = tensors["weight"]
        return self.backend.linear(x, embedding.to(x.dtype)).float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], options: SamplingOptions | None = None, *,
                 stop_ids=None, pad_id: int | None = None, on_token=None) -> Generation:
        """Continue each prompt (a list of token ids); ``on_token(row, token_id)`` is called for every new token.

        Stops a row at any of ``stop_ids`` (or ``options.stop_ids``; the config's EOS when both are None), after
        ``max_new_tokens``, or at the model's context length.
        """
        options = options or SamplingOptions()
        options.validate()
        cfg = self.config
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("every prompt needs at least one token")
        for prompt in prompts:
            bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
            if bad:
                raise GenerationError(f"token ids {bad[:5]} are outside the model's vocabulary "
                                      f"(0..{cfg.vocab_size - 1})")
        longest = max(len(p) for p in prompts)
        if longest >= cfg.max_seq_len:
            raise GenerationError(f"a prompt has {longest} tokens; the model's context is {cfg.max_seq_len}")
        stops = set(stop_ids if stop_ids is not None else options.stop_ids if options.stop_ids is not None
                    else ([cfg.eos_id] if cfg.eos_id is not None else []))
        filler = pad_id if pad_id is not None else (cfg.pad_id if cfg.pad_id is not None else 0)
        batch = len(prompts)
        device = self.device
        read_before = self.store.bytes_read
        generator = torch.Generator().manual_seed(options.seed)

        # Left padding: row b has pads[b] pad tokens, then its prompt; pads are masked out as keys.
        pads = [longest - len(p) for p in prompts]
        ids = torch.tensor([[filler] * pad + list(p) for pad, p in zip(pads, prompts)], dtype=torch.long)
        key_valid = torch.tensor([[False] * pad + [True] * len(p) for pad, p in zip(pads, prompts)])
        lengths = torch.tensor([len(p) for p in prompts])
        seen = torch.zeros(batch, cfg.vocab_size, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            seen[row, prompt] = True
        padded = any(pads)
        positions = (torch.arange(longest)[None, :] - torch.tensor(pads)[:, None]).clamp(min=0) if padded \
            else torch.arange(longest)
        mask = None
        if padded:
            causal = torch.ones(longest, longest, dtype=torch.bool).tril()
            # A pad query may see only itself, so no softmax row is empty (an empty row would give NaN).
            mask = (causal[None] & key_valid[:, None, :]) | torch.eye(longest, dtype=torch.bool)[None]
            mask = mask[:, None].to(device)
        caches = [{} for _ in range(cfg.n_layers)]
        started = time.perf_counter()
        logits = self._step(ids.to(device), positions.to(device), mask, caches)
        prefill_s = time.perf_counter() - started

        tokens = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        finished = [False] * batch
        steps = 0
        started = time.perf_counter()
        for step in range(options.max_new_tokens):
            next_ids = sample_next(logits, seen, options, generator)
            for row in range(batch):
                if finished[row]:
                    continue
                token = int(next_ids[row])
                if token in stops:
                    finished[row], reasons[row] = True, "stop"
                    continue
                tokens[row].append(token)
                seen[row, token] = True
                if on_token is not None:
                    on_token(row, token)
            if all(finished) or step == options.max_new_tokens - 1:
                break
            if longest + step >= cfg.max_seq_len:  # the next token would sit past the context
                reasons = [r if f else "context" for r, f in zip(reasons, finished)]
                break
            # Finished rows keep decoding a filler token whose output is ignored (the batch stays rectangular).
            feed = torch.tensor([[filler if finished[r] else int(next_ids[r])] for r in range(batch)])
            key_valid = torch.cat((key_valid, torch.ones(batch, 1, dtype=torch.bool)), dim=1)
            step_mask = key_valid[:, None, None, :].to(device) if padded else None
            logits = self._step(feed.to(device), lengths[:, None].to(device) if padded else
                                torch.tensor([longest + step], device=device), step_mask, caches)
            lengths += 1
            steps += 1
        decode_s = time.perf_counter() - started
        return Generation(tokens=tokens, stop_reasons=reasons, prompt_tokens=int(sum(len(p) for p in prompts)),
                          prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
                          bytes_read=self.store.bytes_read - read_before, cache_policy=self.policy)

    def close(self):
        """Stop the loader thread and drop cached weights."""
        self.prefetcher.close()
        self.cache.clear()


def decode_continuation(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The text ``tokens`` add after ``prompt``. Decoding them after the prompt's last token and cutting that
    token's text keeps a leading space that sentencepiece drops at the start of a decode."""
    context = prompt[-1:]
    return tokenizer.decode(context + list(tokens))[len(tokenizer.decode(context)):]


class TextStreamer:
    """Writes the text of one row's new tokens as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, prompt: list[int], stream=None, row: int = 0):
        self.tokenizer = tokenizer
        self.prompt = list(prompt)
        self.stream = stream or sys.stdout
        self.row = row
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int):
        if row != self.row:
            return
        self.ids.append(token)
        text = decode_continuation(self.tokenizer, self.prompt, self.ids)
        # A byte-level token may end inside a multi-byte character: wait for the rest.
        if text.endswith("\ufffd"):
            return
        self.stream.write(text[self.printed:])
        self.stream.flush()
        self.printed = len(text)

    def finish(self):
        text = decode_continuation(self.tokenizer, self.prompt, self.ids)
        if len(text) > self.printed:
            self.stream.write(text[self.printed:])
        self.stream.flush()
        self.printed = len(text)
