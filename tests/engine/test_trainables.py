"""The trainables: LoRA adapters given to the engine in RAM and committed to their owner's checkpoint; a LoRA run
through the trainer is the same run as through the API (memos included)."""
import copy
import dataclasses
import os

import pytest
import torch

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, create_model
from offload_bitnet.api import open_for_training, open_model
from offload_bitnet.engine.streams import ActivationStash
from offload_bitnet.engine.trainables import LoRA
from offload_bitnet.model.lora import ADAPTER_WEIGHTS, AdapterSet, LoRAConfig
from offload_bitnet.train.trainer import main as finetune_main
from repo_paths import REPO

TEST_DATA = os.path.join(REPO, "test_data")


class MemoryCheckpoint:
    """An AdapterCheckpoint that keeps its commits in RAM: what the engine asks of its owner."""

    def __init__(self):
        self.commits, self.restores, self.saved = [], 0, None

    def commit(self, adapters, step, extra=None):
        adapters.step, adapters.extra = step, extra or {}
        self.commits.append(step)
        self.saved = copy.deepcopy(adapters)

    def restore(self, config, lora):
        self.restores += 1
        return copy.deepcopy(self.saved) if self.saved is not None else AdapterSet(config, lora)


def _batches(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (2, 16), generator=generator), None)]


def test_the_engine_commits_adapters_to_its_owners_checkpoint_and_restores_an_abandoned_step(tmp_path, monkeypatch):
    path = create_model(str(tmp_path / "m"), size="demo", arch="llama", n_layers=2)
    store = BlockStore(path)
    checkpoint = MemoryCheckpoint()
    adapters = AdapterSet(store.config, LoRAConfig(rank=2))
    engine = StreamingEngine(store, EngineOptions(adapters=adapters, adapter_checkpoint=checkpoint,
                                                  optim=AdamWConfig(lr=1e-2)))
    assert engine.adapters is adapters and engine.writer is None
    assert engine.train_step(_batches()).skipped is None
    assert checkpoint.commits == [1] and engine.step == 1
    committed = copy.deepcopy(engine.adapters.weights)

    real_update = LoRA.update_block

    def failing(self, unit, params, state, ctx):
        real_update(self, unit, params, state, ctx)  # block 1's adapters change in place ...
        if unit == "block.000":
            from offload_bitnet.engine.stats import NonFiniteStep
            raise NonFiniteStep("non-finite gradient in block.000 q_proj.lora")

    monkeypatch.setattr(LoRA, "update_block", failing)
    stats = engine.train_step(_batches(2))
    assert stats.skipped == "non-finite gradient in block.000 q_proj.lora" and engine.step == 1
    assert checkpoint.commits == [1] and checkpoint.restores == 1  # ... and are back as committed
    for key, mats in committed.items():
        for matrix, tensor in mats.items():
            assert torch.equal(engine.adapters.weights[key][matrix], tensor), (key, matrix)
    engine.close()


def test_adapters_opened_for_evaluation_are_applied_but_not_trained(tmp_path):
    path = create_model(str(tmp_path / "m"), size="demo", arch="llama", n_layers=2)
    trained = str(tmp_path / "a")
    with StreamingEngine(BlockStore(path), EngineOptions(lora=LoRAConfig(rank=2), adapter_dir=trained,
                                                         optim=AdamWConfig(lr=5e-2))) as engine:
        for _ in range(2):
            engine.train_step(_batches())
        expected = engine.logits(_batches()[0][0])
    with open_model(path, adapter=trained) as engine:
        assert torch.equal(engine.logits(_batches()[0][0]), expected)
        with pytest.raises(RuntimeError, match="evaluation only"):
            engine.train_step(_batches())


def test_a_lora_run_from_the_trainer_keeps_memos_and_is_the_api_run(tmp_path, monkeypatch):
    """finetune.py's LoRA runs once replaced the engine's stash and lost its memo budget (issue 12)."""
    store_path = create_model(str(tmp_path / "base"), size="demo", arch="llama", n_layers=2)
    calls, kept = [], []
    real_step, real_keep = StreamingEngine.train_step, ActivationStash.keep

    def recording_step(self, micro_batches, **kwargs):
        stats = real_step(self, micro_batches, **kwargs)
        calls.append((self.options, self.adapters.lora, micro_batches, kwargs, stats.loss))
        return stats

    def recording_keep(self, key, value, nbytes):
        kept.append(real_keep(self, key, value, nbytes))
        return kept[-1]

    monkeypatch.setattr(StreamingEngine, "train_step", recording_step)
    monkeypatch.setattr(ActivationStash, "keep", recording_keep)
    run_dir = tmp_path / "runs" / "base"
    assert finetune_main([store_path, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir",
                          str(tmp_path / "runs"), "--mode", "lora", "--lora-rank", "4", "--lora-dropout", "0.1",
                          "--dropout", "0.1", "--grad-accum", "2", "--num-train-iters", "3", "--batch-size", "2",
                          "--max-seq-len", "64", "--lr", "1e-2", "--val-fraction", "0.25", "--no-plot",
                          "--no-eval-at-start"]) == 0
    assert len(calls) == 3 and kept and all(kept), "the trainer's LoRA steps kept no projection memos"

    options, lora = calls[0][0], calls[0][1]
    fields = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
    fields.update(adapters=None, adapter_checkpoint=None, lora=lora, adapter_dir=str(tmp_path / "api"),
                  scratch_dir=str(tmp_path / "api-scratch"))
    kept.clear()
    with open_for_training(store_path, **fields) as engine:
        for _, _, micro_batches, kwargs, loss in list(calls):
            kwargs = dict(kwargs, commit_extra=None)
            assert engine.train_step(micro_batches, **kwargs).loss == loss
    assert len(calls) == 6 and kept and all(kept)
    api = open(tmp_path / "api" / ADAPTER_WEIGHTS, "rb").read()
    assert api == open(run_dir / "adapter" / ADAPTER_WEIGHTS, "rb").read()
