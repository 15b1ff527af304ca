"""The decoder math, written as plain functions over a dict of tensors.

A block's parameters are a dict keyed by transformers' short names (``q_proj``, ``input_layernorm``, ...).
The caller decides what those tensors are: dequantized ternary weights, 16-bit weights upcast to the compute
dtype, or straight-through fake-quantized shadow weights under autograd. The functions here know nothing about
files, streaming or optimizers.
"""
from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F

from offload_bitnet.model.config import ModelConfig
from offload_bitnet.model.ternary import ste_quantize_activation


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with fp32 statistics, as LlamaRMSNorm."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama-3 style scaling when ``rope_scaling`` asks for it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling.get("low_freq_factor", 1.0)
        high_freq_factor = scaling.get("high_freq_factor", 4.0)
        old_context = scaling.get("original_max_position_embeddings", 8192)
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type != "default":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")
    return inv_freq


def rope_tables(config: ModelConfig, positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[..., T, head_dim]`` in the half-split layout (transformers' rotate_half)."""
    inv_freq = rope_inverse_frequencies(config).to(positions.device)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by tables ``[T, D]`` or ``[B, T, D]``."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout drawing its mask from ``generator``, so a replay with the same state gets the same mask."""
    if p <= 0 or generator is None:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


def dropout_seed(seed: int, step: int, micro: int, layer: int) -> int:
    """The 63-bit seed of one block call's dropout, from (run seed, step, micro-batch, layer): every backend seeds
    its RNG with it, so a replay (and a resumed run) draws the same masks."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dropout_generator(seed: int, step: int, micro: int, layer: int, device) -> torch.Generator:
    """The dropout RNG of one block call, seeded from (run seed, step, micro-batch, layer)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(dropout_seed(seed, step, micro, layer))
    return generator


class ProjectionMemo:
    """The outputs of one block call's projections, kept from the forward pass for its replay in backward.

    The replay recomputes the block from its saved input to rebuild the autograd graph; with a memo, each
    projection reuses the output the forward pass computed instead of redoing the matmul (the replay's inputs
    and weights are bit-identical to the forward's, so is the output), and its backward is the one autograd
    gives ``F.linear``. The replay then costs the elementwise work and attention, not the matmuls.
    """

    def __init__(self):
        self.outputs: dict[str, torch.Tensor] = {}
        self.replaying = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.outputs.values())


class _LinearFromOutput(torch.autograd.Function):
    """``F.linear(x, weight)`` whose output is already known: forward returns it, backward is linear's."""

    @staticmethod
    def forward(ctx, x, weight, output):
        ctx.save_for_backward(x, weight)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # The same matrix products, in the same orientation, as autograd's backward of F.linear: bit-identical.
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_2d.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


class LazyWeight:
    """A projection weight made when a matmul needs it and dropped after it, so that a block's projections are
    never all dense at once (a 70B block is 3.4 GB in fp32; its 2-bit packed form 0.2 GB).

    ``make()`` returns the dense weight in the compute dtype, bit-identical on every call. ``keep``: the first
    made tensor is kept for later calls (a step with several micro-batches uses each weight once per
    micro-batch; the kept tensors then cost one block, as dense weights did). ``requires_grad``: the backward
    pass sums the weight's gradient into ``grad``, as autograd does for a leaf."""

    def __init__(self, make, keep: bool = False, requires_grad: bool = False):
        self.make_dense, self.keep, self.requires_grad = make, keep, requires_grad
        self.grad: torch.Tensor | None = None
        self.grad_dtype: torch.dtype | None = None  # what ``grad`` sums in (None: the compute dtype)
        self._kept: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self._kept is not None:
            return self._kept
        weight = self.make_dense()
        if self.keep:
            self._kept = weight
        return weight


# Blocks whose dense compute weights are larger than this are made one projection at a time (``LazyWeight``):
# 7B and 13B blocks (0.8 and 1.3 GB in fp32) stay dense, 34B and up are lazy (a 70B block is 3.4 GB).
DENSE_BLOCK_BYTES = 2 << 30


def dense_block_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one block's compute weights, all made at once in ``dtype``."""
    return config.block_param_count() * torch.empty((), dtype=dtype).element_size()


def is_lazy_block(config: ModelConfig, dtype: torch.dtype, limit_bytes: int = DENSE_BLOCK_BYTES) -> bool:
    """The rule of every streamed pass (training, evaluation, generation, and the plan that predicts them):
    a block whose dense compute weights exceed ``limit_bytes`` gets its projections as ``LazyWeight``s, so
    memory stays a few projections rather than a few blocks; smaller blocks are made dense once per pass."""
    return dense_block_bytes(config, dtype) > limit_bytes


def lazy_weights(config: ModelConfig, names, make_one, keep: bool = False, requires_grad: bool = False) -> dict:
    """``{name: tensor}`` for one block: each projection a ``LazyWeight`` of ``make_one(name)``, the norms (small)
    made at once."""
    projections = config.projection_shapes
    return {name: LazyWeight(functools.partial(make_one, name), keep, requires_grad) if name in projections
            else make_one(name) for name in names}


class _LazyLinear(torch.autograd.Function):
    """``F.linear(x, weight.dense())`` that saves only ``x``: backward makes the weight again. ``output``: the
    result already known from a memo (no matmul, no weight)."""

    @staticmethod
    def forward(ctx, x, weight, output):
        ctx.save_for_backward(x)
        ctx.weight = weight
        if output is not None:
            return output.view_as(output)
        return F.linear(x, weight.dense())

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        dense = weight.dense()
        # The products of autograd's backward of F.linear, in its orientation (as _LinearFromOutput).
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_2d.mm(dense).view(x.shape) if ctx.needs_input_grad[0] else None
        del dense
        if weight.requires_grad:
            grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
            if weight.grad is None:
                weight.grad = grad_weight if weight.grad_dtype is None else grad_weight.to(weight.grad_dtype)
            else:
                weight.grad.add_(grad_weight)
        return grad_x, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, quantize: float, memo: ProjectionMemo | None = None,
           name: str = "") -> torch.Tensor:
    """``x W^T``; with ``quantize`` the input is fake-quantized to 8 bits (BitLinear). A fraction below 1 mixes
    x + quantize * (Q(x) - x), for a gradual switch to quantization. ``memo``: record the output under
    ``name``, or (replaying) reuse the recorded one."""
    if quantize == 1:
        x = ste_quantize_activation(x)
    elif quantize:
        x = x + quantize * (ste_quantize_activation(x) - x)
    if isinstance(weight, LazyWeight):
        known = memo.outputs.pop(name) if memo is not None and memo.replaying else None
        output = _LazyLinear.apply(x, weight, known)
        if memo is not None and not memo.replaying:
            memo.outputs[name] = output
        return output
    if memo is None:
        return F.linear(x, weight)
    if memo.replaying:
        return _LinearFromOutput.apply(x, weight, memo.outputs.pop(name))
    memo.outputs[name] = output = F.linear(x, weight)
    return output


def project(params: dict, name: str, x: torch.Tensor, quantize: float, generator=None,
            memo: ProjectionMemo | None = None) -> torch.Tensor:
    """One projection of a block, plus its LoRA adapter when ``params`` holds one under ``name + ".lora"``."""
    y = linear(x, params[name], quantize, memo, name)
    adapter = params.get(name + ".lora")
    if adapter is not None:
        y = y + adapter(x, generator)
    return y


def attention(params: dict, x: torch.Tensor, config: ModelConfig, cos, sin, *, quantize: float,
              attn_dropout: float = 0.0, generator=None, kv_cache=None, attn_mask=None, memo=None) -> torch.Tensor:
    """Grouped-query causal self-attention. ``kv_cache`` (a dict) is extended in place when given."""
    batch, seq, _ = x.shape

    def heads(name: str, count: int) -> torch.Tensor:
        y = project(params, name, x, quantize, generator, memo)
        return y.view(batch, seq, count, config.head_dim).transpose(1, 2)

    q, k, v = heads("q_proj", config.n_heads), heads("k_proj", config.n_kv_heads), heads("v_proj", config.n_kv_heads)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_cache is not None:
        if "k" in kv_cache:
            k = torch.cat((kv_cache["k"], k), dim=2)
            v = torch.cat((kv_cache["v"], v), dim=2)
        kv_cache["k"], kv_cache["v"] = k, v
    groups = config.n_heads // config.n_kv_heads
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if attn_dropout > 0 and generator is not None:
        scores = (q @ k.transpose(-2, -1)) * (config.head_dim ** -0.5)
        causal = torch.ones(seq, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - seq)
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), attn_dropout, generator)
        out = probs @ v
    elif attn_mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
    out = out.transpose(1, 2).reshape(batch, seq, config.n_heads * config.head_dim)
    if config.arch == "bitnet":
        out = rms_norm(out, params["attn_sub_norm"], config.norm_eps)
    return project(params, "o_proj", out, quantize, generator, memo)


def mlp(params: dict, x: torch.Tensor, config: ModelConfig, *, quantize: float, generator=None,
        memo=None) -> torch.Tensor:
    gate = project(params, "gate_proj", x, quantize, generator, memo)
    up = project(params, "up_proj", x, quantize, generator, memo)
    if config.arch == "bitnet":
        hidden = rms_norm(F.relu(gate).square() * up, params["ffn_sub_norm"], config.norm_eps)
    else:
        hidden = F.silu(gate) * up
    return project(params, "down_proj", hidden, quantize, generator, memo)


def block_forward(params: dict, x: torch.Tensor, config: ModelConfig, cos, sin, *, quantize: float,
                  dropout_p: float = 0.0, generator: torch.Generator | None = None,
                  kv_cache=None, attn_mask=None, memo: ProjectionMemo | None = None) -> torch.Tensor:
    """One pre-norm decoder block. ``quantize``: 1 (or True) for BitLinear projections, 0 for plain ones.
    Dropout (attention probabilities, both residual branches, LoRA inputs) is active only when a
    ``generator`` is given, i.e. in training. ``memo``: see ``ProjectionMemo``."""
    h = rms_norm(x, params["input_layernorm"], config.norm_eps)
    h = attention(params, h, config, cos, sin, quantize=quantize, attn_dropout=dropout_p, generator=generator,
                  kv_cache=kv_cache, attn_mask=attn_mask, memo=memo)
    x = x + dropout(h, dropout_p, generator)
    h = mlp(params, rms_norm(x, params["post_attention_layernorm"], config.norm_eps), config, quantize=quantize,
            generator=generator, memo=memo)
    return x + dropout(h, dropout_p, generator)


def init_block(config: ModelConfig, generator: torch.Generator, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random fp32 parameters of one block: normal(0, std) projections, unit norms."""
    params = {name: torch.randn(shape, generator=generator) * std for name, shape in config.projection_shapes.items()}
    params.update({name: torch.ones(size) for name, size in config.norm_shapes.items()})
    return params
