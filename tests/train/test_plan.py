"""The dry-run plan: shapes of models not imported yet, the run's own refusals, calibration and its cache,
the SSD-wear warning, and a prediction that follows the data's real batch lengths."""
import dataclasses
import json
import os

import pytest
import torch

from offload_bitnet import create_model
from offload_bitnet.train import calibration
from offload_bitnet.train.calibration import Calibration, ComputeSpeed, DiskSpeed
from offload_bitnet.cli import main as cli_main
from offload_bitnet.model.config import config_for_size
from offload_bitnet.model.lora import LoRAConfig
from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine, default_pending_writes, default_pool_bytes
from offload_bitnet.model.block import dense_block_bytes
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.sizing import part_bytes
from offload_bitnet.train.plan import predict_step
from offload_bitnet.store.blockstore import StoreSettings
from offload_bitnet.train.trainer import main
from repo_paths import REPO

ROOT = REPO
DEMO_DATA = os.path.join(ROOT, "test_data", "demo.txt")
TINY = ["--max-seq-len", "32", "--batch-size", "4", "--no-plot", "--val-fraction", "0.1"]
SPEEDS = dict(read_bps=1e9, write_bps=5e8, matmul_flops=5e10, unpack_ns=1.0, masters_ns=2.0, quantize_ns=3.0,
              update_ns=10.0)


@pytest.fixture(autouse=True)
def probes(tmp_path, monkeypatch):
    """Deterministic probes (machine speed must not matter) that count their calls; a private cache file."""
    monkeypatch.setenv("OFFLOAD_BITNET_CACHE", str(tmp_path / "cache"))
    calls = {"disk": 0, "compute": 0}

    def probe_disk(folder):
        calls["disk"] += 1
        return DiskSpeed(SPEEDS["read_bps"], SPEEDS["write_bps"], folder=folder, filesystem="test", measured="now",
                         fsync_s=0.002)

    def probe_compute(device, shape, settings):
        calls["compute"] += 1
        return ComputeSpeed(**{k: v for k, v in SPEEDS.items() if not k.endswith("bps")}, device=device,
                            shape=tuple(shape), measured="now")

    monkeypatch.setattr(calibration, "probe_disk", probe_disk)
    monkeypatch.setattr(calibration, "probe_compute", probe_compute)
    return calls


def fixed_calibration() -> Calibration:
    return Calibration(DiskSpeed(SPEEDS["read_bps"], SPEEDS["write_bps"]),
                       ComputeSpeed(**{k: v for k, v in SPEEDS.items() if not k.endswith("bps")}))


def plan_args(tmp_path, experiment, *extra):
    return ["--runs-dir", str(tmp_path / "runs"), "--experiment", experiment, *extra, "--dry-run"]


# ---------------------------------------------------------------------------------------------- what it prints
def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, capsys):
    assert main(plan_args(tmp_path, "plan", "--num-train-iters", "10", *TINY, "--grad-accum", "2")) == 0
    out = capsys.readouterr().out
    for fragment in ("plan for plan:", "806,912 parameters", "on disk:", "4 sequences in 2 micro-batch(es), padded "
                     "to 32 tokens", "reads", "writes", "peak memory:", "activations", "updates", "time per step:",
                     "calibration: disk read 1,000 MB/s, write 500 MB/s", "run: 10 steps", "in all"):
        assert fragment in out
    assert not os.path.exists(tmp_path / "runs" / "plan")
    lora = ["--mode", "lora", "--lora-rank", "4"]
    assert main(plan_args(tmp_path, "plan", "--num-train-iters", "10", *TINY, *lora)) == 0
    out = capsys.readouterr().out
    assert "never written (LoRA); adapters 146.0 KiB (37,376 parameters)" in out and "LoRA rank 4" in out


def test_offload_bitnet_plan_is_the_dry_run(tmp_path, capsys):
    assert cli_main(["plan", *plan_args(tmp_path, "cli", "--num-train-iters", "3", *TINY)[:-1]]) == 0
    out = capsys.readouterr().out
    assert "plan for cli:" in out and "run: 3 steps" in out
    assert not os.path.exists(tmp_path / "runs" / "cli")


# ---------------------------------------------------------------------------------------------- models not imported
def hf_folder(path, vocab=320):
    """A Hugging Face folder whose weights are not even valid: the plan reads config.json only."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": False}))
    (path / "model.safetensors").write_bytes(b"not read by the plan")
    return str(path)


def test_dry_run_reads_the_shapes_of_a_hf_folder_without_importing(tmp_path, capsys):
    model = hf_folder(tmp_path / "hf")
    assert main([model, "--data", DEMO_DATA, *plan_args(tmp_path, "hf", "--num-train-iters", "5", *TINY)]) == 0
    out = capsys.readouterr().out
    parameters = 2 * 320 * 64 + 64 + 3 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64 + 2 * 64)
    assert f"llama, {parameters:,} parameters, 3 blocks, dim 64, vocab 320; mode full" in out
    assert "without importing it" in out and "peak memory:" in out and "run: 5 steps" in out
    assert "unknown" not in out
    assert not os.path.exists(tmp_path / "runs" / "hf")


def test_dry_run_reads_a_gguf_header_and_its_tokenizer(tmp_path, capsys):
    pytest.importorskip("gguf")
    from test_formats_gguf import TINY as GGUF_TINY, hf_reference_model, write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf_reference_model(tied=True))
    assert main([path, "--data", DEMO_DATA, *plan_args(tmp_path, "gguf", "--num-train-iters", "2", *TINY)]) == 0
    out = capsys.readouterr().out
    assert f"{GGUF_TINY['layers']} blocks, dim {GGUF_TINY['dim']}, vocab {GGUF_TINY['vocab']}" in out
    # The GGUF's own BPE tokenizer counts the data, not the byte tokenizer (5,330 tokens of demo.txt).
    tokens = int(out.split("training sequence(s) (")[1].split(" tokens")[0].replace(",", ""))
    assert 0 < tokens < 5000
    assert not os.path.exists(tmp_path / "runs" / "gguf")


# ---------------------------------------------------------------------------------------------- the run's refusals
def test_dry_run_refuses_what_the_run_refuses(tmp_path, capsys):
    store = create_model(str(tmp_path / "full"), size="demo", arch="llama", mode="full")
    refused = [store, "--data", DEMO_DATA, "--mode", "qat", "--runs-dir", str(tmp_path / "runs"), "--num-train-iters",
               "1", *TINY]
    assert main([*refused, "--dry-run"]) == 1
    planned = capsys.readouterr().err
    assert main(refused) == 1
    ran = capsys.readouterr().err
    assert planned == ran and "differs from the store's mode 'full'" in planned

    assert main(plan_args(tmp_path, "gpu", *TINY, "--device", "cuda")) == 1
    assert "no usable CUDA GPU" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    assert main([store, "--data", str(bad), *plan_args(tmp_path, "bad", *TINY)]) == 1
    assert "bad.jsonl" in capsys.readouterr().err


def test_dry_run_refuses_a_run_folder_of_another_run_and_a_prompt_longer_than_the_context(tmp_path, capsys):
    store = create_model(str(tmp_path / "demo"), size="demo", arch="bitnet")
    runs = ["--runs-dir", str(tmp_path / "runs"), "--experiment", "shared", "--num-train-iters", "1", *TINY]
    assert main([store, "--data", DEMO_DATA, *runs]) == 0  # a run of this store holds runs/shared
    capsys.readouterr()
    other = create_model(str(tmp_path / "other"), size="demo", arch="bitnet", seed=1)
    refused = [other, "--data", DEMO_DATA, *runs]
    assert main([*refused, "--dry-run"]) == 1
    planned = capsys.readouterr().err
    assert main(refused) == 1
    assert planned == capsys.readouterr().err and "belongs to a run of" in planned
    assert main([*refused, "--restart", "--dry-run"]) == 0  # --restart would replace that run: nothing to refuse
    capsys.readouterr()

    long_prompt = ["--prompt", "x" * 5000]
    assert main([store, "--data", DEMO_DATA, *plan_args(tmp_path, "long", *TINY, *long_prompt)]) == 1
    assert "the model's context is" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs" / "long")


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_is_cached_per_machine_and_recalibrate_measures_again(tmp_path, probes, capsys):
    args = plan_args(tmp_path, "cal", "--num-train-iters", "2", *TINY)
    assert main(args) == 0
    assert probes == {"disk": 1, "compute": 1}
    assert "measured now" in capsys.readouterr().out
    assert main(args) == 0
    assert probes == {"disk": 1, "compute": 1}
    out = capsys.readouterr().out
    assert "(cached now in" in out and "--recalibrate measures again" in out
    assert main([*args, "--recalibrate"]) == 0
    assert probes == {"disk": 2, "compute": 2}
    cache = json.load(open(tmp_path / "cache" / "calibration.json"))
    disk_keys = [key for key in cache if key.startswith("disk|")]
    compute_keys = [key for key in cache if key.startswith("compute|")]
    assert len(disk_keys) == 1 and len(compute_keys) == 1 and "|cpu|" in compute_keys[0]
    assert cache[disk_keys[0]]["write_bps"] == SPEEDS["write_bps"]


def test_the_real_probes_measure_and_clean_up(tmp_path, monkeypatch):
    """The unpatched probes: positive speeds, no probe file left behind (small sizes: a fraction of a second)."""
    monkeypatch.undo()  # the real probes, not the fixture's
    speed = calibration.probe_disk(str(tmp_path), nbytes=8 << 20)
    assert speed.read_bps > 0 and speed.write_bps > 0 and speed.fsync_s > 0 and speed.filesystem
    assert os.listdir(tmp_path) == []
    compute = calibration.probe_compute("cpu", calibration.probe_shape(64, 128, 256), StoreSettings(mode="qat"))
    assert compute.matmul_flops > 0 and compute.update_ns > 0 and compute.quantize_ns > 0


def test_the_probes_time_mlx_matmuls_for_the_mlx_device(monkeypatch):
    """``--device mlx --dry-run`` measured torch's matmul (and before that, failed on torch.device("mlx")): the
    matmul probe runs in the backend's library, so MLX's own (much slower, on this CPU) speed is measured."""
    pytest.importorskip("mlx.core")
    from offload_bitnet.engine.backend import MLXBackend

    monkeypatch.undo()
    runs = []
    real_probe = MLXBackend.projection_probe

    def counted(self, *tensors):
        run = real_probe(self, *tensors)
        return lambda: runs.append(1) or run()

    monkeypatch.setattr(MLXBackend, "projection_probe", counted)
    compute = calibration.probe_compute("mlx", calibration.probe_shape(64, 128, 256), StoreSettings(mode="qat"))
    assert runs and compute.device == "mlx" and compute.matmul_flops > 0 and compute.update_ns > 0


# ---------------------------------------------------------------------------------------------- the prediction
def test_ssd_wear_warning_for_runs_that_write_more_than_10_tb(tmp_path, capsys):
    assert main(plan_args(tmp_path, "short", "--num-train-iters", "100", *TINY)) == 0
    assert "warning:" not in capsys.readouterr().out
    assert main(plan_args(tmp_path, "long", "--num-train-iters", "2000000", *TINY)) == 0
    out = capsys.readouterr().out
    assert "warning: this run writes" in out and "more than 10 TB" in out
    # Full fine-tuning at 70B with 8-bit moments writes about 300 GB per step.
    step = predict_step(config_for_size("70B"), StoreSettings(mode="full", state_dtype="int8"), fixed_calibration(),
                        micro_batch_size=1, grad_accum=1, seq_len=64, memory_budget_bytes=1 << 30)
    assert 250e9 < step.written_bytes < 350e9


def test_the_plan_uses_the_datas_padded_batch_lengths(tmp_path, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": f"line {i} of short text"}) + "\n" for i in range(40)))
    args = ["--batch-size", "8", "--max-seq-len", "512", "--no-plot", "--val-fraction", "0", "--num-train-iters", "4"]
    assert main(plan_args(tmp_path, "short", *args, "--data", str(short))) == 0
    out = capsys.readouterr().out
    length = float(out.split("padded to ")[1].split(" tokens")[0])
    assert length < 40  # the records' real lengths, not --max-seq-len 512


def test_step_prediction_follows_tokens_and_names_its_terms():
    model, settings, speeds = config_for_size("350M", "bitnet"), StoreSettings(mode="qat"), fixed_calibration()

    def step(seq_len, **extra):
        values = dict(micro_batch_size=2, grad_accum=2, memory_budget_bytes=1 << 30) | extra
        return predict_step(model, settings, speeds, seq_len=seq_len, **values)

    short, long = step(150), step(512)
    assert short.tokens == 600 and long.tokens == 2048
    assert short.step_seconds < long.step_seconds and short.peak_rss_bytes < long.peak_rss_bytes
    assert short.seconds["compute"] < long.seconds["compute"]
    assert short.read_bytes == long.read_bytes and short.written_bytes == long.written_bytes  # weights, not tokens
    assert short.peak_rss_bytes == sum(short.memory.values())
    assert {"activations", "replay", "runtime"} <= set(short.memory)
    # The overlapped maximum plus what does not overlap: never less than the CPU work, either disk direction or
    # the writer's own chain.
    cpu = sum(short.seconds[k] for k in ("compute", "quantize", "load", "update"))
    overlapped = short.step_seconds - short.seconds["serial"]
    assert overlapped >= max(cpu, short.seconds["read"], short.seconds["write"], short.seconds["writer"]) - 1e-9
    # A budget smaller than the activations spills them and counts the spill as I/O.
    spilled = step(512, memory_budget_bytes=1 << 20)
    assert spilled.spilled_bytes > 0 and spilled.memory["activations"] == 1 << 20
    assert spilled.seconds["read"] > long.seconds["read"]
    # LoRA writes only the adapters and their moments.
    lora = step(150, lora=LoRAConfig(rank=8))
    assert lora.written_bytes < short.written_bytes / 50 and lora.seconds["update"] == 0
    # CPU work spreads over the threads by the speed-up the calibration measured for that many, else their count.
    measured = dataclasses.replace(speeds, compute=dataclasses.replace(speeds.compute, parallel_threads=2,
                                                                       parallel_speedup=1.25))
    one, two, two_measured = (predict_step(model, settings, calibration_, seq_len=150, micro_batch_size=2,
                                           grad_accum=2, memory_budget_bytes=1 << 30, threads=threads)
                              for calibration_, threads in ((speeds, 1), (speeds, 2), (measured, 2)))
    for term in ("compute", "quantize", "load", "update"):
        assert two.seconds[term] == pytest.approx(one.seconds[term] / 2)
        assert two_measured.seconds[term] == pytest.approx(one.seconds[term] / 1.25)


def test_a_writer_slower_than_the_compute_bounds_the_step_by_its_own_chain():
    """The writer is one thread: where its updates and writes outgrow main's work, pooling them over the cores
    would predict too short a step (13B width at G=2 on 2 cores: 119 s planned, 201 s measured). The step then
    waits for the writer's chain, which each nanosecond of update per parameter lengthens by the parameters."""
    model, settings = config_for_size("350M", "bitnet"), StoreSettings(mode="qat")

    def step(update_ns: float, **extra):
        speeds = fixed_calibration()
        speeds = dataclasses.replace(speeds, compute=dataclasses.replace(speeds.compute, update_ns=update_ns))
        values = dict(micro_batch_size=1, grad_accum=4, memory_budget_bytes=1 << 30, threads=2) | extra
        return predict_step(model, settings, speeds, seq_len=512, **values)

    fast, slow, slower = step(1.0), step(200.0), step(300.0)
    assert fast.bound == "compute"
    assert slow.bound == slower.bound == "writer"
    cpu = sum(slow.seconds[k] for k in ("compute", "quantize", "load", "update"))
    assert slow.step_seconds > cpu + slow.seconds["serial"]  # more than the work spread over both cores
    assert slow.step_seconds >= slow.seconds["writer"] + slow.seconds["serial"]  # and the forward pass before it
    # The chain updates every parameter; the embedding's update, the step's last, is also in the serial part.
    longer = (model.param_count() + model.vocab_size * model.dim) * 100e-9
    assert slower.step_seconds - slow.step_seconds == pytest.approx(longer)
    # LoRA's adapters update on main: no writer chain.
    assert step(200.0, lora=LoRAConfig(rank=8)).bound != "writer"


def test_big_blocks_hand_their_updates_over_without_a_queue():
    """At 7B a queued update would hold a block's fp32 gradients: the engine hands them over instead, and the plan
    counts what each holds by the same rule."""
    settings, speeds = StoreSettings(mode="qat", state_dtype="int8"), fixed_calibration()
    small, big = config_for_size("1B", "bitnet", vocab_size=1024), config_for_size("7B", "bitnet")
    assert default_pending_writes(small) == 1 and default_pending_writes(big) == 0
    for model, queued in ((small, 1), (big, 0)):
        step = predict_step(model, settings, speeds, seq_len=128, micro_batch_size=1, grad_accum=4,
                            memory_budget_bytes=1 << 30)
        block_grads = 4 * model.block_param_count()
        # The running update holds its gradients, the encoded parts and one projection's fp32 master and moments
        # (a block's would be 3 x its gradients alone); a queued one its gradients.
        if queued:
            assert step.memory["updates"] >= 2 * block_grads
        else:
            assert block_grads < step.memory["updates"] < 4 * block_grads


def test_exact_gradient_sums_add_four_bytes_per_parameter_of_the_block_being_summed():
    settings, speeds, model = StoreSettings(mode="qat", state_dtype="int8"), fixed_calibration(), config_for_size("7B")
    rounded, exact = (predict_step(model, settings, speeds, seq_len=128, micro_batch_size=1, grad_accum=4,
                                   memory_budget_bytes=1 << 30, exact_grad_sums=exact) for exact in (False, True))
    # The blocks' backward is the fuller phase at 7B (the head's terms are then not in the peak).
    assert exact.memory["block"] - rounded.memory["block"] == 4 * model.block_param_count()
    assert exact.peak_rss_bytes - rounded.peak_rss_bytes >= 4 * model.block_param_count()


# ---------------------------------------------------------------------------------------------- lazy blocks
def _tiny_step(dense_block_bytes, settings, lora=None, grad_accum=1):
    return predict_step(config_for_size("tiny", "bitnet"), settings, fixed_calibration(), micro_batch_size=1,
                        grad_accum=grad_accum, seq_len=32, memory_budget_bytes=1 << 30, lora=lora,
                        dense_block_bytes=dense_block_bytes)


def test_the_plan_makes_blocks_lazy_by_the_engines_rule(tmp_path):
    """The plan and the engine decide with the same function: the same blocks are lazy at every threshold, and
    the plan's pool bound is the engine's."""
    path = create_model(str(tmp_path / "m"), size="tiny", arch="bitnet", n_layers=1)
    config = config_for_size("tiny", "bitnet")
    dense = dense_block_bytes(config, torch.float32)
    for limit in (0, dense - 1, dense, 1 << 40):
        engine = StreamingEngine(BlockStore(path), EngineOptions(dense_block_bytes=limit))
        assert _tiny_step(limit, StoreSettings(mode="qat")).lazy_blocks == engine.lazy("block.000") == (limit < dense)
        assert engine.pool.keep_bytes == default_pool_bytes(config, torch.float32, limit)
        engine.close()


def test_a_lazy_block_counts_its_weights_as_read_and_a_few_projections():
    config = config_for_size("tiny", "bitnet")
    projections = config.projection_shapes
    distinct = sum({o * i for o, i in projections.values()})
    assert distinct < config.block_param_count()  # the tiny shapes repeat sizes (q/o, gate/up/down)
    packed = StoreSettings(mode="qat", packed_only=True)
    lora = LoRAConfig(rank=4)
    weights = part_bytes(config, "block.000", "weights", packed)
    dense, lazy = _tiny_step(1 << 40, packed, lora), _tiny_step(0, packed, lora)
    assert dense.memory["block"] == 4 * config.block_param_count()
    assert dense.memory["loads"] == 4 * config.block_param_count()
    assert lazy.memory["block"] == weights + 4 * distinct
    assert lazy.memory["loads"] == weights  # the next block as read: it is unpacked when its matmuls run
    # Several micro-batches keep each projection once made: the whole block, dense.
    kept = _tiny_step(0, packed, lora, grad_accum=2)
    assert kept.memory["block"] == weights + 4 * config.block_param_count()
    # Training every weight: the masters and fp32 gradients of the whole block, compute copies a few at a time.
    qat = StoreSettings(mode="qat")
    dense, lazy = _tiny_step(1 << 40, qat), _tiny_step(0, qat)
    assert dense.memory["block"] - lazy.memory["block"] == 4 * (config.block_param_count() - distinct)
    assert dense.memory["updates"] == lazy.memory["updates"]
