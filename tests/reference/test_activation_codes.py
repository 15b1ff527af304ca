"""The cross-backend qat check with equal 8-bit activation codes (``reference.activation_codes``): torch's block
math run with the codes MLX chose reproduces MLX's block, the code differences are counted exactly, and the
streamed MLX qat step matches torch autograd with the MLX step's codes (test_backprop.py's check 2)."""
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from offload_bitnet.backends.mlx import model as mm  # noqa: E402
from offload_bitnet.backends.mlx.arrays import to_mx, to_torch, tree_to_mx  # noqa: E402
from offload_bitnet.model import block as tm  # noqa: E402
from offload_bitnet.reference.activation_codes import (recording_mlx_codes, torch_activation_scale,  # noqa: E402
                                                       torch_with_codes)
from offload_bitnet.reference.parity import run_mlx_parity  # noqa: E402

from mlx_cases import SEQ, TOLERANCE, block_params, check, config_of, inputs  # noqa: E402

CALLS_PER_BLOCK = 7  # q, k, v, o, gate, up, down: one quantizer call each


def _mlx_block_codes(params, x, config):
    codes = []
    with recording_mlx_codes(codes):
        out = mm.block_forward(tree_to_mx(params), to_mx(x), config, *mm.rope_tables(config, SEQ), quantize=1.0)
    mx.eval(out, codes)
    return out, [to_torch(c) for c in codes]


def _bitnet_block_case():
    """A BitNet block, its input, MLX's output and activation codes, and torch's rope tables."""
    config = config_of("bitnet")
    params = block_params(config)
    x, _ = inputs(config)
    out, codes = _mlx_block_codes(params, x, config)
    return config, params, x, out, codes, tm.rope_tables(config, torch.arange(SEQ))


def test_torch_block_with_the_mlx_codes_reproduces_the_mlx_block():
    config, params, x, out, codes, (cos, sin) = _bitnet_block_case()
    assert len(codes) == CALLS_PER_BLOCK
    with torch_with_codes(codes) as flips:
        imposed = tm.block_forward(params, x, config, cos, sin, quantize=1.0)
    check("torch block with MLX's activation codes", out, imposed, tolerance=1e-6)
    assert flips.calls == CALLS_PER_BLOCK and flips.elements == sum(c.numel() for c in codes)
    assert flips.differing == 0  # none at this seed: the same codes as torch's own


def test_a_differing_code_is_counted_and_moves_the_output():
    config, params, x, _, codes, (cos, sin) = _bitnet_block_case()
    own = tm.block_forward(params, x, config, cos, sin, quantize=1.0)
    # One code of q_proj's input one step off (at a later token: the first one's query attends to itself only,
    # whatever it is); that input is the first RMSNorm's output.
    normed = tm.rms_norm(x, params["input_layernorm"], config.norm_eps)
    codes[0][0, 5, 0] += 1 if codes[0][0, 5, 0] < 127 else -1
    scaled = (normed * torch_activation_scale(normed))[0, 5, 0].item()
    with torch_with_codes(codes) as flips:
        shifted = tm.block_forward(params, x, config, cos, sin, quantize=1.0)
    assert flips.differing == 1 and flips.per_call[0] == 1 and flips.largest_step == 1
    assert flips.widest_margin == pytest.approx(abs(scaled - int(scaled // 1) - 0.5), abs=1e-6)
    assert (shifted - own).abs().max().item() > 1e-4


def test_recorded_codes_must_line_up_with_the_torch_calls():
    config, params, x, _, codes, (cos, sin) = _bitnet_block_case()
    with pytest.raises(RuntimeError, match="not used"):
        with torch_with_codes(codes + codes[:1]):
            tm.block_forward(params, x, config, cos, sin, quantize=1.0)
    with pytest.raises(RuntimeError, match="more activations"):
        with torch_with_codes(codes[:-1]):
            tm.block_forward(params, x, config, cos, sin, quantize=1.0)
    assert tm.ste_quantize_activation.__module__ == "offload_bitnet.model.ternary"  # restored after an error


def test_streamed_mlx_qat_step_matches_torch_autograd_with_equal_codes(tmp_path):
    result = run_mlx_parity("qat", dropout=0.1, micro_batches=2, workdir=str(tmp_path), n_layers=2, vocab_size=128)
    flips = result.code_flips
    print(f"qat: grads vs torch {result.grad_err:.2e} with {flips.differing} of {flips.elements} codes differing; "
          f"vs torch with MLX's codes {result.grad_vs_same_codes:.2e}")
    assert flips.calls == 2 * 2 * CALLS_PER_BLOCK  # micro-batches x layers x projections
    assert result.grad_vs_same_codes <= TOLERANCE, result.grad_vs_same_codes_worst
    assert flips.largest_step <= 1 and flips.widest_margin <= 1e-3
    if flips.differing == 0:
        assert result.grad_err <= TOLERANCE, result.grad_worst
