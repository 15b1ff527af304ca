"""The MLX backend's math against the torch math it mirrors (fp32, tiny shapes: MLX's CPU matmul is slow).

Every comparison is a max relative error ``max|mlx - torch| / max|torch|`` (printed with ``-s``) within 1e-5,
or exact equality where the operations are exact (unpacking, packing, activation quantization).

Where a block quantizes its activations to 8 bits, the comparison is exact only while no rounding flips: MLX's
reductions (the RMSNorm mean, attention) differ from torch's in the last bit, and an input that lands within an
ulp of a rounding boundary of round(x * 127 / max|x|) takes the other code, a jump of one quantization step
(about 1e-4 relative at these sizes). That happens rarely on tiny blocks (none at the seeds below; about one block
call in 40 here, measured) and surely on large ones: cross-backend checks of quantized models compare statistics,
not 1e-5 bounds, unless the inputs are made bit-identical.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

mx = pytest.importorskip("mlx.core")

from offload_bitnet.model import loss as torch_loss  # noqa: E402
from offload_bitnet.model import block as tm  # noqa: E402
from offload_bitnet.model import ternary as tt  # noqa: E402
from offload_bitnet.backends.mlx import loss as ml  # noqa: E402
from offload_bitnet.backends.mlx import model as mm  # noqa: E402
from offload_bitnet.backends.mlx import optim as mo  # noqa: E402
from offload_bitnet.backends.mlx import ternary as mt  # noqa: E402
from offload_bitnet.backends.mlx.arrays import to_mx, to_numpy, to_torch, tree_to_mx  # noqa: E402
from offload_bitnet.model.lora import LoRAAdapter  # noqa: E402
from offload_bitnet.model.adamw import AdamWConfig, adamw_update as torch_adamw_update  # noqa: E402

from mlx_cases import SEQ, TOLERANCE, block_params, check, config_of, inputs, lora_mats  # noqa: E402


# ------------------------------------------------------------------ block forward and backward

@pytest.mark.parametrize("arch", ["llama", "bitnet"])
@pytest.mark.parametrize("quantize", [0.0, 1.0])
def test_block_forward_matches_torch(arch, quantize):
    config = config_of(arch)
    params = block_params(config)
    x, _ = inputs(config)
    cos, sin = tm.rope_tables(config, torch.arange(SEQ))
    mcos, msin = mm.rope_tables(config, SEQ)
    want = tm.block_forward(params, x, config, cos, sin, quantize=quantize)
    got = mm.block_forward(tree_to_mx(params), to_mx(x), config, mcos, msin, quantize=quantize)
    check(f"block_forward {arch} quantize={quantize}", got, want)


@pytest.mark.parametrize("quantize", [1.0, 0.5])
def test_linear_activation_quantization_matches_torch(quantize):
    """The BitLinear input mix x + q * (Q(x) - x) on the same input as torch: exact up to the matmul, with the
    same (straight-through) gradients. (At block level a mix is not compared: see the module docstring.)"""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 64, generator=generator)
    weight = torch.randn(32, 64, generator=generator) * 0.1
    grad_out = torch.randn(2, 5, 32, generator=generator)
    x_leaf, w_leaf = x.clone().requires_grad_(), weight.clone().requires_grad_()
    want = tm.linear(x_leaf, w_leaf, quantize)
    want.backward(grad_out)
    got, (grad_x, grad_w) = mx.vjp(lambda a, b: mm.linear(a, b, quantize), [to_mx(x), to_mx(weight)],
                                   [to_mx(grad_out)])
    check(f"linear quantize={quantize}", got[0], want, tolerance=1e-6)
    check(f"linear quantize={quantize} grad_x", grad_x, x_leaf.grad, tolerance=1e-6)
    check(f"linear quantize={quantize} grad_w", grad_w, w_leaf.grad, tolerance=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
@pytest.mark.parametrize("mode", ["full", "qat", "qat_unpacked", "lora"])
def test_block_backward_matches_torch_autograd(arch, mode):
    """grad_x and every trainable gradient of the replayed backward against torch autograd of the same block:
    full (fp32 weights), qat from shadow weights (straight-through fake quantization in the block), qat from
    the unpacked packed weights (what the streamed forward computes with; their gradient is the shadow's), and
    LoRA (adapters only, on a BitLinear base)."""
    config = config_of(arch)
    base = block_params(config)
    x, grad_out = inputs(config)
    cos, sin = tm.rope_tables(config, torch.arange(SEQ))
    mcos, msin = mm.rope_tables(config, SEQ)
    quantize = 0.0 if mode == "full" else 1.0
    projections = config.projection_shapes
    if mode == "qat_unpacked":
        base = {n: tt.unpack_weight(*tt.pack_weight(t)) if n in projections else t for n, t in base.items()}

    leaves = {n: t.clone().requires_grad_(mode != "lora") for n, t in base.items()}
    params = {n: tt.ste_quantize_weight(t) if mode == "qat" and n in projections else t for n, t in leaves.items()}
    mlx_params = tree_to_mx(base)
    scaling = 0.75
    if mode == "lora":
        for name, (lora_a, lora_b) in lora_mats(config, ("q_proj", "v_proj", "down_proj")).items():
            lora_a, lora_b = lora_a.requires_grad_(), lora_b.requires_grad_()
            leaves[f"{name}.lora_a"], leaves[f"{name}.lora_b"] = lora_a, lora_b
            params[f"{name}.lora"] = LoRAAdapter(lora_a, lora_b, scaling, 0.0)
            mlx_params[f"{name}.lora_a"], mlx_params[f"{name}.lora_b"] = to_mx(lora_a), to_mx(lora_b)
    x_leaf = x.clone().requires_grad_()
    tm.block_forward(params, x_leaf, config, cos, sin, quantize=quantize).backward(grad_out)

    trainable = mm.trainable_names(mlx_params, lora=mode == "lora")
    assert trainable == [n for n, t in leaves.items() if t.requires_grad]
    grad_x, grads = mm.block_backward(mlx_params, to_mx(x), to_mx(grad_out), config, mcos, msin,
                                      trainable=trainable, quantize=quantize,
                                      weight_quantize=1.0 if mode == "qat" else 0.0, lora_scaling=scaling)
    check(f"block_backward {arch} {mode} grad_x", grad_x, x_leaf.grad)
    worst = max(check(f"block_backward {arch} {mode} d{name}", grads[name], leaves[name].grad) for name in trainable)
    print(f"block_backward {arch} {mode}: worst weight grad max_rel_err {worst:.2e}")


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_explicit_attention_path_matches_torch(arch):
    """With attention dropout the probabilities are formed explicitly (GQA heads repeated, causal mask, fp32
    softmax). At p = 1e-12 every element is kept (and 1 / (1 - p) rounds to 1 in fp32), so that path must give
    torch's no-dropout block."""
    config = config_of(arch)
    params = block_params(config)
    x, _ = inputs(config)
    cos, sin = tm.rope_tables(config, torch.arange(SEQ))
    mcos, msin = mm.rope_tables(config, SEQ)
    want = tm.block_forward(params, x, config, cos, sin, quantize=0.0)
    got = mm.block_forward(tree_to_mx(params), to_mx(x), config, mcos, msin, quantize=0.0, dropout_p=1e-12,
                           key=mm.dropout_key(0, 1, 0, 0))
    check(f"block_forward {arch} explicit attention path", got, want)


def test_weight_quantize_mix_is_the_engines_mix_with_a_straight_through_gradient():
    """weight_quantize in (0, 1): w + mix * (Q(w) - w), as the engine's _compute_weights; its gradient is the
    master's (straight-through), as the engine's update applies it."""
    config = config_of("bitnet")
    params = block_params(config)
    x, grad_out = inputs(config)
    mix = 0.3
    weight = params["q_proj"]
    want = weight.float() + mix * (tt.quantize_weight(weight) - weight)
    got = mm.compute_weight(to_mx(weight), mix)
    check("compute_weight mix 0.3", got, want, tolerance=1e-6)
    _, grads = mx.vjp(lambda w: mm.compute_weight(w, mix) * 2.0, [to_mx(weight)], [mx.ones(weight.shape)])
    assert np.array_equal(to_numpy(grads[0]), np.full(weight.shape, 2.0, dtype=np.float32))


# ------------------------------------------------------------------ dropout keys and replay

def test_dropout_seed_is_the_torch_generators_seed():
    for seed, step, micro, layer in [(0, 1, 0, 0), (1234, 77, 3, 31)]:
        assert mm.dropout_seed(seed, step, micro, layer) == tm.dropout_generator(seed, step, micro, layer,
                                                                                 "cpu").initial_seed()


def test_dropout_replay_is_reproducible_and_keyed_by_layer():
    config = config_of("llama")
    params = tree_to_mx(block_params(config))
    for name, (lora_a, lora_b) in lora_mats(config, ("q_proj", "up_proj")).items():
        params[f"{name}.lora_a"], params[f"{name}.lora_b"] = to_mx(lora_a), to_mx(lora_b)
    x, grad_out = (to_mx(t) for t in inputs(config))
    cos, sin = mm.rope_tables(config, SEQ)
    options = dict(quantize=0.0, dropout_p=0.2, lora_dropout=0.3)
    key = mm.dropout_key(7, 3, 1, 0)

    first = mm.block_forward(params, x, config, cos, sin, key=key, **options)
    again = mm.block_forward(params, x, config, cos, sin, key=mm.dropout_key(7, 3, 1, 0), **options)
    other_layer = mm.block_forward(params, x, config, cos, sin, key=mm.dropout_key(7, 3, 1, 1), **options)
    no_dropout = mm.block_forward(params, x, config, cos, sin, quantize=0.0)
    assert np.array_equal(to_numpy(first), to_numpy(again))
    assert not np.allclose(to_numpy(first), to_numpy(other_layer))
    assert not np.allclose(to_numpy(first), to_numpy(no_dropout))

    names = mm.trainable_names(params, lora=False)
    grad_x, grads = mm.block_backward(params, x, grad_out, config, cos, sin, trainable=names, key=key, **options)
    grad_x2, grads2 = mm.block_backward(params, x, grad_out, config, cos, sin, trainable=names, key=key, **options)
    assert np.array_equal(to_numpy(grad_x), to_numpy(grad_x2))
    assert all(np.array_equal(to_numpy(grads[n]), to_numpy(grads2[n])) for n in names)

    # The replay's gradient is the gradient of the forward pass that used the same masks.
    def forward(x):
        return mx.sum(mm.block_forward(params, x, config, cos, sin, key=key, **options) * grad_out)
    direct = mx.grad(forward)(x)
    assert np.array_equal(to_numpy(direct), to_numpy(grad_x))


def test_kv_cache_decoding_matches_the_full_forward():
    config = config_of("llama")
    params = tree_to_mx(block_params(config))
    x = to_mx(inputs(config)[0])
    cos, sin = mm.rope_tables(config, SEQ)
    full = mm.block_forward(params, x, config, cos, sin, quantize=0.0)
    cache = {}
    prefix = mm.block_forward(params, x[:, :5], config, cos[:5], sin[:5], quantize=0.0, kv_cache=cache)
    steps = [mm.block_forward(params, x[:, t:t + 1], config, cos[t:t + 1], sin[t:t + 1], quantize=0.0,
                              kv_cache=cache) for t in range(5, SEQ)]
    stepped = mx.concatenate([prefix, *steps], axis=1)
    assert np.allclose(to_numpy(stepped), to_numpy(full), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ rope

@pytest.mark.parametrize("scaling", [None,
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                     {"type": "linear", "factor": 4.0}])
def test_rope_tables_are_torchs_bit_for_bit(scaling):
    """Both backends rotate by the same bits (an 8-bit activation code downstream can flip on a last-bit one)."""
    config = config_of("llama", head_dim=32, n_heads=2, n_kv_heads=1, rope_theta=500000.0, rope_scaling=scaling)
    for positions in (torch.arange(300), torch.arange(40).reshape(2, 20) * 3):
        cos, sin = tm.rope_tables(config, positions)
        mcos, msin = mm.rope_tables(config, positions.numpy())
        assert np.array_equal(to_numpy(mcos), cos.numpy()) and np.array_equal(to_numpy(msin), sin.numpy())
    cos, _ = tm.rope_tables(config, torch.arange(17))
    assert np.array_equal(to_numpy(mm.rope_tables(config, 17)[0]), cos.numpy())
    with pytest.raises(ValueError, match="unsupported rope scaling"):
        mm.rope_tables(config_of("llama", rope_scaling={"rope_type": "yarn", "factor": 2.0}), 4)


# ------------------------------------------------------------------ ternary

def test_unpacking_the_stores_packed_weights_is_bit_identical():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 64, generator=generator) * 0.05
    packed, scale = tt.pack_weight(weight)
    want = tt.unpack_weight(packed, scale)
    for given in (packed, packed.numpy()):
        got = mt.unpack_weight(given, scale)
        assert np.array_equal(to_numpy(got), want.numpy())
    assert np.array_equal(to_numpy(mt.unpack_codes(packed)), tt.unpack_codes(packed).numpy())
    # Packing back: the same bytes as the torch packer.
    assert np.array_equal(to_numpy(mt.pack_codes(to_mx(tt.unpack_codes(packed)))), packed.numpy())
    mlx_packed, mlx_scale = mt.pack_weight(to_mx(weight))
    assert np.array_equal(to_numpy(mlx_packed), packed.numpy())
    # gamma is a mean: MLX's reduction order is not torch's, so it may differ in the last bits.
    check("weight_scale", mlx_scale, scale, tolerance=1e-5)
    check("quantize_weight", mt.quantize_weight(to_mx(weight)), tt.quantize_weight(weight), tolerance=1e-5)
    # Given torch's gamma, the codes and the dequantized weight are exact.
    codes, _ = mt.ternary_codes(to_mx(weight), to_mx(scale))
    assert np.array_equal(to_numpy(codes), tt.ternary_codes(weight, scale)[0].numpy())
    assert np.array_equal(to_numpy(mt.dequantize(codes, to_mx(scale))), tt.quantize_weight(weight).numpy())
    with pytest.raises(ValueError, match="divisible by 4"):
        mt.pack_codes(mx.zeros((6, 4), dtype=mx.int8))


def test_activation_quantization_is_exact_and_straight_through():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(to_numpy(mt.quantize_activation(to_mx(x))), tt.quantize_activation(x).numpy())
    _, grads = mx.vjp(mt.ste_quantize_activation, [to_mx(x)], [mx.full(x.shape, 3.0)])
    assert np.array_equal(to_numpy(grads[0]), np.full(x.shape, 3.0, dtype=np.float32))


def test_activation_quantization_breaks_ties_as_torch_does():
    """Inputs exactly on a rounding boundary (absmax 127: scale 1, so x * scale is x): both round half to even,
    so a code that differs between the backends in a qat step comes from inputs that differ, never from ties."""
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -125.5, 3.5]])
    want = tt.quantize_activation(x)
    assert want.tolist() == [[127.0, 0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 126.0, -126.0, 4.0]]
    assert np.array_equal(to_numpy(mt.quantize_activation(to_mx(x))), want.numpy())


# ------------------------------------------------------------------ loss

def test_shift_labels_and_ignore_index_match_the_engine():
    assert ml.IGNORE_INDEX is torch_loss.IGNORE_INDEX
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :3] = -100
    for given in (None, labels):
        want = torch_loss.shift_labels(ids, given)
        got = ml.shift_labels(to_mx(ids), None if given is None else to_mx(given))
        assert np.array_equal(to_numpy(got), want.numpy())


@pytest.mark.parametrize("chunk_tokens", [5, 64])
def test_chunked_cross_entropy_matches_torch(chunk_tokens):
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 16, 64, generator=generator)
    head = torch.randn(101, 64, generator=generator) * 0.1
    targets = torch.randint(0, 101, (2, 16), generator=generator)
    targets[0, :11] = ml.IGNORE_INDEX  # with 5-token chunks, two chunks have no target at all
    targets[1, -1] = ml.IGNORE_INDEX
    scale = 1.0 / int((targets != ml.IGNORE_INDEX).sum())
    weight_grad = torch.empty_like(head)
    want_loss, want_grad = torch_loss.chunked_cross_entropy(hidden, head, targets, chunk_tokens, scale, True,
                                                              weight_grad=weight_grad)
    loss, grad_hidden, grad_head = ml.chunked_cross_entropy(to_mx(hidden), to_mx(head), to_mx(targets),
                                                            chunk_tokens, scale, backward=True)
    full = F.cross_entropy((hidden @ head.T).reshape(-1, 101), targets.reshape(-1), ignore_index=ml.IGNORE_INDEX,
                           reduction="sum") * scale
    assert abs(loss - want_loss) <= TOLERANCE * abs(want_loss)
    assert abs(loss - float(full)) <= TOLERANCE * abs(float(full))
    print(f"chunked_cross_entropy chunk={chunk_tokens}: loss rel err {abs(loss - want_loss) / abs(want_loss):.2e}")
    check(f"chunked_cross_entropy chunk={chunk_tokens} grad_hidden", grad_hidden, want_grad)
    check(f"chunked_cross_entropy chunk={chunk_tokens} grad_head", grad_head, weight_grad)
    loss_only, none_h, none_w = ml.chunked_cross_entropy(to_mx(hidden), to_mx(head), to_mx(targets), chunk_tokens,
                                                         scale, backward=False)
    assert loss_only == loss and none_h is None and none_w is None


# ------------------------------------------------------------------ AdamW

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_update_matches_torch_adamw(weight_decay):
    generator = torch.Generator().manual_seed(7)
    matrix, norm = torch.randn(24, 16, generator=generator), torch.randn(16, generator=generator)
    torch_params = [torch.nn.Parameter(matrix.clone()), torch.nn.Parameter(norm.clone())]
    optimizer = torch.optim.AdamW([{"params": [torch_params[0]], "weight_decay": weight_decay},
                                   {"params": [torch_params[1]], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    state = [(to_mx(matrix), mx.zeros(matrix.shape), mx.zeros(matrix.shape)),
             (to_mx(norm), mx.zeros(norm.shape), mx.zeros(norm.shape))]
    optim_config = AdamWConfig(lr=1e-2, weight_decay=weight_decay)
    own = [(matrix.clone(), torch.zeros_like(matrix), torch.zeros_like(matrix)),
           (norm.clone(), torch.zeros_like(norm), torch.zeros_like(norm))]
    for step in range(1, 5):
        grads = [torch.randn(p.shape, generator=generator) for p in torch_params]
        for param, grad in zip(torch_params, grads):
            param.grad = grad.clone()
        optimizer.step()
        state = [_adamw(s, grad, step, weight_decay) for s, grad in zip(state, grads)]
        for (param, exp_avg, exp_avg_sq), grad in zip(own, grads):
            torch_adamw_update(param, grad, exp_avg, exp_avg_sq, step, optim_config)
    for (param, exp_avg, exp_avg_sq), want, (own_param, own_avg, own_sq) in zip(state, torch_params, own):
        check(f"adamw wd={weight_decay} param {tuple(want.shape)}", param, want.detach(), tolerance=1e-6)
        check(f"adamw wd={weight_decay} exp_avg {tuple(want.shape)}", exp_avg, own_avg, tolerance=1e-6)
        check(f"adamw wd={weight_decay} exp_avg_sq {tuple(want.shape)}", exp_avg_sq, own_sq, tolerance=1e-6)
        check(f"adamw wd={weight_decay} param vs optim.adamw_update", param, own_param, tolerance=1e-6)


def _adamw(state, grad, step, weight_decay):
    param, exp_avg, exp_avg_sq = state
    return mo.adamw_update(param, to_mx(grad), exp_avg, exp_avg_sq, step, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=weight_decay, decay=param.ndim >= 2)


# ------------------------------------------------------------------ arrays

def test_array_conversions_keep_values_and_bits():
    generator = torch.Generator().manual_seed(8)
    values = torch.randn(5, 7, generator=generator)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tensor = values.to(dtype)
        array = to_mx(tensor)
        back = to_torch(array)
        assert back.dtype == dtype and torch.equal(back, tensor)
        assert torch.equal(torch.from_numpy(np.array(to_numpy(to_mx(tensor, mx.float32)))), tensor.float())
    packed = torch.randint(0, 256, (4, 9), dtype=torch.uint8, generator=generator)
    assert to_mx(packed).dtype == mx.uint8 and torch.equal(to_torch(to_mx(packed)), packed)
    converted = tree_to_mx({"weight": values.to(torch.bfloat16), "packed": packed}, mx.float32)
    assert converted["weight"].dtype == mx.float32 and converted["packed"].dtype == mx.uint8
    # MLX -> torch shares the array's memory (no copy on the way out to the store or the writer).
    array = to_mx(values) * 2.0
    assert to_torch(array).data_ptr() == to_numpy(array).ctypes.data == np.array(array, copy=False).ctypes.data
