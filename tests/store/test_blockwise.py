import os

import pytest
import torch

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, create_model
from offload_bitnet.store import blockwise
from offload_bitnet.store.sizing import part_specs, safetensors_bytes
from offload_bitnet.store.units import block_unit
from repo_paths import REPO

ROOT = REPO


def test_signed_codes_keep_sign_and_a_few_percent_of_each_value():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=generator) * torch.exp(torch.randn(3, 1000, generator=generator) * 3)
    x[0, 0] = 0.0
    decoded = blockwise.decode_signed(blockwise.encode_signed(x), x.shape)
    assert decoded.shape == x.shape and decoded[0, 0] == 0
    nonzero = x != 0
    assert torch.equal(decoded[nonzero].sign(), x[nonzero].sign())
    assert ((decoded[nonzero] - x[nonzero]).abs() / x[nonzero].abs()).max() < 0.15


def test_log_codes_keep_small_values_positive_and_zero_exact():
    generator = torch.Generator().manual_seed(1)
    v = torch.rand(777, generator=generator) ** 2 * torch.exp(torch.randn(777, generator=generator) * 4)
    v[5] = 0.0
    decoded = blockwise.decode_log(blockwise.encode_log(v), v.shape)
    assert decoded[5] == 0
    positive = v > 0
    assert (decoded[positive] > 0).all()  # never rounded to zero: Adam would divide by eps alone
    assert ((decoded[positive] - v[positive]).abs() / v[positive]).max() < 0.06


def _plain_codes(blocks: torch.Tensor, levels: int):
    """The coding written out as its formula (how stores made before the in-place version were coded)."""
    positive = blocks > 0
    logs = torch.where(positive, blocks.clamp(min=torch.finfo(torch.float32).tiny).log2(), torch.zeros_like(blocks))
    low = torch.where(positive, logs, torch.full_like(logs, float("inf"))).amin(dim=1)
    high = torch.where(positive, logs, torch.full_like(logs, -float("inf"))).amax(dim=1)
    empty = ~positive.any(dim=1)
    low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    codes = 1 + ((logs - low[:, None]) / span[:, None] * levels).round().clamp(0, levels)
    codes = torch.where(positive, codes, torch.zeros_like(codes))
    values = torch.exp2(low[:, None] + (codes - 1) / levels * (high - low)[:, None])
    return codes, torch.stack((low, high), dim=1), torch.where(codes > 0, values, torch.zeros_like(values))


def test_codes_and_values_are_the_formulas_bit_for_bit():
    """The writer's in-place coding gives the plain formula's codes, ranges and decoded values exactly, on
    zeros, denormals, empty blocks, huge values and a partial last block: old stores read back the same."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(40, 256, generator=generator) * torch.exp(torch.randn(40, 256, generator=generator) * 4) * 1e-4
    x[x.abs() < 1e-6] = 0
    x[3] = 0                                            # an empty block
    x[5, :100] = 1e-42                                  # denormals beside normal values
    x[7, :3] = 1e19                                     # squared, near the float maximum
    x[9] = -2.5                                         # one value, negative
    flat = x.reshape(-1)[:-77]                          # a partial last block (zero-padded)
    blocks = torch.cat((flat, flat.new_zeros(77))).reshape(-1, 256)
    for encode, decode, values, levels in ((blockwise.encode_signed, blockwise.decode_signed, flat, 126),
                                           (blockwise.encode_log, blockwise.decode_log, flat.square(), 254)):
        padded = blocks.abs() if levels == 126 else blocks.square()
        codes, ranges, decoded = _plain_codes(padded, levels)
        if levels == 126:
            codes, decoded = codes * blocks.sign(), decoded * blocks.sign()
        part = encode(values)
        assert torch.equal(part["q"].float(), codes) and torch.equal(part["log2_range"], ranges)
        out = decode(part, values.shape)
        assert torch.equal(out.view(torch.int32), decoded.reshape(-1)[:values.numel()].view(torch.int32))


def test_training_with_8bit_state_stores_a_quarter_and_tracks_fp32(tmp_path):
    text = torch.tensor(list(open(os.path.join(ROOT, "test_data", "demo.txt"), "rb").read()[:4000]))
    losses, sizes = {}, {}
    for dtype in ("fp32", "int8"):
        path = create_model(str(tmp_path / dtype), size="demo", arch="bitnet", n_layers=2, state_dtype=dtype)
        engine = StreamingEngine(BlockStore(path, writable=True), EngineOptions(optim=AdamWConfig(lr=3e-3)))
        generator = torch.Generator().manual_seed(0)
        losses[dtype] = []
        for _ in range(15):
            starts = torch.randint(0, len(text) - 65, (4,), generator=generator)
            losses[dtype].append(engine.train_step([(torch.stack([text[s:s + 64] for s in starts]), None)]).loss)
        engine.close()
        store = BlockStore(path)
        sizes[dtype] = store.disk_bytes()["optim"]
        entry = store.manifest["files"][block_unit(0)]["optim"]
        assert entry["bytes"] == safetensors_bytes(part_specs(store.config, block_unit(0), "optim", store.settings))
    assert sizes["int8"] < sizes["fp32"] * 0.3
    assert losses["int8"][-1] < losses["int8"][0] - 2.0
    assert losses["int8"][-1] == pytest.approx(losses["fp32"][-1], rel=0.02)  # measured: 0.3% after 30 steps
