"""The lazy-block rule shared by the engine, generation and the plan (``model.block.is_lazy_block``)."""
import torch

from offload_bitnet.model.block import DENSE_BLOCK_BYTES, dense_block_bytes, is_lazy_block
from offload_bitnet.model.config import config_for_size


def test_a_block_is_lazy_only_above_the_limit():
    config = config_for_size("tiny", "bitnet")
    dense = dense_block_bytes(config, torch.float32)
    assert dense == 4 * config.block_param_count() == 2 * dense_block_bytes(config, torch.bfloat16)
    assert not is_lazy_block(config, torch.float32, dense)
    assert is_lazy_block(config, torch.float32, dense - 1)
    assert not is_lazy_block(config, torch.bfloat16, dense - 1)  # the limit counts the compute dtype's bytes


def test_the_default_limit_keeps_7b_and_13b_dense_and_makes_34b_and_70b_lazy():
    lazy = {size: is_lazy_block(config_for_size(size, "bitnet"), torch.float32, DENSE_BLOCK_BYTES)
            for size in ("7B", "13B", "34B", "70B")}
    assert lazy == {"7B": False, "13B": False, "34B": True, "70B": True}
