"""The engine's training step on several gloo ranks (``rank_runs.launch``) and on one process, on tiny stores:
the runs the exactness tests compare tensor by tensor."""
from __future__ import annotations

import os

import torch

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, create_model
from offload_bitnet.distributed.batching import rank_sequences
from offload_bitnet.distributed.rank_stores import make_rank_store
from offload_bitnet.distributed.sharding import rank_store_dir, shard_plan
from offload_bitnet.model.lora import ADAPTER_WEIGHTS, LoRAConfig
from rank_runs import ALONE_S

# mode -> (arch, create_model overrides): qat on a tied BitNet, full on an untied LLaMA (both head paths)
MODELS = {"qat": ("bitnet", {"tie_embeddings": True}), "full": ("llama", {"tie_embeddings": False}),
          "lora": ("llama", {"tie_embeddings": False})}
SEQ_LEN = 12


def make_model(folder, mode: str, shadow_dtype: str = "fp16", n_layers: int = 2) -> str:
    arch, overrides = MODELS[mode]
    # One thread, whoever calls (a module fixture runs before the tests' thread pinning): the ternary scales
    # are reductions whose rounding depends on the thread count, and the runs compared must start equal.
    torch.set_num_threads(1)
    return create_model(os.path.join(str(folder), "model"), size="demo", arch=arch, n_layers=n_layers,
                        mode="full" if mode == "lora" else mode, shadow_dtype=shadow_dtype, **overrides)


def make_rank_stores(model: str, folder, world_size: int) -> list[str]:
    source = BlockStore(model)
    plan = shard_plan(source.config, world_size, source.settings)
    paths = [rank_store_dir(str(folder), rank) for rank in range(world_size)]
    for rank, path in enumerate(paths):
        make_rank_store(source, path, plan, rank).close()
    source.close()
    return paths


def step_batch(step: int, batch_size: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """The sequences of optimizer step ``step``, the same on every rank (as the trainer draws them)."""
    generator = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 260, (batch_size, seq_len), generator=generator)
    ids[0, -3:] = ids[-1, -3:]  # a token in several micro-batches (the embedding's sum order matters)
    return ids


def options(mode: str, adapter_dir: str | None, exact: bool = False) -> EngineOptions:
    lora = LoRAConfig(rank=2) if mode == "lora" else None
    return EngineOptions(optim=AdamWConfig(lr=1e-2), lora=lora, adapter_dir=adapter_dir, exact_grad_sums=exact)


def train(store_path: str, mode: str, steps: int, batch_size: int, grad_accum: int, context=None,
          adapter_dir: str | None = None, measured: dict | None = None, seq_len: int = SEQ_LEN,
          exact: bool = False) -> list[float]:
    """Train ``steps`` steps of ``step_batch`` (this rank's micro-batches); returns the losses. ``measured``:
    filled with each step's wall time, tokens and bytes written, and the run's seconds in collectives.
    ``exact``: exact (float64) gradient sums."""
    from offload_bitnet.distributed.commit import RankCommit
    from offload_bitnet.distributed.trainable import distribute
    world, rank = (context.world_size, context.rank) if context else (1, 0)
    store = BlockStore(store_path, writable=mode != "lora")
    if context is not None and mode != "lora":
        RankCommit(context, store).recover()
    engine = StreamingEngine(store, options(mode, adapter_dir, exact))
    if context is not None:
        distribute(engine, context)
    losses = []
    if measured is not None:
        measured["start"] = engine.step
    with engine:
        for step in range(engine.step + 1, steps + 1):
            micro = rank_sequences(step_batch(step, batch_size, seq_len), world, grad_accum, rank)
            stats = engine.train_step([(ids, None) for ids in micro])
            assert stats.skipped is None, stats.skipped
            losses.append(stats.loss)
            if measured is not None:
                for name, value in (("wall_s", stats.wall_s), ("tokens", stats.tokens),
                                    ("bytes_written", stats.bytes_written), ("bytes_read", stats.bytes_read),
                                    ("io_wait_s", stats.io_wait_s)):
                    measured.setdefault(name, []).append(value)
        if measured is not None:
            measured["collective_s"] = dict(getattr(engine.trainable, "seconds", {}))
    return losses


def train_program(store_dirs: list[str], mode: str, steps: int, batch_size: int, grad_accum: int,
                  adapter_dirs: list[str] | None = None, seq_len: int = SEQ_LEN, exact: bool = False) -> dict:
    """One rank of a distributed run (``rank_runs.launch``): its losses and measurements."""
    from offload_bitnet.distributed.env import init_distributed, named_rank_errors
    context = init_distributed("cpu", timeout_s=ALONE_S)

    @named_rank_errors(context)
    def run():
        adapter_dir = adapter_dirs[context.rank] if adapter_dirs else None
        measured = {}
        losses = train(store_dirs[context.rank], mode, steps, batch_size, grad_accum, context, adapter_dir,
                       measured, seq_len, exact)
        return {"losses": losses, "measured": measured, "start": measured["start"], "step": steps}
    try:
        return run()
    finally:
        context.close()


def store_tensors(path: str) -> dict:
    """(unit, part) -> {name: tensor} of a store's committed step."""
    store = BlockStore(path)
    try:
        return {(unit, part): store.read(unit, part) for unit, parts in store.manifest["files"].items()
                for part in parts}
    finally:
        store.close()


def gathered_tensors(rank_paths: list[str]) -> dict:
    """The parts of a distributed run as one store would hold them: every rank's ``weights`` must be the same
    (asserted), the shadow and moments come from their owner."""
    out = {}
    for path in rank_paths:
        for key, tensors in store_tensors(path).items():
            if key in out:
                assert key[1] == "weights", f"{key} on two ranks"
                assert_equal(out[key], tensors, f"{key} differs between ranks")
            else:
                out[key] = tensors
    return out


def adapter_tensors(folder: str) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, ADAPTER_WEIGHTS))


def assert_equal(a: dict, b: dict, what: str = ""):
    assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
    for key in a:
        if isinstance(a[key], dict):
            assert_equal(a[key], b[key], f"{what} {key}")
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (what, key)


def max_relative_difference(a: dict, b: dict) -> float:
    """The largest |a - b| / max|a| over the floating tensors (the packed and integer ones must be equal, or
    differ in few elements: one ternary flip is reported as its relative size)."""
    worst = 0.0
    for key in a:
        if isinstance(a[key], dict):
            worst = max(worst, max_relative_difference(a[key], b[key]))
            continue
        x, y = a[key].float(), b[key].float()
        scale = max(float(x.abs().max()), 1e-30)
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def warmup_program(store_dirs: list[str]) -> dict:
    """One qat step with the quantization warm-up (quant_mix < 1) on a rank: refused across ranks."""
    from offload_bitnet.distributed.env import init_distributed, named_rank_errors
    from offload_bitnet.distributed.trainable import distribute
    context = init_distributed("cpu", timeout_s=ALONE_S)

    @named_rank_errors(context)
    def run():
        with distribute(StreamingEngine(BlockStore(store_dirs[context.rank], writable=True)), context) as engine:
            ids = rank_sequences(step_batch(1, 4), context.world_size, 1, context.rank)[0]
            engine.train_step([(ids, None)], quant_mix=0.5)
    try:
        return run()
    finally:
        context.close()


def open_program(model: str, run_dir: str) -> dict:
    """Open this rank's store of a run twice (made at the first open, reopened at the second)."""
    from offload_bitnet.distributed.env import init_distributed, named_rank_errors
    from offload_bitnet.distributed.launch import open_rank_store
    context = init_distributed("cpu", timeout_s=ALONE_S)

    @named_rank_errors(context)
    def run():
        found = []
        for _ in range(2):
            store, step = open_rank_store(context, model, run_dir)
            found.append({"path": store.path, "step": step, "units": sorted(
                (unit, part) for unit, parts in store.manifest["files"].items() for part in parts)})
            store.close()
        return {"opens": found}
    try:
        return run()
    finally:
        context.close()


def huge_lr_program(store_dirs: list[str], mode: str) -> dict:
    """On a rank: a step whose learning rate overflows the 16-bit weights (found by each unit's owner), then a
    step at the configured one. Returns both steps' skip reasons and the engine's step after each."""
    from offload_bitnet.distributed.env import init_distributed, named_rank_errors
    from offload_bitnet.distributed.trainable import distribute
    context = init_distributed("cpu", timeout_s=ALONE_S)

    @named_rank_errors(context)
    def run():
        store = BlockStore(store_dirs[context.rank], writable=True)
        with distribute(StreamingEngine(store, options(mode, None)), context) as engine:
            found = {}
            for name, lr in (("huge", 1e6), ("configured", None)):
                ids = rank_sequences(step_batch(1, 4), context.world_size, 1, context.rank)[0]
                stats = engine.train_step([(ids, None)], lr=lr)
                found[name] = {"skipped": stats.skipped, "step": engine.step}
            return found
    try:
        return run()
    finally:
        context.close()
