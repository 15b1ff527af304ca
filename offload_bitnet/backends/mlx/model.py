"""The decoder block in MLX, as plain functions over a dict of arrays (mirrors ``offload_bitnet.model``).

A block's parameters are keyed by transformers' short names (``q_proj`` ... ``down_proj``, ``input_layernorm``,
``post_attention_layernorm``, and for BitNet ``attn_sub_norm``, ``ffn_sub_norm``). A LoRA adapter on a projection
is two more entries, ``"<proj>.lora_a"`` (rank x in) and ``"<proj>.lora_b"`` (out x rank); its scaling and
dropout are arguments. What the projection arrays are is the caller's choice, as in the torch path: unpacked
ternary weights, 16-bit weights widened to the compute dtype, or fp32 shadow weights that ``weight_quantize``
fake-quantizes with a straight-through gradient.

Dropout is active only when a ``key`` is given (training). Each block call gets its key from
``dropout_key(seed, step, micro, layer)``, split into one key per dropout site, so the replay in backward draws
the same masks as the forward pass; the masks differ from the torch path's (another RNG), reproducibly.
"""
from __future__ import annotations


import mlx.core as mx
import numpy as np
import torch

from offload_bitnet.backends.mlx.arrays import to_mx
from offload_bitnet.backends.mlx.ternary import quantize_weight, ste_quantize_activation, ste_quantize_weight
from offload_bitnet.model.block import dropout_seed
from offload_bitnet.model.block import rope_tables as torch_rope_tables
from offload_bitnet.model.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# One dropout key per site of a block call; the LoRA inputs of each projection are sites of their own.
DROPOUT_SITES = ("attention_probs", "attention_residual", "mlp_residual") + PROJECTIONS
LORA_A, LORA_B = ".lora_a", ".lora_b"


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm with fp32 statistics, as LlamaRMSNorm; the result keeps ``x``'s dtype (fp32 norm weights would
    otherwise promote a bf16 block to fp32 from its first norm on)."""
    return mx.fast.rms_norm(x, weight.astype(x.dtype), eps)


def rope_tables(config: ModelConfig, positions, dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
    """cos and sin tables ``[..., T, head_dim]`` in the half-split layout. ``positions``: an int (0..T-1) or an
    array of positions ``[T]`` / ``[B, T]``. The tables are the torch model's (``model.block.rope_tables``), so
    both backends rotate by the same bits: MLX's own cos and sin round differently in the last bit, and an
    8-bit activation code downstream can flip on that."""
    positions = torch.arange(positions) if isinstance(positions, int) else torch.as_tensor(np.asarray(positions))
    cos, sin = torch_rope_tables(config, positions)
    return to_mx(cos, dtype), to_mx(sin, dtype)


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate ``x`` ``[B, H, T, D]`` by tables ``[T, D]`` or ``[B, T, D]`` (transformers' rotate_half layout;
    ``mx.fast.rope(traditional=False)`` is the same rotation, but from its own frequency computation)."""
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def dropout_key(seed: int, step: int, micro: int, layer: int) -> mx.array:
    """The MLX random key of one block call's dropout, from the torch path's seed (``model.block.dropout_seed``)."""
    return mx.random.key(dropout_seed(seed, step, micro, layer))


def site_keys(key: mx.array | None) -> dict[str, mx.array] | None:
    """One key per dropout site of a block call (``DROPOUT_SITES``), split from the block's key."""
    if key is None:
        return None
    return dict(zip(DROPOUT_SITES, mx.random.split(key, len(DROPOUT_SITES))))


def dropout(x: mx.array, p: float, key: mx.array | None) -> mx.array:
    """Inverted dropout with its mask drawn from ``key`` (uniform >= p keeps, as the torch path)."""
    if p <= 0 or key is None:
        return x
    keep = mx.random.uniform(shape=x.shape, key=key) >= p
    return x * keep.astype(x.dtype) / (1.0 - p)


def linear(x: mx.array, weight: mx.array, quantize: float) -> mx.array:
    """``x W^T``; with ``quantize`` the input is fake-quantized to 8 bits (BitLinear). A fraction below 1 mixes
    x + quantize * (Q(x) - x), the gradual switch the torch path uses."""
    if quantize == 1:
        x = ste_quantize_activation(x)
    elif quantize:
        x = x + quantize * (ste_quantize_activation(x) - x)
    if isinstance(weight, LazyProjection):
        return weight.matmul(x)
    return x @ weight.T


class LazyProjection:
    """A projection weight made only while a matmul needs it (the MLX side of the torch engine's
    ``model.LazyWeight``), so that a large block's projections are never all dense at once.

    ``make()`` returns the dense weight as an ``mx.array``, the same bits on every call. ``on_grad(g)``, when
    given, receives dL/dW of each backward through ``matmul`` (the weight is no ``mx.vjp`` primal: its gradient
    leaves by this call, as the torch leaf's ``.grad`` is summed). Each product is evaluated at once, inside the
    call, so the weight can go when it returns: a forward makes the weight once, a backward once more."""

    def __init__(self, make, on_grad=None):
        self.make, self.on_grad = make, on_grad

    def matmul(self, x: mx.array) -> mx.array:
        """``x W^T``, differentiable in ``x`` (and in W through ``on_grad``); the same bits as the dense product."""

        @mx.custom_function
        def product(x):
            y = x @ self.make().T
            mx.eval(y)
            return y

        @product.vjp
        def product_vjp(x, cotangent, output):
            grad_x = cotangent @ self.make()
            if self.on_grad is None:
                mx.eval(grad_x)
            else:
                # The dense vjp's weight gradient, as MLX computes it for x @ W.T: tokens summed in one product.
                grad_w = cotangent.reshape(-1, cotangent.shape[-1]).T @ x.reshape(-1, x.shape[-1])
                mx.eval(grad_x, grad_w)
                self.on_grad(grad_w)
            return (grad_x,)

        return product(x)


def compute_weight(weight: mx.array, weight_quantize: float) -> mx.array:
    """A projection's compute weight from its master: fake-quantized by ``weight_quantize`` in [0, 1] (as the
    engine's ``_compute_weights``: w + mix * (Q(w) - w)), the gradient passing straight through to the master."""
    if weight_quantize and isinstance(weight, LazyProjection):
        raise TypeError("a LazyProjection is a compute weight already: it takes no weight_quantize")
    if weight_quantize == 1:
        return ste_quantize_weight(weight)
    if weight_quantize:
        # The same expression as the torch engine (same rounding); the quantized part carries no gradient.
        return weight + mx.stop_gradient(weight_quantize * (quantize_weight(weight) - weight))
    return weight


def project(params: dict, name: str, x: mx.array, quantize: float, weight_quantize: float,
            keys: dict | None, lora_scaling: float, lora_dropout: float) -> mx.array:
    """One projection of a block, plus its LoRA path when ``params`` holds ``name + ".lora_a"``. The adapter
    sees the unquantized input, as PEFT's does on a BitLinear."""
    y = linear(x, compute_weight(params[name], weight_quantize), quantize)
    lora_a = params.get(name + LORA_A)
    if lora_a is not None:
        h = dropout(x, lora_dropout, None if keys is None else keys[name])
        y = y + ((h @ lora_a.T) @ params[name + LORA_B].T) * lora_scaling
    return y


def attention(params: dict, x: mx.array, config: ModelConfig, cos, sin, *, quantize: float,
              weight_quantize: float = 0.0, attn_dropout: float = 0.0, keys: dict | None = None,
              lora_scaling: float = 1.0, lora_dropout: float = 0.0, kv_cache: dict | None = None,
              attn_mask: mx.array | None = None) -> mx.array:
    """Grouped-query causal self-attention. ``kv_cache`` (a dict) is extended in place when given.
    ``attn_mask``: a boolean ``[B, 1, T, keys]`` mask (True: attend) replacing the causal one (generation's left
    padding builds it, causal part included)."""
    batch, seq, _ = x.shape

    def heads(name: str, count: int) -> mx.array:
        y = project(params, name, x, quantize, weight_quantize, keys, lora_scaling, lora_dropout)
        return y.reshape(batch, seq, count, config.head_dim).transpose(0, 2, 1, 3)

    q, k, v = heads("q_proj", config.n_heads), heads("k_proj", config.n_kv_heads), heads("v_proj", config.n_kv_heads)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_cache is not None:
        if "k" in kv_cache:
            k = mx.concatenate([kv_cache["k"], k], axis=2)
            v = mx.concatenate([kv_cache["v"], v], axis=2)
        kv_cache["k"], kv_cache["v"] = k, v
    scale = config.head_dim ** -0.5
    if attn_dropout > 0 and keys is not None:
        # Dropout on the probabilities needs them explicitly; the fused kernel never forms them.
        groups = config.n_heads // config.n_kv_heads
        if groups > 1:
            k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
        scores = (q @ k.swapaxes(-2, -1)) * scale
        causal = mx.tri(seq, k.shape[2], k=k.shape[2] - seq, dtype=mx.bool_)
        scores = mx.where(causal, scores, -mx.inf)
        probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
        out = dropout(probs, attn_dropout, keys["attention_probs"]) @ v
    else:
        # Lower-right causal alignment: with a cache the last query sees every key (as the explicit path).
        mask = attn_mask if attn_mask is not None else "causal" if seq > 1 else None
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    out = out.transpose(0, 2, 1, 3).reshape(batch, seq, config.n_heads * config.head_dim)
    if config.arch == "bitnet":
        out = rms_norm(out, params["attn_sub_norm"], config.norm_eps)
    return project(params, "o_proj", out, quantize, weight_quantize, keys, lora_scaling, lora_dropout)


def mlp(params: dict, x: mx.array, config: ModelConfig, *, quantize: float, weight_quantize: float = 0.0,
        keys: dict | None = None, lora_scaling: float = 1.0, lora_dropout: float = 0.0) -> mx.array:
    """SwiGLU (llama) or relu² with ``ffn_sub_norm`` (bitnet)."""
    def proj(name, h):
        return project(params, name, h, quantize, weight_quantize, keys, lora_scaling, lora_dropout)

    gate, up = proj("gate_proj", x), proj("up_proj", x)
    if config.arch == "bitnet":
        hidden = rms_norm(mx.square(mx.maximum(gate, 0)) * up, params["ffn_sub_norm"], config.norm_eps)
    else:
        hidden = gate * mx.sigmoid(gate) * up
    return proj("down_proj", hidden)


def block_forward(params: dict, x: mx.array, config: ModelConfig, cos, sin, *, quantize: float,
                  weight_quantize: float = 0.0, dropout_p: float = 0.0, key: mx.array | None = None,
                  lora_scaling: float = 1.0, lora_dropout: float = 0.0, kv_cache: dict | None = None,
                  attn_mask: mx.array | None = None) -> mx.array:
    """One pre-norm decoder block ``[B, T, dim] -> [B, T, dim]``.

    ``quantize``: the activation quantization mix (1 for BitLinear, 0 for plain projections).
    ``weight_quantize``: the weight quantization mix applied to the projection arrays (straight-through); 0 when
    they already are the compute weights (e.g. unpacked ternary weights).
    ``key``: the block call's dropout key (``dropout_key``); dropout on the attention probabilities, both
    residual branches and (with ``lora_dropout``) the LoRA inputs happens only when it is given."""
    keys = site_keys(key)
    options = dict(quantize=quantize, weight_quantize=weight_quantize, keys=keys, lora_scaling=lora_scaling,
                   lora_dropout=lora_dropout)
    h = attention(params, rms_norm(x, params["input_layernorm"], config.norm_eps), config, cos, sin,
                  attn_dropout=dropout_p, kv_cache=kv_cache, attn_mask=attn_mask, **options)
    x = x + dropout(h, dropout_p, None if keys is None else keys["attention_residual"])
    h = mlp(params, rms_norm(x, params["post_attention_layernorm"], config.norm_eps), config, **options)
    return x + dropout(h, dropout_p, None if keys is None else keys["mlp_residual"])


def trainable_names(params: dict, lora: bool) -> list[str]:
    """The names a block's backward differentiates: the LoRA matrices only (``lora``), else every weight and
    norm (full and qat)."""
    return [name for name in params if name.endswith((LORA_A, LORA_B)) == lora]


def block_backward(params: dict, x: mx.array, grad_out: mx.array, config: ModelConfig, cos, sin, *,
                   trainable, quantize: float, weight_quantize: float = 0.0, dropout_p: float = 0.0,
                   key: mx.array | None = None, lora_scaling: float = 1.0,
                   lora_dropout: float = 0.0) -> tuple[mx.array, dict[str, mx.array]]:
    """The replayed backward of one block call: forward again from its input ``x`` with the same dropout
    ``key``, then the vector-Jacobian product with ``grad_out`` (dL/d output).

    Returns ``(dL/dx, {name: dL/dparam})`` for the names in ``trainable`` (see ``trainable_names``). With
    ``weight_quantize`` (or unpacked ternary weights given as the projections), a projection's gradient is its
    master's (straight-through), the one the update applies. The results are lazy: ``mx.eval`` them before they
    are handed on (to an update, the writer) or the block's inputs are dropped, so the graph never spans blocks."""
    names = list(trainable)
    frozen = {name: value for name, value in params.items() if name not in names}

    def replay(x, *weights):
        return block_forward({**frozen, **dict(zip(names, weights))}, x, config, cos, sin, quantize=quantize,
                             weight_quantize=weight_quantize, dropout_p=dropout_p, key=key,
                             lora_scaling=lora_scaling, lora_dropout=lora_dropout)

    _, grads = mx.vjp(replay, [x, *(params[name] for name in names)], [grad_out])
    return grads[0], dict(zip(names, grads[1:]))
