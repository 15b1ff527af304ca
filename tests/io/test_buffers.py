import torch

from offload_bitnet.io.buffers import MIN_POOLED_BYTES, BufferPool

SHAPE = (512, 1024)  # 2 MiB of fp32: pooled


def test_a_buffer_is_reused_once_no_tensor_views_it():
    pool = BufferPool(keep_bytes=1 << 30)
    first = pool.empty(SHAPE, torch.float32)
    address = first.data_ptr()
    view = first[10:20]
    del first
    assert pool.empty(SHAPE, torch.float32).data_ptr() != address  # a view still uses it
    del view
    again = pool.empty(SHAPE, torch.float32)
    assert again.data_ptr() == address and pool.reused == 1 and pool.allocated == 2


def test_tensors_in_use_are_distinct_and_keep_their_values():
    pool = BufferPool(keep_bytes=1 << 30)
    tensors = [pool.empty(SHAPE, torch.float32).fill_(i) for i in range(4)]
    assert len({t.data_ptr() for t in tensors}) == 4
    assert [t[0, 0].item() for t in tensors] == [0, 1, 2, 3]
    source = torch.randn(SHAPE).half()
    converted = pool.convert(source, torch.float32)
    assert converted.dtype == torch.float32 and torch.equal(converted, source.float())
    assert pool.convert(converted, torch.float32) is converted  # already right: no copy


def test_unused_buffers_beyond_keep_bytes_are_released_least_recently_used_first():
    size = 2 * 2**20
    pool = BufferPool(keep_bytes=3 * size)
    kept = pool.empty(SHAPE, torch.float32)
    for _ in range(2):
        pool.empty((2 * SHAPE[0], SHAPE[1]), torch.float32)  # 4 MiB each, unused again at once
    assert pool.pooled_bytes == 3 * size and pool.reused == 1
    second = pool.empty(SHAPE, torch.float32)  # past keep_bytes: the unused 4 MiB buffer goes
    assert second.data_ptr() != kept.data_ptr() and pool.pooled_bytes == 2 * size
    pool.release()
    assert pool.pooled_bytes == 2 * size  # buffers in use stay
    del second
    pool.release()
    assert pool.pooled_bytes == size


def test_small_tensors_bypass_the_pool():
    pool = BufferPool()
    pool.empty((MIN_POOLED_BYTES // 8,), torch.float32)
    assert pool.allocated == 0
