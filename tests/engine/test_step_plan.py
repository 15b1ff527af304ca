"""The step plan: typed loads taken by name, so a step that disagrees with its plan fails loudly."""
import os

import pytest
import torch

from offload_bitnet import BlockStore, EngineOptions, StreamingEngine, create_model
from offload_bitnet.engine.step_plan import Load, StepPlan, StepPlanError
from offload_bitnet.engine.streams import Prefetcher
from offload_bitnet.model.lora import LoRAConfig


def _plan(engine, micro_batches):
    from offload_bitnet.engine.context import StepContext

    ctx = StepContext(engine, micro_batches, engine.step + 1, None, engine.options.optim)
    return [(load.unit, load.kind) for load in engine.step_loads(ctx)]


def _batch():
    return [(torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0)), None)]


@pytest.mark.parametrize("tied", [False, True])
def test_full_weights_plan_names_every_load_in_the_order_the_step_takes_them(tmp_path, tied):
    path = create_model(str(tmp_path / "m"), size="demo", arch="bitnet", n_layers=2, tie_embeddings=tied)
    with StreamingEngine(BlockStore(path, writable=True)) as engine:
        forward = [("embed", "forward"), ("block.000", "forward"), ("block.001", "forward")]
        blocks = [("block.001", "masters"), ("block.000", "masters")]
        if tied:
            backward = [("norm", "masters"), ("embed", "masters")] + blocks
        else:  # the head's moments load during the cross-entropy; the embedding ends the step
            backward = [("norm", "masters"), ("head", "masters"), ("head", "moments")] + blocks + \
                       [("embed", "masters"), ("embed", "grad")]
        assert _plan(engine, _batch()) == forward + backward
        assert engine.train_step(_batch()).skipped is None and engine.step == 1


def test_lora_plan_loads_frozen_units_only(tmp_path):
    path = create_model(str(tmp_path / "m"), size="demo", arch="llama", n_layers=2, tie_embeddings=False)
    options = EngineOptions(lora=LoRAConfig(rank=2), adapter_dir=str(tmp_path / "a"))
    with StreamingEngine(BlockStore(path), options) as engine:
        assert _plan(engine, _batch())[3:] == [("norm", "frozen"), ("head", "frozen"), ("block.001", "frozen"),
                                               ("block.000", "frozen")]


def _swap(engine, first, second):
    """A step plan with two of its loads swapped."""
    real = StreamingEngine.step_loads

    def step_loads(self, ctx):
        loads = real(self, ctx)
        keys = [(load.unit, load.kind) for load in loads]
        i, j = keys.index(first), keys.index(second)
        loads[i], loads[j] = loads[j], loads[i]
        return loads
    return step_loads


@pytest.mark.parametrize("first,second", [
    (("block.000", "masters"), ("block.001", "masters")),   # same kind, other unit: the wrong block's tensors
    (("head", "masters"), ("head", "moments")),             # the load taken inside the cross-entropy's callback
    (("embed", "masters"), ("embed", "grad")),
])
def test_a_reordered_plan_fails_loudly_and_commits_nothing(tmp_path, monkeypatch, first, second):
    path = create_model(str(tmp_path / "m"), size="demo", arch="bitnet", n_layers=2, tie_embeddings=False)
    store = BlockStore(path, writable=True)
    before = {unit: dict(parts) for unit, parts in store.manifest["files"].items()}
    engine = StreamingEngine(store)
    monkeypatch.setattr(StreamingEngine, "step_loads", _swap(engine, first, second))
    with pytest.raises(StepPlanError, match="the step plan and the step disagree") as error:
        engine.train_step(_batch())
    # It names what the step asked for and what the plan offered instead (one of the two swapped loads).
    assert any(f"of the step plan is {unit} {kind};" in str(error.value) for unit, kind in (first, second))
    assert engine.step == 0 and store.manifest["files"] == before
    try:
        engine.close()
    except Exception:  # updates queued before the mismatch may still be in the writer
        pass
    assert BlockStore(path).step == 0


def test_take_checks_unit_and_kind_before_taking_and_finish_finds_leftovers():
    prefetcher = Prefetcher(1)
    taken = []
    plan = StepPlan([Load("embed", "forward", lambda: taken.append("embed") or "E"),
                     Load("block.000", "forward", lambda: "B0"),
                     Load("norm", "masters", lambda: "N")], prefetcher)
    with pytest.raises(StepPlanError, match="asked for block.000 forward, but load 0 of the step plan is embed"):
        plan.take("block.000", "forward")
    assert plan.taken == 0
    assert plan.take("embed", "forward") == "E" and plan.take("block.000", "forward") == "B0"
    with pytest.raises(StepPlanError, match="not taken: norm masters"):
        plan.finish()
    assert plan.take("norm", "masters") == "N"
    plan.finish()
    with pytest.raises(StepPlanError, match="after all 3 planned loads"):
        plan.take("embed", "masters")
    with pytest.raises(ValueError, match="unknown load kind"):
        Load("embed", "weights", lambda: None)
    prefetcher.close()


def test_per_step_values_live_in_the_step_not_on_the_engine(tmp_path):
    path = create_model(str(tmp_path / "m"), size="demo", arch="bitnet", n_layers=2)
    with StreamingEngine(BlockStore(path, writable=True)) as engine:
        before = set(vars(engine))
        stats = engine.train_step(_batch(), lr=1e-3, weight_decay=0.5, quant_mix=0.5)
        assert stats.bytes_written > 0
        assert set(vars(engine)) == before  # no attribute made (or left) by the step
        for name in ("quant_mix", "_step_optim", "_submitted_bytes", "lr"):
            assert not hasattr(engine, name), name
    assert os.path.isdir(path)
