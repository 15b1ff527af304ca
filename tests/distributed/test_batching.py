"""Splitting a step's sequences over ranks and micro-batches."""
import pytest
import torch

from offload_bitnet.distributed.batching import (BatchSplitError, local_target_tokens, per_rank_batch,
                                                 rank_micro_batches, rank_sequences)


def test_batch_size_stays_sequences_per_optimizer_step():
    assert per_rank_batch(8, 1, 2) == 4
    assert per_rank_batch(8, 2, 1) == 4
    assert per_rank_batch(8, 2, 2) == 2
    assert per_rank_batch(12, 3, 4) == 1


def test_bad_division_lists_valid_values():
    with pytest.raises(BatchSplitError) as caught:
        per_rank_batch(6, 2, 2)
    message = str(caught.value)
    assert "--batch-size 6 (sequences per optimizer step) does not split over 2 ranks x --grad-accum 2" in message
    assert "Valid --batch-size with --grad-accum 2: 4, 8, 12, 16" in message
    assert "valid --grad-accum with --batch-size 6: 1, 3." in message
    with pytest.raises(BatchSplitError, match="no --grad-accum works with --batch-size 3 on 4 ranks"):
        per_rank_batch(3, 4, 1)
    with pytest.raises(BatchSplitError, match="--grad-accum must be a positive whole number, got 0"):
        per_rank_batch(4, 1, 0)


@pytest.mark.parametrize("world_size,grad_accum", [(1, 4), (2, 2), (4, 1), (2, 1), (1, 2)])
def test_ranks_times_micro_batches_see_the_single_process_micro_batches(world_size, grad_accum):
    batch_size = 8
    single = rank_micro_batches(batch_size, 1, world_size * grad_accum, 0)
    split = [positions for rank in range(world_size)
             for positions in rank_micro_batches(batch_size, world_size, grad_accum, rank)]
    assert split == single  # the same micro-batches, in rank-major order
    assert sorted(i for r in split for i in r) == list(range(batch_size))


def test_rank_sequences_and_local_token_count():
    batch = torch.arange(8 * 3).reshape(8, 3)
    parts = rank_sequences(batch, 2, 2, 1)
    assert [p[:, 0].tolist() for p in parts] == [[12, 15], [18, 21]]
    targets = [torch.tensor([[1, -100, 2]]), torch.tensor([[-100, -100, 0]])]
    assert local_target_tokens(targets) == 3
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 ranks"):
        rank_micro_batches(8, 2, 1, 2)
