"""The dry-run plan (``finetune.py ... --dry-run``, ``offload-bitnet plan``): what a run will take, predicted
from the model's shapes, the data's real batch lengths and speeds measured on this machine.

Nothing is created, imported or trained. The plan runs the same checks as the run (device, data, store
settings, free disk) and refuses what the run would refuse. A model that is not imported yet is read from
its own metadata (``formats.read_source``: config.json, params.json, the GGUF header).

``predict_step`` is the model of one optimizer step; a benchmark calls it to print predicted next to measured.
Its memory is a sum of the buffers the engine holds at its fullest moment, its time the overlapped maximum of
the three threads' work plus what cannot overlap, each term a named entry of ``StepPrediction`` so that it
can be compared with a measurement and adjusted when the engine changes (the constants below say what each
term counts).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import types

import torch

from offload_bitnet.train import data as datalib
from offload_bitnet.train.calibration import Calibration, calibrate, existing_folder, probe_shape
from offload_bitnet.model.config import ModelConfig, config_for_size
from offload_bitnet.store.write import default_mode
from offload_bitnet.model.lora import LoRAConfig
from offload_bitnet.progress import format_seconds
from offload_bitnet.train.runconfig import RunConfig
from offload_bitnet.store.sizing import human, part_bytes, step_io, store_bytes
from offload_bitnet.store.blockstore import BlockStore, StoreError, StoreSettings, store_is_complete
from offload_bitnet.store.units import block_unit, unit_names
from offload_bitnet.tokenizers.base import ByteTokenizer
from offload_bitnet.argparsing import check_device
from offload_bitnet.engine.backend import is_mlx_device
from offload_bitnet.engine.streaming import (default_compute_dtype, default_pending_writes, default_pool_bytes,
                                             peak_rss_bytes)
from offload_bitnet.model.block import DENSE_BLOCK_BYTES, is_lazy_block
from offload_bitnet.errors import EXIT_OK
from offload_bitnet.formats import read_source
from offload_bitnet.tokenizers.loaders import open_tokenizer
from offload_bitnet.distributed.batching import per_rank_batch
from offload_bitnet.distributed.training import check_batch_split, dry_run_lines, planned_world_size
from offload_bitnet.train.messages import say
from offload_bitnet.train.run_folder import check_run_folder
from offload_bitnet.train.samples import check_prompts
from offload_bitnet.train.setup import check_store_settings, import_settings, load_data, total_steps

SSD_WEAR_WARNING_BYTES = 10 * 10**12   # a run that writes more than this wears a consumer SSD noticeably
BATCH_STEPS_SAMPLED = 5000             # steps whose padded lengths are looked at (the batch order is seeded)

# --- the memory model (bytes per parameter or per token; see predict_step) -------------------------------------
# Replay of one block for one micro-batch: autograd keeps about this many fp32 values per token (inputs of the
# norms and projections, their fake-quantized copies, q/k/v, rotary copies, the MLP's gate/up/product), plus the
# attention scores and probabilities of each head.
REPLAY_VALUES_PER_TOKEN = dict(dim=12, hidden=4)
ATTENTION_MATRICES = 2
# The unit being replayed: its 16-bit masters (as read; fp32 in full mode), the fp32 compute copy and the
# fp32 weight gradients. A queued update holds its gradients (and the masters it was given: not a qat block's,
# whose update reads its shadow); a running one adds, one projection at a time, the old shadow and moments as
# read, the fp32 master copy and the fp32 moments, and the encoded new parts of the whole unit.
GRAD_BYTES = COMPUTE_BYTES = MASTER_COPY_BYTES = 4
MOMENT_BYTES = 8
# Torch's own memory once a process has run a training step (autograd and OpenMP threads, allocator arenas,
# kernel workspaces), beyond what the process held before: measured with the demo model, where every other
# term is small (peak RSS 342 MiB, 225 MiB before the step, the terms below 27 MiB).
RUNTIME_BYTES = 90 << 20
RUNNING_UPDATES = 1       # one update makes its parts at a time, on the writer or on main (streams.WriteBehind)
LOADS_AHEAD = 1           # EngineOptions.prefetch_depth
CE_LOGIT_COPIES = 4       # logits, the saved log-softmax, its gradient and softmax's temporary (chunk rows each)
CE_CHUNK_TOKENS = 1024    # EngineOptions.ce_chunk_tokens
# --- the time model ---------------------------------------------------------------------------------------------
MATMUL_FLOPS_PER_PARAM_TOKEN = dict(forward=2, replay=2, backward=4)   # backward: input and weight gradients
LORA_BACKWARD_FLOPS = 2                                                # input gradients only


@dataclasses.dataclass
class BatchShape:
    """The padded micro-batches the run's steps feed the engine (``data.micro_batches`` pads a step's
    micro-batches to its longest sequence)."""

    micro_batch_size: int
    grad_accum: int
    mean_length: float      # mean padded length over the steps looked at
    max_length: int         # the longest step
    from_data: bool         # False: max_seq_len (no data to look at)

    @property
    def tokens(self) -> float:
        return self.micro_batch_size * self.grad_accum * self.mean_length


def batch_shape(config: RunConfig, dataset: datalib.Dataset | None, steps: int | None,
                world_size: int = 1) -> BatchShape:
    """Padded lengths of the run's own batches: the seeded batch order of ``dataset``'s training split, as
    the trainer draws them (the first ``BATCH_STEPS_SAMPLED`` steps). On ``world_size`` ranks each micro-batch
    is one rank's share (``per_rank_batch``), so the prediction is one rank's."""
    micro = per_rank_batch(config.batch_size, world_size, config.grad_accum)
    if dataset is None or not dataset.train:
        return BatchShape(micro, config.grad_accum, config.max_seq_len, config.max_seq_len, False)
    order = datalib.BatchOrder(len(dataset.train), config.batch_size, config.seed)
    lengths = [max(len(dataset.train[i]) for i in order.indices(step))
               for step in range(min(steps or 1, BATCH_STEPS_SAMPLED))]
    return BatchShape(micro, config.grad_accum, sum(lengths) / len(lengths), max(lengths), True)


@dataclasses.dataclass
class StepPrediction:
    """One optimizer step, predicted. ``memory`` and ``seconds`` hold the named terms the totals add up."""

    peak_rss_bytes: int
    step_seconds: float
    read_bytes: int
    written_bytes: int
    spilled_bytes: int
    tokens: float
    memory: dict[str, int]       # term -> bytes; peak_rss_bytes is their sum
    seconds: dict[str, float]    # term -> seconds of work (see predict_step for how they combine)
    bound: str                   # what the overlapped part waits on: "compute", "disk read", "disk write", "writer"
    lazy_blocks: bool = False    # blocks made one projection at a time (model.is_lazy_block)

    def memory_line(self) -> str:
        return " + ".join(f"{name} {human(value)}" for name, value in self.memory.items() if value)

    def time_line(self) -> str:
        return ", ".join(f"{name} {value:.2f}s" for name, value in self.seconds.items() if value >= 0.005)


def _block_files(model: ModelConfig, settings: StoreSettings) -> dict[str, int]:
    """Bytes of one block's parts (weights, shadow, optim), exactly as the store holds them."""
    return {part: part_bytes(model, block_unit(0), part, settings) for part in ("weights", "shadow", "optim")}


def lazy_projection_elements(model: ModelConfig) -> int:
    """Elements of dense projection weights a lazy block (``model.is_lazy_block``) holds at most: it makes,
    uses and drops one projection at a time, and the engine's BufferPool keeps the freed buffer for the next
    projection of that size, so one buffer of each distinct projection size stays mapped."""
    return sum({out * inp for out, inp in model.projection_shapes.values()})


def compute_dtype_of(device: str) -> torch.dtype:
    """The engine's compute dtype on ``device`` (MLX's arrays come from the engine's CPU tensors)."""
    return default_compute_dtype("cpu" if is_mlx_device(device) else device)


def predict_step(model: ModelConfig, settings: StoreSettings, calibration: Calibration, *, micro_batch_size: int,
                 grad_accum: int, seq_len: float, memory_budget_bytes: int, lora: LoRAConfig | None = None,
                 base_rss_bytes: int = 0, max_seq_len: int | None = None, threads: int | None = None,
                 first_step: bool = False, dense_block_bytes: int = DENSE_BLOCK_BYTES,
                 exact_grad_sums: bool = False) -> StepPrediction:
    """Peak memory, time and I/O of one ``StreamingEngine.train_step`` of ``grad_accum`` micro-batches of
    ``micro_batch_size`` sequences padded to ``seq_len`` tokens (``max_seq_len``: the longest step, for
    memory; default ``seq_len``). ``exact_grad_sums``: the block's and head's summed gradients in float64
    (``EngineOptions.exact_grad_sums``).

    Memory, the engine's fullest moment (backward of the last blocks, or the cross-entropy, whichever is larger),
    over ``base_rss_bytes`` (the process before training: Python, torch, tokenizer, data) and torch's own
    ``runtime`` (``RUNTIME_BYTES``):

    - ``activations``: every block's input of every micro-batch (fp32), up to ``memory_budget_bytes``; the rest
      spills to disk (``spilled_bytes``);
    - ``memos``: projection outputs kept from forward for the replay, in what the budget leaves, at most two
      blocks' fp32 weights (``EngineOptions.memo_budget_bytes``);
    - ``gradients``: the hidden states' gradients carried through backward (fp32, all micro-batches);
    - ``replay``: one micro-batch's autograd graph of one block (``REPLAY_VALUES_PER_TOKEN``, attention matrices);
    - ``block``: the block being replayed (masters as read, fp32 compute copy, fp32 weight gradients; LoRA: the
      frozen compute tensors). A block above ``dense_block_bytes`` (``EngineOptions.dense_block_bytes``; the
      engine's rule, ``model.is_lazy_block``) is held as read instead, with its compute copy one projection at a
      time (``lazy_projection_elements``), or whole when several micro-batches keep the made projections;
    - ``loads``: the next unit's files, loaded ahead (``LOADS_AHEAD``; a lazy block's as read, not unpacked);
    - ``updates``: the writer's running update (fp32 master copy, moments, gradients, encoded parts) and the
      queued one (masters and gradients); LoRA: the adapters with their moments, all in RAM;
    - ``head``: in the cross-entropy phase, the head's masters, gradient and update, and the logits of one
      chunk, counted instead of ``block`` + ``loads`` + ``updates`` when larger;
    - ``pool``: the other phase's buffers, kept unused by the ``BufferPool`` (other sizes than the live
      phase's, so not reused by it), at most its ``keep_bytes``.

    Time: ``compute`` (matmuls at the calibrated FLOP/s; replays of blocks with memos skip theirs), ``quantize``
    (qat compute copies, main thread), ``load`` (unpacking and converting what is read), ``update`` (AdamW and
    encoding) are CPU work in thread-seconds (the calibration's speeds are per thread), spread over the engine's
    ``threads`` (default: torch's thread count, what finetune.py uses) by its three threads and the matmuls'
    own parallelism; disk ``read`` and ``write`` run on background threads at the calibrated speeds and overlap
    the CPU work. ``writer``: the writer thread's own chain, its updates at one thread's speed and their writes
    at the disk's, which starts after the forward pass and the cross-entropy. The step takes the largest of CPU
    work, each disk direction and the writer's chain, plus ``serial``: the first load, the last update and write,
    and the commit's fsync of every file written (``fsync_s`` each), which nothing overlaps.
    """
    cfg, cal = model, calibration
    max_seq_len = max_seq_len or int(round(seq_len))
    micro_tokens = micro_batch_size * seq_len
    tokens = micro_tokens * grad_accum
    peak_tokens = micro_batch_size * max_seq_len * grad_accum
    block_params = cfg.block_param_count()
    embed_params = cfg.vocab_size * cfg.dim
    head_params = embed_params  # the output projection, tied or not
    qat = settings.mode == "qat"
    files = _block_files(cfg, settings)
    io = step_io(cfg, settings.mode, settings.shadow_dtype, settings.state_dtype, first_step=first_step)
    dtype = compute_dtype_of(cal.compute.device)
    lazy = is_lazy_block(cfg, dtype, dense_block_bytes)
    # Several micro-batches: a lazy block keeps each projection once made (EngineOptions, StepContext.keep).
    lazy_compute = block_params if grad_accum > 1 else lazy_projection_elements(cfg)

    # ---- memory
    stash = cfg.n_layers * peak_tokens * cfg.dim * 4
    in_ram = min(stash, memory_budget_bytes)
    shapes = cfg.projection_shapes
    memo_per_block = peak_tokens * sum(out for out, _ in shapes.values()) * 4
    # The same rule for LoRA: its runs keep memos in the same budget (EngineOptions.memo_budget_bytes).
    memo_room = min(max(memory_budget_bytes - stash, 0), 2 * 4 * block_params)
    memo_blocks = min(cfg.n_layers, memo_room // memo_per_block) if memo_per_block else 0
    micro_peak = micro_batch_size * max_seq_len
    per_token = REPLAY_VALUES_PER_TOKEN["dim"] * cfg.dim + REPLAY_VALUES_PER_TOKEN["hidden"] * cfg.hidden_dim
    replay = (micro_peak * per_token * 4 + micro_batch_size * cfg.n_heads * max_seq_len ** 2 * 4 * ATTENTION_MATRICES)
    gradients = 2 * peak_tokens * cfg.dim * 4
    logits = CE_LOGIT_COPIES * min(CE_CHUNK_TOKENS, micro_peak) * cfg.vocab_size * 4
    master_bytes = files["shadow"] / max(block_params, 1) if qat else files["weights"] / max(block_params, 1)
    sum_bytes = 8 if exact_grad_sums else GRAD_BYTES  # a summed gradient (updates get it rounded to fp32)
    if lora is not None:
        adapter_params = cfg.n_layers * sum(lora.rank * sum(shapes[t]) for t in lora.targets)
        if lazy:  # the frozen weights as read; the projections made on the main thread, one at a time
            block = files["weights"] + lazy_compute * COMPUTE_BYTES
            loads = LOADS_AHEAD * files["weights"]
        else:
            block = block_params * COMPUTE_BYTES
            loads = LOADS_AHEAD * block_params * COMPUTE_BYTES    # frozen units are unpacked on the loader thread
        # Every adapter and its moments; gradients one block's at a time (each block's adapters update at once).
        updates = adapter_params * (4 + MOMENT_BYTES) + adapter_params // max(cfg.n_layers, 1) * GRAD_BYTES
        # The frozen head as loaded (16-bit) and its fp32 compute copy, and the logits of one chunk.
        head = head_params * (COMPUTE_BYTES + 2) + logits
    else:
        adapter_params = 0
        if lazy:  # masters as read; compute copies made one projection at a time; every summed gradient
            block = int(block_params * (master_bytes + sum_bytes)) + lazy_compute * COMPUTE_BYTES
        else:
            block = int(block_params * (master_bytes + COMPUTE_BYTES + sum_bytes))
        loads = LOADS_AHEAD * (files["weights"] + files["shadow"])
        encoded = files["weights"] + files["shadow"] + files["optim"]
        # A qat block's update reads its old shadow and moments one projection at a time (each distinct size's
        # buffers stay in the pool); full mode's masters come whole with the update (as loaded).
        old_optim = files["optim"] / max(block_params, 1)
        per_projection = lazy_projection_elements(cfg) * (MASTER_COPY_BYTES + MOMENT_BYTES + old_optim
                                                          + (master_bytes if qat else 0))
        given_masters = 0 if qat else master_bytes
        running = int(block_params * (GRAD_BYTES + given_masters) + per_projection) + encoded
        queued = int(block_params * (GRAD_BYTES + given_masters))
        updates = RUNNING_UPDATES * running + default_pending_writes(cfg) * queued
        head = head_params * (4 + sum_bytes + MASTER_COPY_BYTES + MOMENT_BYTES) + logits
    memory = {"process": base_rss_bytes, "runtime": RUNTIME_BYTES, "activations": in_ram,
              "memos": memo_blocks * memo_per_block, "gradients": gradients, "replay": replay}
    # The phase that holds more is live at the peak; the other phase's buffers are of other sizes (unit-sized,
    # not vocabulary-sized, or the reverse), which the BufferPool keeps for reuse rather than unmapping while
    # all it holds, in use or not, stays within its keep_bytes (the engine's ``default_pool_bytes``).
    blocks_phase = block + loads + updates
    blocks_pooled = blocks_phase - (updates if lora is not None else 0)  # LoRA's adapters are not pool buffers
    live_pooled = head if head > blocks_phase else blocks_pooled
    room = max(default_pool_bytes(cfg, dtype, dense_block_bytes) - live_pooled, 0)
    if head > blocks_phase:
        memory["head"] = head
        memory["pool"] = min(blocks_pooled, room)
    else:
        memory.update(block=block, loads=loads, updates=updates)
        memory["pool"] = min(head, room)

    # ---- time
    matrix_params = sum(o * i for o, i in shapes.values())
    attention = 4 * micro_tokens * seq_len * cfg.n_heads * cfg.head_dim * grad_accum  # QK^T and PV, per layer
    flops = MATMUL_FLOPS_PER_PARAM_TOKEN
    backward = LORA_BACKWARD_FLOPS if lora is not None else flops["backward"]
    replayed = cfg.n_layers - memo_blocks
    forward_flops = cfg.n_layers * (flops["forward"] * tokens * matrix_params + attention)
    block_flops = (forward_flops
                   + replayed * flops["replay"] * tokens * matrix_params + cfg.n_layers * attention
                   + cfg.n_layers * (backward * tokens * matrix_params + 2 * attention))
    head_flops = (flops["forward"] + backward) * tokens * head_params
    if lora is not None:
        block_flops += 6 * tokens * adapter_params
    compute = cal.compute
    ns = 1e-9
    trained = 0 if lora is not None else cfg.param_count()
    ternary = cfg.n_layers * matrix_params if qat else 0
    # Thread-seconds of CPU work over the engine's threads, at the speed-up the calibration measured for that many
    # threads (their count where it measured another).
    threads = threads or torch.get_num_threads()
    speedup = compute.parallel_speedup if compute.parallel_threads == threads else threads
    share = 1 / (speedup if compute.device == "cpu" else 1)
    # A lazy block that does not keep its projections makes each again for the replay of a block without memos.
    lazy_remade = replayed if lazy and grad_accum == 1 else 0
    seconds = {
        "compute": (block_flops + head_flops) / compute.matmul_flops,
        "quantize": (ternary if lora is None else 0) * compute.quantize_ns * ns,
        "load": ((cfg.n_layers * (2 if lora is not None else 1) + lazy_remade) * block_params * compute.unpack_ns
                 + trained * compute.masters_ns) * ns,
        "update": trained * compute.update_ns * ns,
    }
    seconds = {name: value * share for name, value in seconds.items()}
    if lora is not None:
        # Forward reads the embedding and the blocks, backward the norm, the head (the embedding when tied) and
        # the blocks again; nothing of the base is written, the adapters and their moments are saved each step.
        head_unit = "embed" if cfg.tie_embeddings else "head"
        weights = {unit: part_bytes(cfg, unit, "weights", settings) for unit in {"embed", "norm", head_unit}}
        read = io["forward_read"] + (io["forward_read"] - weights["embed"]) + weights["norm"] + weights[head_unit]
        written = 12 * adapter_params
    else:
        read, written = io["read"], io["written"]
    spilled = stash - in_ram
    seconds["read"] = (read + spilled) / cal.disk.read_bps
    seconds["write"] = (written + spilled) / cal.disk.write_bps
    # Nothing overlaps the first unit's load and, at the end, the embedding's update and the last writes.
    last_unit = embed_params
    seconds["serial"] = (last_unit * 2 / cal.disk.read_bps
                         + (0 if lora is not None else last_unit * compute.update_ns * ns
                            + min(written, 2 * files["weights"] + 2 * files["shadow"] + 2 * files["optim"])
                            / cal.disk.write_bps))
    if lora is None:  # the commit fsyncs every file the step wrote, the folder and the manifest, after the last write
        files_written = cfg.n_layers * (3 if qat else 2) + 2 * (len(unit_names(cfg)) - cfg.n_layers)
        seconds["serial"] += (files_written + 3) * cal.disk.fsync_s
    cpu = seconds["compute"] + seconds["quantize"] + seconds["load"] + seconds["update"]
    # The writer is one thread: it starts with the head's update, after the forward pass and the cross-entropy
    # (main's work alone, over every core), and its updates (decoding the old parts, AdamW, encoding) and their
    # writes follow one another. Beside main's compute it has a core of its own at most, so where its work is
    # more than main's backward leaves room for, the step waits for it (13B width at G=2 on 2 cores).
    if lora is None:
        before_writer = ((forward_flops + head_flops) / compute.matmul_flops
                         + (ternary * compute.quantize_ns + cfg.n_layers * block_params * compute.unpack_ns) * ns)
        seconds["writer"] = trained * (compute.update_ns + compute.masters_ns) * ns + written / cal.disk.write_bps
        writer = before_writer * share + seconds["writer"]
    else:
        writer = 0.0  # the adapters' updates: small, on main
    waits = {"compute": cpu, "disk read": seconds["read"], "disk write": seconds["write"], "writer": writer}
    bound = max(waits, key=waits.get)
    step = waits[bound] + seconds["serial"]
    return StepPrediction(peak_rss_bytes=int(sum(memory.values())), step_seconds=step, read_bytes=int(read),
                          written_bytes=int(written), spilled_bytes=int(spilled), tokens=tokens, memory=memory,
                          seconds=seconds, bound=bound, lazy_blocks=lazy)


def lora_config(config: RunConfig) -> LoRAConfig | None:
    """The adapters a run trains (None: it trains the weights)."""
    if not config.is_lora:
        return None
    return LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                      targets=config.lora_target_list)


def predict_run_step(config: RunConfig, model: ModelConfig, settings: StoreSettings, calibration: Calibration,
                     batches: BatchShape, base_rss_bytes: int = 0, first_step: bool = False) -> StepPrediction:
    """``predict_step`` for a run's settings and its data's padded batch lengths."""
    return predict_step(model, settings, calibration, micro_batch_size=batches.micro_batch_size,
                        grad_accum=batches.grad_accum, seq_len=batches.mean_length,
                        max_seq_len=batches.max_length, memory_budget_bytes=config.memory_budget_bytes,
                        lora=lora_config(config), base_rss_bytes=base_rss_bytes, first_step=first_step,
                        exact_grad_sums=config.exact_grad_sums)


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


# ---------------------------------------------------------------------------------------------- the dry run
@dataclasses.dataclass
class PlannedModel:
    """What a run would train: shapes, store settings, bytes on disk now (None: not made yet), tokenizer."""

    config: ModelConfig
    settings: StoreSettings
    disk: dict | None
    tokenizer: object
    note: str = ""


def planned_model(config: RunConfig, paths) -> PlannedModel:
    """The model of the run, with the run's own checks of its settings: an existing store is opened read-only;
    a demo's config comes from its size; a model not imported yet is read from its metadata."""
    if store_is_complete(paths.store_dir):
        store = BlockStore(paths.store_dir)
        try:
            check_store_settings(config, store)
            if not config.is_lora:  # the engine's check: a LoRA run never writes its base
                store.check_free_space()
            tokenizer = open_tokenizer(store.path, store.extra.get("tokenizer"), config.tokenizer)
            return PlannedModel(store.config, store.settings, store.disk_bytes(), tokenizer)
        finally:
            store.close()
    if paths.origin == "demo":
        model = config_for_size(config.size, "bitnet")
        settings = StoreSettings(mode=config.store_mode or default_mode(model),
                                 state_dtype=config.state_dtype or "fp32")
        tokenizer, note = ByteTokenizer(), f"a new {config.size} model (created by the run)"
    else:
        model, tokenizer = read_source(config.model)
        settings = import_settings(config) or StoreSettings(mode=default_mode(model))
        note = f"read from {config.model} without importing it (the run imports it into {paths.store_dir})"
        tokenizer = tokenizer or ByteTokenizer()
    # The store the run makes has exactly these settings; its checks see them as the run will.
    stand_in = types.SimpleNamespace(path=paths.store_dir, settings=settings)
    stand_in.require_master_weights = lambda: BlockStore.require_master_weights(stand_in)
    check_store_settings(config, stand_in)
    return PlannedModel(model, settings, None, tokenizer, note)


def plan_lines(config: RunConfig, plan: "Plan") -> list[str]:
    """The printed plan: model, disk, batches, per-step I/O, peak memory and time, the run's totals."""
    planned, steps, batches, prediction = plan.model, plan.steps, plan.batches, plan.prediction
    model, settings = planned.config, planned.settings
    sizes = store_bytes(model, settings.mode, settings.shadow_dtype, settings.state_dtype,
                        packed_only=settings.packed_only)
    now = sum(planned.disk.values()) if planned.disk else sizes["total"] - sizes["optim"]
    made = "" if planned.disk else " (to be created)"
    if config.is_lora:
        adapter_params = prediction.written_bytes // 12
        disk_line = (f"  on disk: {human(now)} now{made}, never written (LoRA); adapters {human(4 * adapter_params)} "
                     f"({adapter_params:,} parameters) + optimizer {human(8 * adapter_params)} in the run folder")
    else:
        disk_line = (f"  on disk: {human(now)} now{made}, {human(sizes['total'])} once optimizer moments exist "
                     f"(weights {human(sizes['weights'])}, shadow {human(sizes['shadow'])}, optimizer "
                     f"{human(sizes['optim'])})")
    lengths = (f"padded to {batches.mean_length:.0f} tokens on average (longest {batches.max_length}) from the data"
               if batches.from_data else f"of {batches.max_length} tokens (max_seq_len)")
    p = prediction
    ranked = plan.world_size > 1  # the prediction is one rank's (batch_shape); its disk share is printed after
    lines = [
        f"plan for {config.experiment_name}:",
        f"  model: {model.arch}, {model.param_count():,} parameters, {model.n_layers} blocks, dim {model.dim}, "
        f"vocab {model.vocab_size}; mode {settings.mode}, shadow {settings.shadow_dtype}, optimizer state "
        f"{settings.state_dtype}" + (f"; LoRA rank {config.lora_rank}" if config.is_lora else ""),
    ]
    if planned.note:
        lines.append(f"  source: {planned.note}")
    lines += [
        disk_line,
        f"  per step: {config.batch_size} sequences"
        + (f", on each rank {config.grad_accum} micro-batch(es) of {plan.batches.micro_batch_size}" if ranked
           else f" in {config.grad_accum} micro-batch(es)") + f", {lengths}: "
        f"~{p.tokens:,.0f} tokens" + (" per rank" if ranked else "")
        + f"; reads {human(p.read_bytes)}, writes {human(p.written_bytes)}" + (" on one process" if ranked else "")
        + (f", spills {human(p.spilled_bytes)} of activations" if p.spilled_bytes else ""),
        f"  peak memory{' per rank' if ranked else ''}: ~{human(p.peak_rss_bytes)} = {p.memory_line()}"
        + (f"; blocks made one projection at a time (each is over {human(DENSE_BLOCK_BYTES)} dense)"
           if p.lazy_blocks else ""),
        f"  time per step: ~{p.step_seconds:.2f}s, {p.bound}-bound ({p.time_line()}; CPU work, the disk and the "
        "writer's chain overlap, 'serial' does not)",
        "  " + plan.calibration.describe(),
    ]
    if steps:
        total_written = steps * p.written_bytes
        lines.append(f"  run: {steps} steps, ~{format_seconds(steps * p.step_seconds)}; writes {human(total_written)} "
                     f"in all ({total_written / 1e12:.2f} TB)")
        if total_written > SSD_WEAR_WARNING_BYTES:
            lines.append(f"  warning: this run writes {total_written / 1e12:.1f} TB, more than "
                         f"{SSD_WEAR_WARNING_BYTES / 1e12:.0f} TB: a consumer SSD is rated for a few hundred TB "
                         "written in its life. Consider --mode lora (writes only the adapters), fewer steps, or "
                         "--state-dtype int8 (smaller moments).")
    return lines


@dataclasses.dataclass
class Plan:
    """Everything the dry run prints."""

    model: PlannedModel
    dataset: datalib.Dataset | None
    steps: int | None
    batches: BatchShape
    calibration: Calibration
    prediction: StepPrediction
    world_size: int = 1      # ranks planned for (``planned_world_size``); the prediction is then one rank's


def make_plan(config: RunConfig, paths, command=None) -> Plan:
    """Check the run as the run checks it, read its model and data, calibrate and predict a step; writes
    nothing but the calibration cache. ``command`` (a ``RunCommand``): the run folder is checked as the run
    checks it (a --restart would replace what it holds)."""
    check_device(config.device)
    if command is not None and not config.restart:
        check_run_folder(config, paths, command)
    if config.data:
        load_data(config, ByteTokenizer(), ByteTokenizer.vocab_size)  # the run's first check, as it makes it
    planned = planned_model(config, paths)
    dataset = load_data(config, planned.tokenizer, planned.config.vocab_size) if config.data else None
    check_prompts(config, planned.tokenizer, bool(dataset) and "chat" in dataset.stats.kinds,
                        planned.config.max_seq_len)
    base_rss = current_rss_bytes()  # what the trainer holds before its first step: torch, tokenizer, data
    steps = total_steps(config, dataset) if dataset else config.num_train_iters
    if planned.disk is None:
        check_room_for(planned, paths.store_dir, config.is_lora)
    world_size = planned_world_size(config)
    check_batch_split(config, world_size)
    batches = batch_shape(config, dataset, steps, world_size)
    shape = probe_shape(int(batches.micro_batch_size * batches.mean_length), planned.config.dim,
                        planned.config.hidden_dim)
    calibration = calibrate(paths.store_dir, config.device, shape, planned.settings, recalibrate=config.recalibrate)
    prediction = predict_run_step(config, planned.config, planned.settings, calibration, batches, base_rss)
    return Plan(planned, dataset, steps, batches, calibration, prediction, world_size)


def dry_run(config: RunConfig, paths, command=None) -> int:
    """Print the plan without creating, importing or training anything; refuse what the run would refuse."""
    plan = make_plan(config, paths, command)
    if plan.dataset:
        say(plan.dataset.summary())
        for note in plan.dataset.stats.notes(config.max_seq_len):
            say(f"note: {note}")
    for line in plan_lines(config, plan):
        say(line)
    if plan.world_size > 1:
        for line in dry_run_lines(config, plan.model.config, plan.model.settings, plan.world_size):
            say(line)
    return EXIT_OK


def check_room_for(planned: PlannedModel, store_dir: str, lora: bool):
    """The run would stop at its first step without room for the store and that step's writes: say so now."""
    settings = planned.settings
    sizes = store_bytes(planned.config, settings.mode, settings.shadow_dtype, settings.state_dtype,
                        packed_only=settings.packed_only)
    store, step = sizes["total"] - sizes["optim"], 0 if lora else sizes["units"]
    free = shutil.disk_usage(existing_folder(store_dir)).free
    if free < store + step:
        raise StoreError(f"not enough free disk space for this run in {existing_folder(store_dir)}: the store "
                         f"needs {human(store)}" + (f" and its first step about {human(step)} more" if step else "")
                         + f", there is {human(free)}. Free some space or choose another --runs-dir.")
