"""Bytes read and written per optimizer step, split into forward and backward, by part (weights/shadow/optim).

The engine's ``StepStats`` gives a step's total; to split it, the bench opens the store through a subclass of
``BlockStore`` that records every read and write with the phase it belongs to. The phase comes from the
engine's load jobs (``forward_job``: what forward streams; ``update_job`` and ``moments_job``: what the
backward pass loads; ``_read_stored``: the moments and shadow an update reads), which a subclass of ``StreamingEngine``
wraps; the tag is thread-local, so it is exact whichever thread reads. Nothing in the engine or store is changed.

Target (``qat``): forward reads <= 2.1 bits per ternary projection weight plus the bytes of the
non-projection tensors the same pass reads (embedding and norms at their stored dtypes; for the evaluation
forward also the final norm and the head). The bound is computed from the config and printed beside the
measurement. ``full`` is printed the same way (16-bit projections: no target).

Usage: ``python bench/io_per_step.py [--quick] [--dim 512 --layers 8 --heads 8 --vocab 32000 --seq 128]``.
"""
from __future__ import annotations

import argparse
import math
import sys
import threading
from collections import defaultdict

import _common as c
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine
from offload_bitnet.store.blockstore import DTYPES, BlockStore
from offload_bitnet.store.units import block_unit, is_block

_phase = threading.local()


class RecordingStore(BlockStore):
    """A ``BlockStore`` that logs (phase, unit, part, bytes) for every read and write."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, str, str, int]] = []

    def read(self, unit, part, pool=None):
        return self._logged_read(super().read, unit, part, pool)

    def read_lazily(self, unit, part, pool=None):  # the updates' reads of old shadows and moments
        return self._logged_read(super().read_lazily, unit, part, pool)

    def _logged_read(self, read, unit, part, pool):
        with self._lock:  # reads run on several threads: count this one's bytes, not another's
            size = self._working[unit][part]["bytes"]
        tensors = read(unit, part, pool)
        self.log.append((getattr(_phase, "name", "other"), unit, part, size))
        return tensors

    def write(self, unit, part, tensors, step):
        super().write(unit, part, tensors, step)
        with self._lock:  # writes run on two threads: this write's size, not a difference of totals
            size = self._working[unit][part]["bytes"]
        self.log.append(("write", unit, part, size))


class PhaseEngine(StreamingEngine):
    """Tags the reads of forward load jobs as ``forward`` and of the backward pass's load jobs as ``backward``."""

    def forward_job(self, unit, quant_mix=1.0, keep=False):
        job = super().forward_job(unit, quant_mix, keep)
        return lambda: _tagged("forward", job)

    def update_job(self, unit, quant_mix, with_moments=True):
        job = super().update_job(unit, quant_mix, with_moments)
        return lambda: _tagged("backward", job)

    def moments_job(self, unit):
        job = super().moments_job(unit)
        return lambda: _tagged("backward", job)

    def _read_stored(self, unit, part):  # called by the updates, on the writer or main thread
        return _tagged("backward", lambda: super(PhaseEngine, self)._read_stored(unit, part))


def _tagged(name, job):
    _phase.name = name
    try:
        return job()
    finally:
        _phase.name = "other"


def forward_bound(config: ModelConfig, shadow_dtype: str, units: list[str], bits_per_proj: float):
    """Bytes allowed for reading ``units``' forward tensors: ``bits_per_proj`` per projection weight plus
    every other tensor at its stored size. Returns (bound bytes, projection weights, non-projection bytes)."""
    matrix_bytes = DTYPES[shadow_dtype].itemsize
    proj_weights = sum(o * i for o, i in config.projection_shapes.values())
    n_proj = other = 0
    for unit in units:
        if is_block(unit):
            n_proj += proj_weights
            other += 4 * sum(config.norm_shapes.values())  # norms are stored fp32
        elif unit == "norm":
            other += 4 * config.dim
        else:  # embed, head
            other += config.vocab_size * config.dim * matrix_bytes
    return math.floor(n_proj * bits_per_proj / 8 + other), n_proj, other


def summarize(log, phase):
    by_part = defaultdict(int)
    for tag, _unit, part, size in log:
        if tag == phase:
            by_part[part] += size
    return dict(by_part)


def parts_line(by_part: dict, n_params: int) -> str:
    total = sum(by_part.values())
    detail = ", ".join(f"{part} {c.mib(size)}" for part, size in sorted(by_part.items()))
    return f"{c.mib(total):>12} ({total * 8 / n_params:6.2f} bits/param)  [{detail}]"


def run_mode(mode: str, args, work: str):
    arch = "bitnet" if mode == "qat" else "llama"
    config = c.bench_config(arch, args.dim, args.layers, args.heads, args.vocab)
    path = c.make_store(f"{work}/{mode}", config, mode)
    store = RecordingStore(path, writable=True)
    engine = PhaseEngine(store, EngineOptions())
    ids = c.token_batch(config, args.seq)
    n_params = config.param_count()
    print(f"-- {mode} ({arch}): dim {config.dim}, {config.n_layers} blocks, heads {config.n_heads}, hidden "
          f"{config.hidden_dim}, vocab {config.vocab_size} untied, {n_params / 1e6:.1f}M params, seq {args.seq}")
    steps = []
    try:
        for _ in range(args.steps):
            store.log.clear()
            written_before = store.bytes_written
            stats = engine.train_step([(ids, None)])
            engine.flush()  # the writes of a step land behind it; count them all
            steps.append((stats, list(store.log), store.bytes_written - written_before))
        store.log.clear()
        eval_loss = engine.loss(ids)
        eval_log = list(store.log)
    finally:
        engine.close()

    for stats, log, written in steps:
        recorded_read = sum(size for tag, _u, _p, size in log if tag != "write")
        recorded_written = sum(size for tag, _u, _p, size in log if tag == "write")
        label = "first step (no moments on disk yet)" if stats.step == 1 else f"step {stats.step}"
        note = "" if stats.bytes_written == written else (
            f" (StepStats.bytes_written says {c.mib(stats.bytes_written)}: only the writes that landed before "
            "train_step returned)")
        print(f"  {label}: read {c.mib(stats.bytes_read)}, written {c.mib(written)}{note}")
        if recorded_read != stats.bytes_read or recorded_written != written:
            c.fail(f"{mode} step {stats.step} accounting", f"recorded reads {recorded_read} / writes "
                   f"{recorded_written} do not add up to the store's counters {stats.bytes_read} / {written}")
        other = [entry for entry in log if entry[0] == "other"]
        if other:
            c.fail(f"{mode} step {stats.step} accounting", f"reads outside any load job: {other[:3]}")
    stats, log, _ = steps[-1]
    print(f"  steady state, step {stats.step} (bits per model parameter, all units):")
    print(f"    forward read   {parts_line(summarize(log, 'forward'), n_params)}")
    print(f"    backward read  {parts_line(summarize(log, 'backward'), n_params)}")
    print(f"    written        {parts_line(summarize(log, 'write'), n_params)}")

    # Forward bound for the units each pass reads: train forward = embed + blocks; eval adds norm + head.
    blocks = [block_unit(i) for i in range(config.n_layers)]
    passes = [("train-step forward", ["embed"] + blocks, summarize(log, "forward")),
              ("eval forward (loss)", store.units, summarize(eval_log, "forward"))]
    for name, units, by_part in passes:
        measured = sum(by_part.values())
        bound, n_proj, other = forward_bound(config, store.settings.shadow_dtype, units, args.bits)
        proj_bits = (measured - other) * 8 / n_proj
        print(f"  {name}: read {measured:,} B = {proj_bits:.3f} bits per projection weight "
              f"({n_proj:,} weights) + {other:,} B of other tensors")
        if mode == "qat":
            c.check(f"{mode} {name} bytes", measured / bound, 1.0,
                    f"(measured/bound; bound {bound:,} B = {args.bits} bits x {n_proj:,} projection weights + "
                    f"{other:,} B embedding/norms{'/head' if 'head' in units else ''})")
        else:
            print(f"    (full: projections are stored {store.settings.shadow_dtype}, no target; the {args.bits}-bit "
                  f"bound would be {bound:,} B, measured/bound {measured / bound:.2f})")
    print(f"  eval loss after {len(steps)} steps: {eval_loss:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the last is reported)")
    parser.add_argument("--bits", type=float, default=2.1, help="forward bits allowed per projection weight (qat)")
    parser.add_argument("--modes", nargs="+", choices=("qat", "full"), default=["qat", "full"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    c.pin_threads()
    if args.quick:
        args.dim, args.layers, args.heads, args.vocab, args.seq, args.steps = 256, 2, 4, 260, 16, 2
    c.banner("I/O per optimizer step", args.quick)
    with c.scratch_dir(args.workdir) as work:
        print(f"stores in {work} ({c.filesystem_of(work)})")
        for mode in args.modes:
            run_mode(mode, args, work)
    return c.finish()


if __name__ == "__main__":
    sys.exit(main())
