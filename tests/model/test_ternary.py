import pytest
import torch

from offload_bitnet.model import ternary


def test_pack_round_trip_and_transformers_layout():
    from transformers.integrations.bitnet import pack_weights

    codes = torch.randint(-1, 2, (16, 7), dtype=torch.int8)
    packed = ternary.pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 7)
    assert torch.equal(ternary.unpack_codes(packed), codes)
    assert torch.equal(packed, pack_weights(codes.clone().to(torch.int32)))


def test_quantize_matches_transformers_weight_and_activation_quant(eager_transformers_quantizers):
    """Bit-equal to transformers' eager arithmetic. (Its torch.compile'd kernels reduce mean|W| in another
    order and can differ by one ulp in the scale; tests/reference/test_parity_transformers.py covers them.)"""
    from transformers.integrations.bitnet import ActQuant, WeightQuant

    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        weight = torch.randn(32, 24, generator=generator) * 0.05
        x = torch.randn(3, 5, 24, generator=generator)
        assert torch.equal(ternary.quantize_weight(weight), WeightQuant.apply(weight))
        assert torch.equal(ternary.quantize_activation(x), ActQuant.apply(x))


def test_packed_weight_equals_quantized_weight():
    weight = torch.randn(64, 48)
    packed, scale = ternary.pack_weight(weight)
    assert scale.shape == (1,)
    assert torch.isclose(scale, weight.abs().mean().reshape(1)).all()
    assert torch.equal(ternary.unpack_weight(packed, scale), ternary.quantize_weight(weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_weight_is_the_packed_codes_of_ternary_codes_byte_for_byte(dtype):
    """The update's packing (fields made in fp32 in place) writes the bytes of ``pack_codes(ternary_codes(w))``,
    with or without a scratch tensor: stores packed before and after it hold the same codes."""
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(128, 40, generator=generator) * 0.02).to(dtype)
    weight.view(-1)[::5] = 0
    codes, scale = ternary.ternary_codes(weight)
    for scratch in (None, torch.empty(weight.shape)):
        packed, packed_scale = ternary.pack_weight(weight, scratch=scratch)
        assert packed.dtype == torch.uint8 and torch.equal(packed, ternary.pack_codes(codes))
        assert torch.equal(packed_scale, scale)
    with pytest.raises(ValueError, match="divisible by 4"):
        ternary.pack_weight(torch.randn(6, 4))


def test_rounding_is_half_to_even_and_zero_weight_is_safe():
    weight = torch.tensor([[0.5, -0.5, 1.5, 0.0]]).repeat(4, 1)
    codes, scale = ternary.ternary_codes(weight, torch.tensor([1.0]))
    assert codes[0].tolist() == [0, 0, 1, 0]
    zero = torch.zeros(4, 4)
    assert torch.equal(ternary.quantize_weight(zero), zero)


def test_straight_through_gradients_pass_unchanged():
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(2, 8, requires_grad=True)
    out = ternary.ste_quantize_weight(weight).sum() + (ternary.ste_quantize_activation(x) * 3).sum()
    out.backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_pack_rejects_rows_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        ternary.pack_codes(torch.zeros(6, 3, dtype=torch.int8))
