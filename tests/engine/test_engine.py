import os
import time

import pytest
import torch
import torch.nn.functional as F

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, create_model, open_model
from offload_bitnet.model.loss import chunked_cross_entropy
from offload_bitnet.reference.inmemory import InMemoryModel
from offload_bitnet.reference.parity import run_parity


@pytest.mark.parametrize("mode,dropout", [("qat", 0.1), ("full", 0.1), ("qat", 0.0), ("full", 0.0)])
def test_streamed_step_equals_in_memory_step(tmp_path, mode, dropout):
    result = run_parity(mode, dropout, micro_batches=2, workdir=str(tmp_path))
    assert result.tensors_compared > 30
    assert result.max_rel_err <= 1e-5, result


def test_tied_embeddings_step_equals_in_memory_step(tmp_path):
    result = run_parity("qat", 0.1, micro_batches=2, workdir=str(tmp_path), tie_embeddings=True)
    assert result.max_rel_err <= 1e-5, result


@pytest.mark.parametrize("arch", ["bitnet", "llama"])
def test_streamed_logits_equal_in_memory_logits(tmp_path, arch):
    path = create_model(str(tmp_path / "m"), size="demo", arch=arch, n_layers=2)
    model = open_model(path)
    ids = torch.randint(0, 256, (2, 12))
    reference = InMemoryModel.from_store(model.store)
    assert torch.allclose(model.logits(ids), reference.logits(ids), atol=1e-5)
    expected = F.cross_entropy(reference.logits(ids)[:, :-1].reshape(-1, 260), ids[:, 1:].reshape(-1))
    assert model.loss(ids) == pytest.approx(expected.item(), rel=1e-5)


def test_chunked_cross_entropy_equals_full(tmp_path):
    hidden = torch.randn(3, 10, 16)
    head = torch.randn(50, 16)
    targets = torch.randint(0, 50, (3, 10))
    targets[0, :4] = -100
    weight_grad = torch.full((50, 16), float("nan"))  # overwritten, not added to
    total, grad = chunked_cross_entropy(hidden, head, targets, chunk_tokens=7, scale=0.5, backward=True,
                                        weight_grad=weight_grad)
    h = hidden.clone().requires_grad_()
    head2 = head.clone().requires_grad_()
    full = F.cross_entropy((h @ head2.T).reshape(-1, 50), targets.reshape(-1), ignore_index=-100, reduction="sum") * 0.5
    full.backward()
    assert total == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(grad, h.grad, atol=1e-6)
    assert torch.allclose(weight_grad, head2.grad, atol=1e-6)
    # accumulate adds; all-ignored targets add nothing
    chunked_cross_entropy(hidden, head, targets, 7, 0.5, True, weight_grad=weight_grad, accumulate=True)
    assert torch.allclose(weight_grad, 2 * head2.grad, atol=1e-6)
    ignored = torch.full_like(targets, -100)
    chunked_cross_entropy(hidden, head, ignored, 7, 0.5, True, weight_grad=weight_grad, accumulate=True)
    assert torch.allclose(weight_grad, 2 * head2.grad, atol=1e-6)
    chunked_cross_entropy(hidden, head, ignored, 7, 0.5, True, weight_grad=weight_grad)
    assert torch.count_nonzero(weight_grad) == 0


def test_chunked_cross_entropy_hands_on_final_weight_gradient_rows_in_order():
    hidden = torch.randn(2, 9, 16)
    head = torch.randn(50, 16)
    targets = torch.randint(0, 50, (2, 9))
    expected = torch.empty(50, 16)
    expected_total, expected_grad = chunked_cross_entropy(hidden, head, targets, 4, 1.0, True, weight_grad=expected)
    weight_grad = torch.empty(50, 16)
    seen = []

    def on_rows(rows, loss_so_far):
        assert torch.equal(weight_grad[rows], expected[rows])  # final when handed on
        seen.append((rows.start, rows.stop, loss_so_far))

    total, grad = chunked_cross_entropy(hidden, head, targets, 4, 1.0, True, weight_grad=weight_grad,
                                        on_weight_rows=on_rows, row_slices=3)
    assert [(start, stop) for start, stop, _ in seen] == [(0, 17), (17, 34), (34, 50)]
    assert all(loss == pytest.approx(expected_total) for _, _, loss in seen)
    assert total == expected_total and torch.equal(grad, expected_grad) and torch.equal(weight_grad, expected)


def _train(path, steps, micro, **options):
    engine = StreamingEngine(BlockStore(path, writable=True), EngineOptions(optim=AdamWConfig(lr=1e-3), **options))
    generator = torch.Generator().manual_seed(3)
    stats = []
    for _ in range(steps):
        stats.append(engine.train_step([(torch.randint(0, 256, (1, 16), generator=generator), None)
                                        for _ in range(micro)]))
    engine.close()
    return stats


def test_block_weights_are_read_once_per_step_whatever_the_accumulation(tmp_path):
    reads = {}
    for micro in (1, 4):
        path = create_model(str(tmp_path / f"g{micro}"), size="demo", arch="bitnet", n_layers=3)
        reads[micro] = _train(path, 1, micro)[0].bytes_read  # step 1: nothing is served from the write-behind buffer
    assert reads[1] == reads[4]


def test_activation_spill_gives_identical_results(tmp_path):
    stores = []
    for name, budget in (("ram", 1 << 30), ("spill", 1024)):
        path = create_model(str(tmp_path / name), size="demo", arch="bitnet", n_layers=3)
        stats = _train(path, 2, 2, dropout=0.1, activation_budget_bytes=budget)
        assert (stats[-1].spilled_bytes > 0) == (name == "spill")
        stores.append(InMemoryModel.from_store(BlockStore(path)).named_unit_tensors())
    for unit, tensors in stores[0].items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, stores[1][unit][name]), (unit, name)


def test_same_seed_same_store_and_loss_falls(tmp_path):
    losses = []
    for name in ("a", "b"):
        path = create_model(str(tmp_path / name), size="demo", arch="bitnet", n_layers=2)
        engine = StreamingEngine(BlockStore(path, writable=True),
                                 EngineOptions(dropout=0.1, optim=AdamWConfig(lr=3e-3)))
        batch = [(torch.arange(32).reshape(1, 32) % 7 + 65, None)]
        losses.append([engine.train_step(batch).loss for _ in range(8)])
        engine.close()
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0] - 0.5
    assert BlockStore(str(tmp_path / "a")).step == 8


def test_step_stats_report_io_and_memory(tmp_path):
    path = create_model(str(tmp_path / "m"), size="demo", arch="bitnet", n_layers=2)
    stats = _train(path, 1, 1)[0]
    assert stats.bytes_read > 0 and stats.bytes_written > 0 and stats.peak_rss > 0
    assert 0 <= stats.io_wait_s <= stats.wall_s
    assert "loss" in stats.line() and "peak_rss" in stats.line()


def test_quant_warmup_mix_spans_full_precision_to_ternary(tmp_path):
    path = create_model(str(tmp_path / "m"), size="demo", arch="bitnet", n_layers=2, shadow_dtype="fp32")
    ids = torch.randint(0, 256, (2, 12))
    engine = StreamingEngine(BlockStore(path, writable=True))
    ternary_loss = engine.loss(ids)
    reference = InMemoryModel.from_store(engine.store)
    reference.mode = "full"  # the same shadow weights, no quantization
    full_logits = reference.logits(ids)
    assert torch.allclose(engine.logits(ids, quant_mix=0.0), full_logits, atol=1e-5)
    assert engine.loss(ids, quant_mix=1.0) == ternary_loss
    stats = engine.train_step([(ids, None)], quant_mix=0.5)
    # A step's mix holds for that step only: nothing of it stays on the engine.
    assert stats.step == 1 and not hasattr(engine, "quant_mix")
    with pytest.raises(ValueError, match="quant_mix"):
        engine.loss(ids, quant_mix=-0.1)
    with pytest.raises(ValueError, match="quant_mix"):
        engine.train_step([(ids, None)], quant_mix=1.5)
    engine.close()


def test_non_finite_loss_skips_the_whole_step(tmp_path):
    path = create_model(str(tmp_path / "m"), size="demo", arch="llama", n_layers=2)
    store = BlockStore(path, writable=True)
    weights = dict(store.read("block.001", "weights"))
    weights["up_proj"] = weights["up_proj"].clone()
    weights["up_proj"][0, 0] = float("nan")
    store.write("block.001", "weights", weights, step=0)
    store.commit(0)
    before = {unit: dict(parts) for unit, parts in store.manifest["files"].items()}
    engine = StreamingEngine(store)
    stats = engine.train_step([(torch.randint(0, 256, (1, 16)), None)])
    assert stats.skipped and "non-finite loss" in stats.skipped
    assert engine.step == 0 and stats.step == 0
    engine.flush()
    assert store.manifest["files"] == before and store.step == 0
    committed = {e["file"] for parts in before.values() for e in parts.values()}
    assert set(os.listdir(os.path.join(path, "units"))) == committed
    engine.close()


def test_step_abandoned_after_some_units_were_written_leaves_the_store_as_committed(tmp_path, monkeypatch):
    from offload_bitnet.engine import stats as stats_module
    from offload_bitnet.engine.trainables import FullWeights

    path = create_model(str(tmp_path / "m"), size="demo", arch="bitnet", n_layers=3)
    store = BlockStore(path, writable=True)
    before = {unit: dict(parts) for unit, parts in store.manifest["files"].items()}
    engine = StreamingEngine(store)
    original = FullWeights._apply_update

    def failing(self, unit, *args):
        if unit == "block.000":  # head, norm and blocks 2..1 are already on their way to disk
            raise stats_module.NonFiniteStep("non-finite gradient in block.000 q_proj")
        return original(self, unit, *args)

    monkeypatch.setattr(FullWeights, "_apply_update", failing)
    batch = [(torch.randint(0, 256, (1, 16)), None)]
    stats = engine.train_step(batch)
    assert stats.skipped == "non-finite gradient in block.000 q_proj" and engine.step == 0
    assert store.manifest["files"] == before
    committed = {e["file"] for parts in before.values() for e in parts.values()}
    assert set(os.listdir(os.path.join(path, "units"))) == committed
    monkeypatch.setattr(FullWeights, "_apply_update", original)
    assert engine.train_step(batch).skipped is None and engine.step == 1
    engine.close()
    assert BlockStore(path).step == 1


def _store_tensors(path):
    store = BlockStore(path)
    return {(unit, part): store.read(unit, part) for unit, parts in store.manifest["files"].items() for part in parts}


def test_a_slow_writer_changes_nothing(tmp_path, monkeypatch):
    """Updates run on the writer thread; while a unit's write is still queued, reads of it are served from
    memory, and the next update of it waits for the previous one. None of that may change a bit."""
    from offload_bitnet.store import blockstore as store_module

    results = {}
    for variant in ("writer", "slow-writer"):
        path = create_model(str(tmp_path / variant), size="demo", arch="bitnet", n_layers=3)
        engine = StreamingEngine(BlockStore(path, writable=True),
                                 EngineOptions(dropout=0.1, optim=AdamWConfig(lr=1e-3, weight_decay=0.1)))
        if variant == "slow-writer":
            original = store_module.BlockStore.write

            def slow_write(self, *args, **kwargs):
                time.sleep(0.02)
                return original(self, *args, **kwargs)

            monkeypatch.setattr(store_module.BlockStore, "write", slow_write)
        generator = torch.Generator().manual_seed(5)
        losses = [engine.train_step([(torch.randint(0, 256, (1, 16), generator=generator), None)]).loss
                  for _ in range(3)]
        engine.close()
        monkeypatch.undo()
        results[variant] = (losses, _store_tensors(path))
    reference_losses, reference = results["writer"]
    for variant in ("slow-writer",):
        losses, tensors = results[variant]
        assert losses == reference_losses, variant
        assert tensors.keys() == reference.keys()
        for key, part in reference.items():
            for name, tensor in part.items():
                assert torch.equal(tensor, tensors[key][name]), (variant, key, name)


@pytest.mark.parametrize("arch", ["bitnet", "llama"])
def test_a_learning_rate_that_overflows_the_16_bit_weights_skips_the_step(tmp_path, arch):
    path = create_model(str(tmp_path / "m"), size="demo", arch=arch, n_layers=2)
    before = _store_tensors(path)
    engine = StreamingEngine(BlockStore(path, writable=True), EngineOptions(optim=AdamWConfig(lr=1e6)))
    stats = engine.train_step([(torch.randint(0, 256, (1, 16)), None)])
    assert stats.skipped and "non-finite weight after the update" in stats.skipped and engine.step == 0
    engine.close()
    after = _store_tensors(path)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key][name], tensor) for key, part in before.items() for name, tensor in part.items())


def test_projection_memos_skip_the_replay_matmuls_without_changing_a_bit(tmp_path, monkeypatch):
    """With room in the activation budget, the replay reuses the forward's projection outputs (7 matmuls per
    block fewer); without room it recomputes them. The stores must come out identical."""
    from offload_bitnet.model import block as model_module

    calls, results = {}, {}
    original_linear = model_module.F.linear
    for name, budget in (("memos", 1 << 30), ("inputs-only", 3 * 2 * 16 * 128 * 4)):  # blocks x micro x tokens x dim
        path = create_model(str(tmp_path / name), size="demo", arch="bitnet", n_layers=3)
        count = [0]

        def counting_linear(*args, **kwargs):
            count[0] += 1
            return original_linear(*args, **kwargs)

        monkeypatch.setattr(model_module.F, "linear", counting_linear)
        stats = _train(path, 2, 2, dropout=0.1, activation_budget_bytes=budget)
        monkeypatch.undo()
        assert stats[-1].spilled_bytes == 0
        calls[name] = count[0]
        results[name] = _store_tensors(path)
    assert calls["inputs-only"] - calls["memos"] == 2 * 3 * 2 * 7  # steps x blocks x micro-batches x projections
    for key, part in results["memos"].items():
        for name, tensor in part.items():
            assert torch.equal(tensor, results["inputs-only"][key][name]), (key, name)


def test_the_untied_heads_update_starts_while_the_cross_entropy_still_computes(tmp_path, monkeypatch):
    """The head's rows are handed to the writer as their gradient is final, before the cross-entropy returns; the
    result is the same as updating the head after it (the parity tests compare against torch's AdamW)."""
    import offload_bitnet.engine.backend as engine_module  # the torch backend runs the cross-entropy

    path = create_model(str(tmp_path / "m"), size="demo", arch="llama", mode="full", n_layers=2,
                        tie_embeddings=False)
    engine = StreamingEngine(BlockStore(path, writable=True), EngineOptions())
    events = []
    real_ce, real_update = engine_module.chunked_cross_entropy, engine.writer.update

    def ce(*args, **kwargs):
        result = real_ce(*args, **kwargs)
        events.append("cross-entropy returned")
        return result

    def update(unit, make_parts, step, stealable=True):
        events.append(f"{unit} update queued" + ("" if stealable else " (writer only)"))
        return real_update(unit, make_parts, step, stealable)

    monkeypatch.setattr(engine_module, "chunked_cross_entropy", ce)
    monkeypatch.setattr(engine.writer, "update", update)
    engine.train_step([(torch.randint(0, 256, (1, 16)), None), (torch.randint(0, 256, (1, 16)), None)])
    engine.close()
    assert events[:6] == ["cross-entropy returned"] + ["head update queued (writer only)"] * 4 + \
        ["cross-entropy returned"]
    assert events.count("head update queued (writer only)") == 4


@pytest.mark.parametrize("arch", ["bitnet", "llama"])
@pytest.mark.parametrize("micro", [1, 2])
def test_projections_made_one_at_a_time_change_nothing(tmp_path, arch, micro):
    """Blocks above ``dense_block_bytes`` make each projection when a matmul needs it and drop it after
    (``model.LazyWeight``); the stores must come out identical to whole blocks made dense, with memos and
    without, and with the quantization warm-up mix."""
    results = {}
    for name, dense_bytes in (("dense", 1 << 40), ("lazy", 0)):
        for memo_budget in (None, 0):
            path = create_model(str(tmp_path / f"{name}-{memo_budget}"), size="demo", arch=arch, n_layers=3)
            engine = StreamingEngine(BlockStore(path, writable=True),
                                     EngineOptions(optim=AdamWConfig(lr=1e-3), dropout=0.1,
                                                   dense_block_bytes=dense_bytes, memo_budget_bytes=memo_budget))
            generator = torch.Generator().manual_seed(3)
            losses = [engine.train_step([(torch.randint(0, 256, (1, 16), generator=generator), None)
                                         for _ in range(micro)], quant_mix=mix).loss for mix in (0.5, 1.0)]
            engine.close()
            results[(name, memo_budget)] = losses, _store_tensors(path)
    reference_losses, reference = results[("dense", None)]
    for key, (losses, stored) in results.items():
        assert losses == reference_losses, key
        for part_key, part in reference.items():
            for tensor_name, tensor in part.items():
                assert torch.equal(tensor, stored[part_key][tensor_name]), (key, part_key, tensor_name)


@pytest.mark.parametrize("arch", ["bitnet", "llama"])
def test_resident_forward_parts_are_read_once_and_change_nothing(tmp_path, arch, monkeypatch):
    """With ``resident_bytes`` room for every forward part, steps after the first read no ``weights`` part
    from disk (the updates' new versions are kept as they are made), and the stores come out bit-identical to
    a run that reads every part every step."""
    results, reads = {}, {}
    original_read = BlockStore.read
    for name, budget in (("streamed", 0), ("resident", 1 << 30)):
        path = create_model(str(tmp_path / name), size="demo", arch=arch, n_layers=3)
        log = reads[name] = []

        def logging_read(store, unit, part, pool=None):
            log.append((len(stats), unit, part))
            return original_read(store, unit, part, pool)

        monkeypatch.setattr(BlockStore, "read", logging_read)
        engine = StreamingEngine(BlockStore(path, writable=True),
                                 EngineOptions(optim=AdamWConfig(lr=1e-3), dropout=0.1, resident_bytes=budget))
        generator = torch.Generator().manual_seed(3)
        stats = []
        for _ in range(3):
            stats.append(engine.train_step([(torch.randint(0, 256, (1, 16), generator=generator), None)
                                            for _ in range(2)]))
        engine.close()
        monkeypatch.undo()
        results[name] = [s.loss for s in stats], _store_tensors(path)
    weights_reads = lambda name, step: [r for r in reads[name] if r[0] == step and r[2] == "weights"]  # noqa: E731
    assert weights_reads("resident", 1) == [] and weights_reads("resident", 2) == []
    first = [unit for _, unit, _ in weights_reads("resident", 0)]
    assert sorted(first) == sorted(BlockStore(str(tmp_path / "resident")).units)  # once each, not again in backward
    assert len(weights_reads("streamed", 0)) > len(first)
    assert len(weights_reads("streamed", 2)) > 0
    assert results["streamed"][0] == results["resident"][0]
    for key, part in results["streamed"][1].items():
        for tensor_name, tensor in part.items():
            assert torch.equal(tensor, results["resident"][1][key][tensor_name]), (key, tensor_name)
