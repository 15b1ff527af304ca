import datetime
import hashlib
import json
import shlex
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from offload_bitnet import create_model
from offload_bitnet.engine.streaming import EngineOptions
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.train.run_commands import resume_command
from offload_bitnet.train.stopping import Stopper
from offload_bitnet.train.trainer import STATE_KEY, main
from offload_bitnet.train.runconfig import RunConfig
from real_models import smollm2_or_skip as smollm2_gguf
from repo_paths import REPO

ROOT = REPO
TEST_DATA = os.path.join(ROOT, "test_data")
# A small, fast run of the demo model: 4 sequences of 32 bytes per step.
TINY = ["--max-seq-len", "32", "--batch-size", "4", "--no-plot", "--val-fraction", "0.1"]


def tiny(tmp_path, experiment, steps, *extra):
    return ["--runs-dir", str(tmp_path), "--experiment", experiment, "--num-train-iters", str(steps), *TINY, *extra]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def store_tensors(path):
    """step and every tensor of every part of every unit."""
    store = BlockStore(path)
    files = store.manifest["files"]
    tensors = {(unit, part): store.read(unit, part) for unit, parts in files.items() for part in parts}
    return store.step, tensors


# ---------------------------------------------------------------------------------------------- the demo path
def test_demo_run_trains_reports_and_refuses_to_silently_redo(tmp_path, capsys):
    run_dir = tmp_path / "d"
    assert main(tiny(tmp_path, "d", 6, "--eval-every", "3")) == 0
    out = capsys.readouterr().out
    assert "creating a demo BitNet model" in out
    assert "step 1/6 loss" in out and "tok/s" in out and "io wait" in out and "peak RSS" in out and "ETA" in out
    assert "validation at step 3: loss" in out and "perplexity" in out
    assert "first loss" in out and "-> last loss" in out
    records = metrics(run_dir)
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    expected = {"loss", "lr", "tokens", "compute_s", "io_wait_s", "bytes_read", "bytes_written", "peak_rss"}
    assert expected <= set(train[0])
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 3, 6]  # 0: the baseline before training
    assert "validation at step 0 (before training): loss" in out and "validation loss before training" in out
    store = BlockStore(str(run_dir / "store"))
    assert store.step == 6
    assert store.extra["created_from"].startswith("random init")  # the existing extra survives the commits
    state = store.extra[STATE_KEY]
    assert state["step"] == 6 and state["finished"] and state["examples_seen"] == 24
    status = json.load(open(run_dir / "status.json"))
    assert status["phase"] == "finished" and status["step"] == 6

    # Re-running a finished run trains nothing and says how to go on.
    assert main(tiny(tmp_path, "d", 6, "--eval-every", "3")) == 0
    out = capsys.readouterr().out
    assert "already holds a finished run (6/6 steps)" in out and "--restart" in out
    assert BlockStore(str(run_dir / "store")).step == 6

    # A longer run continues from the last step; other changed settings are refused.
    assert main(tiny(tmp_path, "d", 8, "--eval-every", "3")) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 6/8" in out and "run length changed" in out
    assert BlockStore(str(run_dir / "store")).step == 8
    assert main(tiny(tmp_path, "d", 8, "--lr", "1e-2")) == 1
    err = capsys.readouterr().err
    assert "different settings (lr: was 0.003, now 0.01)" in err and "--restart" in err

    # --restart starts over from a fresh model.
    assert main(tiny(tmp_path, "d", 2, "--restart")) == 0
    assert BlockStore(str(run_dir / "store")).step == 2
    assert [r["step"] for r in metrics(run_dir) if r["type"] == "train"] == [1, 2]


# ---------------------------------------------------------------------------------------------- resume
def cli(tmp_path, experiment, steps, device="cpu"):
    return [sys.executable, os.path.join(ROOT, "finetune.py"), "--runs-dir", str(tmp_path), "--experiment", experiment,
            "--num-train-iters", str(steps), "--max-seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
            "--dropout", "0.1", "--schedule", "two-stage", "--weight-decay", "0.1", "--eval-every", "4",
            "--val-fraction", "0.1", "--no-plot", "--seed", "7", "--device", device]


def run_env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("device, steps", [("cpu", 12), ("mlx", 8)])
def test_sigterm_mid_run_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, device, steps):
    """On each backend: a run stopped by SIGTERM and resumed ends where an uninterrupted run on it does (MLX is
    slower here: fewer steps)."""
    if device == "mlx":
        pytest.importorskip("mlx.core")
    # The uninterrupted run goes alongside the one that gets stopped.
    straight = subprocess.Popen(cli(tmp_path, "straight", steps, device), env=run_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    # The process sends itself SIGTERM right after its 4th manifest commit (a fault point), not when a reader
    # of its output gets round to it: a signal sent from outside could arrive after the last step on a busy
    # machine. The handling is the same: a real SIGTERM, caught between two steps.
    stop_env = dict(run_env(), OFFLOAD_BITNET_FAULTS="commit.cleanup:4:sigterm")
    process = subprocess.Popen(cli(tmp_path, "stopped", steps, device), env=stop_env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM received: finishing the current step" in output
    assert "resume with: " in output and "--experiment stopped" in output
    straight_output, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_output
    stopped_at = BlockStore(str(tmp_path / "stopped" / "store")).step
    assert 3 <= stopped_at < steps

    resumed = subprocess.run(cli(tmp_path, "stopped", steps, device), env=run_env(), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at}/{steps}" in resumed.stdout

    step_a, tensors_a = store_tensors(str(tmp_path / "straight" / "store"))
    step_b, tensors_b = store_tensors(str(tmp_path / "stopped" / "store"))
    assert step_a == step_b == steps
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert tensors_a[key].keys() == tensors_b[key].keys(), key
        for name in tensors_a[key]:
            assert torch.equal(tensors_a[key][name], tensors_b[key][name]), (key, name)
    state_a = BlockStore(str(tmp_path / "straight" / "store")).extra[STATE_KEY]
    state_b = BlockStore(str(tmp_path / "stopped" / "store")).extra[STATE_KEY]
    assert {k: v for k, v in state_a.items() if k != "run_dir"} == {k: v for k, v in state_b.items() if k != "run_dir"}
    # metrics.jsonl tells one continuous story: every step once, with the same losses.
    losses_a = [(r["step"], r["loss"]) for r in metrics(str(tmp_path / "straight")) if r["type"] == "train"]
    losses_b = [(r["step"], r["loss"]) for r in metrics(str(tmp_path / "stopped")) if r["type"] == "train"]
    assert losses_a == losses_b and [s for s, _ in losses_a] == list(range(1, steps + 1))
    assert losses_a[-1][1] < losses_a[0][1]


def test_resuming_on_changed_data_is_refused(tmp_path, capsys):
    data = tmp_path / "notes.txt"
    data.write_text(open(os.path.join(TEST_DATA, "demo.txt")).read()[:2000])
    assert main(tiny(tmp_path, "c", 1, "--data", str(data))) == 0
    data.write_text(data.read_text() + "One more sentence.")
    assert main(tiny(tmp_path, "c", 2, "--data", str(data))) == 1
    assert "the data files' contents changed" in capsys.readouterr().err


def test_time_limit_stops_cleanly_with_the_resume_command(tmp_path, capsys):
    assert main(tiny(tmp_path, "t", 5, "--max-hours", "1e-9")) == 0
    out = capsys.readouterr().out
    assert "stopped at step 0/5 (time limit)" in out
    assert "resume with: python finetune.py --runs-dir" in out and "--max-hours 1e-9" in out
    from offload_bitnet.train.metrics import status_lines

    assert f"  resume with: {printed(out, 'resume with:')}" in status_lines(str(tmp_path / "t"))
    assert main(tiny(tmp_path, "t", 5)) == 0
    assert BlockStore(str(tmp_path / "t" / "store")).step == 5


def test_stopper_deadlines():
    # A fixed clock: the rule is checked, not the time the test happens to run at (a minute boundary, DST).
    now = datetime.datetime(2026, 6, 1, 12, 0, 30).timestamp()
    clock = lambda: now  # noqa: E731
    stopper = Stopper(RunConfig(until="11:58"), clock)  # already passed today: tomorrow
    assert stopper.deadline == datetime.datetime(2026, 6, 2, 11, 58).timestamp() and stopper.reason(1.0) is None
    stopper = Stopper(RunConfig(until="12:30"), clock)  # later today
    assert stopper.deadline == datetime.datetime(2026, 6, 1, 12, 30).timestamp()
    assert stopper.reason(29 * 60.0) is None and stopper.reason(30 * 60.0) == "time limit"
    stopper = Stopper(RunConfig(max_hours=1.0), clock)
    assert stopper.reason(10.0) is None and stopper.reason(3601.0) == "time limit"
    stopper.requested = "SIGINT"
    assert stopper.reason(0.0) == "SIGINT"


def test_resume_command_drops_one_shot_flags():
    assert resume_command(["m", "--data", "a b.txt", "--restart"], "python finetune.py") == \
        "python finetune.py m --data 'a b.txt'"


# ---------------------------------------------------------------------------------------------- models
def test_a_store_trains_in_place_and_keeps_its_extra(tmp_path, capsys):
    store_path = str(tmp_path / "mystore")
    create_model(store_path, size="demo", arch="bitnet", n_layers=2)
    args = [store_path, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(tmp_path / "runs"),
            "--num-train-iters", "2", "--batch-size", "2", "--max-seq-len", "64", "--no-plot"]
    assert main(args + ["--export-path", str(tmp_path / "exported"), "--export-format", "hf-bitnet"]) == 0
    out = capsys.readouterr().out
    assert "lr 0.0001 cosine" in out  # the default for fine-tuning a qat store
    assert json.load(open(tmp_path / "exported" / "config.json"))["num_hidden_layers"] == 2
    store = BlockStore(store_path)
    assert store.step == 2 and "created_from" in store.extra and store.extra[STATE_KEY]["base_step"] == 0
    assert os.path.isfile(tmp_path / "runs" / "mystore" / "metrics.jsonl")
    # Another experiment on the same store starts a new run on top of the current weights.
    assert main(args + ["--experiment", "second"]) == 0
    assert "last trained by the run in" in capsys.readouterr().out
    store = BlockStore(store_path)
    assert store.step == 4 and store.extra[STATE_KEY]["base_step"] == 2


def digest_folder(folder):
    sha = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        sha.update(name.encode())
        sha.update(open(os.path.join(folder, name), "rb").read())
    return sha.hexdigest()


def test_an_importable_model_is_imported_into_the_run_and_left_untouched(tmp_path, capsys):
    from offload_bitnet.formats import export_model

    source = str(tmp_path / "src")
    create_model(source, size="demo", arch="bitnet", n_layers=2)
    # Full precision (latent weights): a packed export has no master weights to train (tests/store/test_packed_only.py).
    hf_dir = export_model(source, str(tmp_path / "hf-model"), "hf")
    before = digest_folder(hf_dir)
    args = [hf_dir, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(tmp_path / "runs"),
            "--num-train-iters", "2", "--batch-size", "2", "--max-seq-len", "64", "--no-plot"]
    assert main(args) == 0
    assert "importing" in capsys.readouterr().out
    assert digest_folder(hf_dir) == before
    assert BlockStore(str(tmp_path / "runs" / "hf-model" / "store")).step == 2
    # The run folder remembers its source: another model under the same name is refused.
    assert main([source, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(tmp_path / "runs"),
                 "--experiment", "hf-model", "--num-train-iters", "1", "--no-plot"]) == 1
    assert "belongs to a run of" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- errors
def test_a_second_run_on_the_same_store_gets_a_clean_message(tmp_path, capsys):
    assert main(tiny(tmp_path, "lock", 1)) == 0
    capsys.readouterr()  # the first run's output (its byte-tokenizer warning included)
    holder = BlockStore(str(tmp_path / "lock" / "store"), writable=True)
    try:
        assert main(tiny(tmp_path, "lock", 2)) == 1
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert err.startswith("error: store") and "is in use by pid" in err and "Traceback" not in err


def test_errors_are_one_paragraph_without_traceback_unless_debug(tmp_path, capsys):
    assert main([str(tmp_path / "no-such-model"), "--data", "x.txt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err

    bad = tiny(tmp_path, "bad", 2, "--data", os.path.join(TEST_DATA, "bad_json.jsonl"))
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert "bad_json.jsonl, line 3: not valid JSON" in err and "Traceback" not in err
    assert main(bad + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err

    assert main(["--mode", "full", "--lora-rank", "4"]) == 2
    assert "lora_rank=4 (from command line) applies only to --mode lora" in capsys.readouterr().err
    assert main(tiny(tmp_path, "bad2", 2, "--prompt", "x" * 600)) == 1
    assert "the model's context is 512" in capsys.readouterr().err


def test_skip_bad_records_trains_and_reports(tmp_path, capsys):
    args = tiny(tmp_path, "skip", 1, "--data", os.path.join(TEST_DATA, "bad_json.jsonl"), "--skip-bad-records",
                "--val-fraction", "0")
    assert main(args) == 0
    assert "note: skipped 1 malformed record(s)" in capsys.readouterr().out


def test_generation_prompts_and_plot(tmp_path, capsys):
    args = tiny(tmp_path, "gen", 2, "--prompt", "The light", "--max-new-tokens", "4")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sample at step 2: 'The light' -> " in out
    samples = [r for r in metrics(str(tmp_path / "gen")) if r["type"] == "sample"]
    assert len(samples) == 1 and samples[0]["prompt"] == "The light"
    pytest.importorskip("matplotlib")
    assert main(args + ["--plot-only"]) == 0
    assert "loss plot:" in capsys.readouterr().out
    with open(tmp_path / "gen" / "loss.png", "rb") as handle:
        assert handle.read(4) == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- LoRA
def digest_tree(folder):
    """SHA-256 over every file's relative path and bytes under ``folder``."""
    sha = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            sha.update(os.path.relpath(path, folder).encode())
            sha.update(open(path, "rb").read())
    return sha.hexdigest()


def lora_args(store_path, tmp_path, *extra):
    return [store_path, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(tmp_path / "runs"),
            "--mode", "lora", "--lora-rank", "4", "--num-train-iters", "4", "--batch-size", "2", "--max-seq-len", "64",
            "--lr", "1e-2", "--val-fraction", "0.25", "--no-plot", *extra]


def test_lora_trains_adapters_leaves_the_store_unmodified_and_merges(tmp_path, capsys):
    from offload_bitnet.engine.streaming import StreamingEngine
    from offload_bitnet.reference.parity import relative_error

    store_path = create_model(str(tmp_path / "base"), size="demo", arch="llama", n_layers=2)
    before = digest_tree(store_path)
    args = lora_args(store_path, tmp_path, "--lora-targets", "q_proj,v_proj,down_proj", "--merge",
                     "--export-path", str(tmp_path / "hf-merged"), "--export-format", "hf")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(frozen, read-only)" in out and "LoRA: rank 4, alpha 16" in out and "(unchanged)" in out
    assert digest_tree(store_path) == before  # not a byte of the base changed (no lock file, no scratch)
    run_dir = tmp_path / "runs" / "base"
    peft = json.load(open(run_dir / "adapter" / "adapter_config.json"))
    assert peft["peft_type"] == "LORA" and peft["r"] == 4
    assert peft["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert os.path.isfile(run_dir / "adapter" / "adapter_model.safetensors")
    progress = json.load(open(run_dir / "adapter" / "adapter_state.json"))
    assert progress["step"] == 4 and progress["extra"][STATE_KEY]["finished"]
    evals = [r["val_loss"] for r in metrics(str(run_dir)) if r["type"] == "eval"]
    assert evals[-1] < evals[0] - 0.1  # the validation loss falls
    status = json.load(open(run_dir / "status.json"))
    assert status["adapter_step"] == 4 and status["store_step"] == 0

    # The merged store computes what the base with adapters computed (fp16 rounding of the merged weights aside).
    from offload_bitnet.model.lora import LoRAConfig

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with_adapters = StreamingEngine(BlockStore(store_path), EngineOptions(
        lora=LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")), adapter_dir=str(run_dir / "adapter")))
    expected = with_adapters.logits(ids)
    merged_error = relative_error(StreamingEngine(BlockStore(str(run_dir / "merged"))).logits(ids), expected)
    base_error = relative_error(StreamingEngine(BlockStore(store_path)).logits(ids), expected)
    assert merged_error < 2e-3 and merged_error < base_error / 10, (merged_error, base_error)
    assert json.load(open(tmp_path / "hf-merged" / "config.json"))["num_hidden_layers"] == 2

    # Re-running the finished run trains nothing; --merge is redone only when the merged store is missing.
    shutil.rmtree(run_dir / "merged")
    assert main(args) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    assert BlockStore(str(run_dir / "merged")).config.n_layers == 2
    # The same folder cannot switch to training the weights.
    assert main([store_path, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(tmp_path / "runs"),
                 "--num-train-iters", "1", "--no-plot"]) == 1
    assert "holds a LoRA run" in capsys.readouterr().err


def test_lora_spills_activations_into_the_run_folder_not_the_base(tmp_path, monkeypatch):
    from offload_bitnet.engine.streams import ActivationStash

    spill_dirs = set()
    real_put = ActivationStash.put

    def put(self, key, tensor):
        real_put(self, key, tensor)
        if key in self._on_disk:
            spill_dirs.add(os.path.dirname(self._on_disk[key][0]))

    monkeypatch.setattr(ActivationStash, "put", put)
    store_path = create_model(str(tmp_path / "base"), size="demo", arch="bitnet", n_layers=2)
    before = digest_tree(store_path)
    assert main(lora_args(store_path, tmp_path, "--memory-budget", "1KiB", "--num-train-iters", "2")) == 0
    assert spill_dirs == {str(tmp_path / "runs" / "base" / "scratch")}
    assert digest_tree(store_path) == before
    train = [r for r in metrics(str(tmp_path / "runs" / "base")) if r["type"] == "train"]
    assert all(r["spilled_bytes"] > 0 for r in train)


def test_lora_resume_is_exact(tmp_path):
    def run(experiment, steps):
        return main(tiny(tmp_path, experiment, steps, "--mode", "lora", "--lora-rank", "2", "--lora-dropout", "0.1",
                         "--dropout", "0.1", "--schedule", "constant", "--warmup-fraction", "0", "--grad-accum", "2",
                         "--no-eval-at-start"))

    assert run("straight", 5) == 0
    assert run("resumed", 2) == 0 and run("resumed", 5) == 0  # continues from step 2 (constant lr: same curve)
    from offload_bitnet.model.lora import AdapterSet

    config = BlockStore(str(tmp_path / "straight" / "store")).config
    a = AdapterSet.load(str(tmp_path / "straight" / "adapter"), config)
    b = AdapterSet.load(str(tmp_path / "resumed" / "adapter"), config)
    assert a.step == b.step == 5
    for key, mats in a.weights.items():
        for matrix, tensor in mats.items():
            assert torch.equal(tensor, b.weights[key][matrix]), (key, matrix)
            assert torch.equal(a.moments[key][matrix][1], b.moments[key][matrix][1]), (key, matrix)
    losses = [[r["loss"] for r in metrics(str(tmp_path / name)) if r["type"] == "train"]
              for name in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 5


def test_a_lora_run_folder_is_locked(tmp_path, capsys):
    from offload_bitnet.train.run_folder import RunLock

    os.makedirs(tmp_path / "locked")
    lock = RunLock(str(tmp_path / "locked" / "run.lock"))
    try:
        assert main(tiny(tmp_path, "locked", 1, "--mode", "lora")) == 1
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "is in use by pid" in err and "Traceback" not in err


def test_lora_samples_use_the_adapters(tmp_path, capsys):
    assert main(tiny(tmp_path, "samples", 2, "--mode", "lora", "--lr", "5e-2", "--prompt", "The light",
                     "--max-new-tokens", "5")) == 0
    samples = [r for r in metrics(str(tmp_path / "samples")) if r["type"] == "sample"]
    assert len(samples) == 1 and samples[0]["prompt"] == "The light" and samples[0]["text"]
    from offload_bitnet.engine.streaming import StreamingEngine
    from offload_bitnet.tokenizers.base import ByteTokenizer
    from offload_bitnet.train.samples import generate_samples

    base = StreamingEngine(BlockStore(str(tmp_path / "samples" / "store")))
    assert generate_samples(base, ByteTokenizer(), ["The light"], 5, 0, 1 << 30) != [samples[0]["text"]]


# ---------------------------------------------------------------------------------------------- quantization warmup
def test_quant_warmup_converts_a_full_precision_model_to_ternary(tmp_path, capsys):
    from offload_bitnet.formats import export_model

    source = create_model(str(tmp_path / "llama"), size="demo", arch="llama", n_layers=2)
    hf_dir = export_model(source, str(tmp_path / "hf"), "hf")
    common = [hf_dir, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(tmp_path / "runs"),
              "--batch-size", "2", "--max-seq-len", "64", "--val-fraction", "0.25", "--no-plot", "--lr", "1e-3"]
    assert main(common + ["--experiment", "warm", "--quant-warmup", "3", "--num-train-iters", "4"]) == 0
    out = capsys.readouterr().out
    assert "ternary mix rises linearly from 0 to 1 over 3 steps" in out
    assert "validation at step 0 (full precision, before the conversion, quant mix 0)" in out
    assert "validation at step 0 (ternary, before any training, quant mix 1)" in out
    store = BlockStore(str(tmp_path / "runs" / "warm" / "store"))
    assert store.settings.mode == "qat" and store.step == 4 and store.extra[STATE_KEY]["quant_mix"] == 1.0
    records = metrics(str(tmp_path / "runs" / "warm"))
    assert [r["quant_mix"] for r in records if r["type"] == "train"] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    evals = [r for r in records if r["type"] == "eval"]
    assert [(r["step"], r["quant_mix"]) for r in evals] == [(0, 0.0), (0, 1.0), (4, 1.0)]

    def baseline(experiment, *extra):
        assert main(common + ["--experiment", experiment, "--num-train-iters", "1", *extra]) == 0
        return [r for r in metrics(str(tmp_path / "runs" / experiment)) if r["type"] == "eval"][0]["val_loss"]

    # Mix 0 is the full-precision model (the baseline of training it in full precision); mix 1 is the ternary
    # model (the baseline of plain qat training on the same import).
    assert evals[0]["val_loss"] == pytest.approx(baseline("full"), rel=1e-4)
    assert BlockStore(str(tmp_path / "runs" / "full" / "store")).settings.mode == "full"
    assert evals[1]["val_loss"] == pytest.approx(baseline("qat", "--mode", "qat"), rel=1e-6)


def test_quant_warmup_needs_a_qat_store(tmp_path, capsys):
    store_path = create_model(str(tmp_path / "llama"), size="demo", arch="llama", n_layers=2)
    assert main([store_path, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(tmp_path / "runs"),
                 "--quant-warmup", "5", "--num-train-iters", "1", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "needs a qat store" in err and "--mode qat" in err
    assert BlockStore(store_path).step == 0


# ---------------------------------------------------------------------------------------------- non-finite steps
def poison_training_losses(monkeypatch, calls):
    """Make the training loss of the given backward calls of chunked_cross_entropy (1-based) NaN."""
    import offload_bitnet.engine.backend as engine_module  # the torch backend runs the training cross-entropy

    real = engine_module.chunked_cross_entropy
    count = [0]

    def fake(hidden, head_weight, targets, chunk_tokens, scale, backward, **options):
        total, grad = real(hidden, head_weight, targets, chunk_tokens, scale, backward, **options)
        if backward:
            count[0] += 1
            if count[0] in calls:
                return float("nan"), grad
        return total, grad

    monkeypatch.setattr(engine_module, "chunked_cross_entropy", fake)


@pytest.mark.parametrize("mode", ["qat", "lora"])
def test_a_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, capsys, monkeypatch, mode):
    poison_training_losses(monkeypatch, {2})
    assert main(tiny(tmp_path, "skip", 4, "--mode", mode)) == 0
    out = capsys.readouterr().out
    assert "step 2/4 skipped: non-finite loss (nan)" in out and "1 step(s) skipped (non-finite)" in out
    records = metrics(str(tmp_path / "skip"))
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 3, 4]
    assert [r["step"] for r in records if r["type"] == "skip"] == [2]
    if mode == "lora":
        state = json.load(open(tmp_path / "skip" / "adapter" / "adapter_state.json"))
        step, extra = state["step"], state["extra"]
    else:
        store = BlockStore(str(tmp_path / "skip" / "store"))
        step, extra = store.step, store.extra
    assert step == 3 and extra[STATE_KEY]["skipped_steps"] == 1 and extra[STATE_KEY]["optimizer_step"] == 3
    assert main(tiny(tmp_path, "skip", 5, "--mode", mode)) == 0  # resumes: the skip is part of the committed state
    assert "at step 4/5" in capsys.readouterr().out


def test_repeated_non_finite_steps_stop_the_run_with_the_store_intact(tmp_path, capsys, monkeypatch):
    same = ["--no-eval-at-start", "--val-fraction", "0", "--schedule", "constant", "--warmup-fraction", "0"]
    assert main(tiny(tmp_path, "one", 1, *same)) == 0
    poison_training_losses(monkeypatch, set(range(2, 100)))
    assert main(tiny(tmp_path, "nan", 8, "--max-skipped-steps", "2", *same)) == 1
    captured = capsys.readouterr()
    assert "step 2/8 skipped" in captured.out and "step 3/8 skipped" in captured.out
    assert "2 steps in a row had a non-finite loss or gradient" in captured.err
    assert "holds optimizer step 1, the last good one" in captured.err and "Traceback" not in captured.err
    assert BlockStore(str(tmp_path / "nan" / "store")).verify_all() == []
    # Bit for bit the store of a run that stopped after its first step.
    step_a, tensors_a = store_tensors(str(tmp_path / "one" / "store"))
    step_b, tensors_b = store_tensors(str(tmp_path / "nan" / "store"))
    assert step_a == step_b == 1 and tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert all(torch.equal(tensors_a[key][n], tensors_b[key][n]) for n in tensors_a[key]), key
    assert json.load(open(tmp_path / "nan" / "status.json"))["phase"].startswith("stopped (2 non-finite")


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_lora_learns_the_style_and_leaves_the_store_unmodified(tmp_path, capsys):
    """The acceptance run of README.md (about 4 minutes on 2 CPU cores)."""
    from offload_bitnet.formats import import_model
    from offload_bitnet.generate import Generator, SamplingOptions, decode_continuation
    from offload_bitnet.tokenizers.runtime import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    store_path = import_model(smollm2_gguf(), str(tmp_path / "smol"), None, progress=False)
    before = digest_tree(store_path)
    assert main([store_path, "--runs-dir", str(tmp_path / "runs"), "--experiment", "style", "--mode", "lora",
                 "--data", os.path.join(TEST_DATA, "style_chat.jsonl"),
                 "--val-data", os.path.join(TEST_DATA, "style_chat_val.jsonl"), "--max-seq-len", "128",
                 "--batch-size", "4", "--num-epochs", "2", "--lr", "1e-3", "--merge", "--no-plot"]) == 0
    assert digest_tree(store_path) == before
    evals = [r["val_loss"] for r in metrics(str(tmp_path / "runs" / "style")) if r["type"] == "eval"]
    assert evals[-1] < evals[0] / 2, evals
    merged = BlockStore(str(tmp_path / "runs" / "style" / "merged"))
    tokenizer = load_tokenizer(merged.path, merged.extra.get("tokenizer"))
    questions = ["What is the capital of Spain?", "How many legs does a dog have?", "Why is the sea salty?"]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    result = Generator(merged).generate(prompts, SamplingOptions(max_new_tokens=40), stop_ids=tokenizer.stop_ids,
                                        pad_id=tokenizer.pad_id)
    for prompt, tokens in zip(prompts, result.tokens):
        answer = decode_continuation(tokenizer, prompt, tokens).strip()
        assert answer.startswith("Ahoy!") and answer.endswith("Fair winds, matey!"), answer


def test_a_run_with_tokenizer_option_stores_it_in_its_own_copy(tmp_path, capsys):
    """A model without a tokenizer (vocabulary 300, not bytes) trains with --tokenizer; the run's imported
    copy then carries that tokenizer, so test_gen.py and exports of it need no option."""
    from offload_bitnet.formats import export_model
    from offload_bitnet.tokenizers.gguf_rebuild import build_gguf_bpe, bytes_to_unicode
    from offload_bitnet.tokenizers.runtime import load_tokenizer

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["<|endoftext|>"]  # byte-level BPE, no merges
    folder = tmp_path / "tok"
    folder.mkdir()
    build_gguf_bpe({"model": "gpt2", "tokens": tokens, "token_type": [1] * 256 + [3], "merges": []}).save(
        str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    blank = create_model(str(tmp_path / "blank"), size="demo", arch="llama", n_layers=1, vocab_size=300)
    hf = export_model(blank, str(tmp_path / "hf"), "hf", progress=False)
    args = [hf, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(tmp_path / "runs"),
            "--num-train-iters", "1", "--batch-size", "2", "--max-seq-len", "32", "--no-plot"]
    assert main(args) == 1
    assert "300-token vocabulary does not fit the built-in byte tokenizer" in capsys.readouterr().err
    assert main(args + ["--tokenizer", str(folder), "--restart"]) == 0
    store = BlockStore(str(tmp_path / "runs" / "hf" / "store"))
    assert store.step == 1 and store.extra["tokenizer"]["kind"] == "hf"
    assert load_tokenizer(store.path, store.extra["tokenizer"]).vocab_size == 257
def readme_quick_start_finetune() -> list[str]:
    """The arguments of the README quick start's ``python finetune.py $GGUF ...`` command (continuation lines
    joined)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    command = section.split("python finetune.py $GGUF", 1)[1].split("\n```", 1)[0]
    command = command.replace("\\\n", " ").split("\n", 1)[0]
    return shlex.split(command)


@pytest.mark.slow
def test_the_readme_quick_start_fine_tune_teaches_the_style(tmp_path, capsys, monkeypatch):
    """The quick start's fine-tune, as printed in README.md (about 2-3 minutes on 2 CPU cores)."""
    monkeypatch.chdir(ROOT)  # its --data path is relative to the checkout
    torch.set_num_threads(os.cpu_count() or 1)
    args = readme_quick_start_finetune()
    assert "--prompt" in args and "--merge" in args
    assert main([smollm2_gguf(), *args, "--runs-dir", str(tmp_path / "runs"), "--experiment", "quick"]) == 0
    samples = [r for r in metrics(str(tmp_path / "runs" / "quick")) if r["type"] == "sample"]
    assert samples and samples[-1]["text"].strip().startswith("Ahoy!"), samples
    out = capsys.readouterr().out
    assert printed(out, "generate:").startswith(f"python test_gen.py {tmp_path / 'runs' / 'quick' / 'merged'} cpu "
                                                "--chat --prompt")


# ---------------------------------------------------------------------------------------------- printed commands
def printed(out: str, prefix: str) -> str:
    """The command on the line of ``out`` that starts with ``prefix``."""
    return next(line for line in out.splitlines() if line.startswith(prefix))[len(prefix):].strip()


def run_printed(command: str) -> int:
    """Run a printed ``python finetune.py ...`` command literally (in this process)."""
    words = shlex.split(command)
    assert words[:2] == ["python", "finetune.py"], command
    return main(words[2:])


def folder_digest(path) -> dict:
    return {os.path.relpath(os.path.join(folder, name), path): hashlib.sha256(open(os.path.join(folder, name),
                                                                                   "rb").read()).hexdigest()
            for folder, _, names in os.walk(path) for name in names}


def test_printed_restart_command_replaces_its_own_run_and_no_other(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/demo, the default run, lives here
    assert main(["--num-train-iters", "1", *TINY]) == 0
    demo_before = folder_digest("runs/demo")
    x_run = ["--experiment", "X", "--num-train-iters", "2", *TINY]
    assert main(x_run) == 0
    assert main(x_run) == 0  # finished: says how to start over and how to train longer
    out = capsys.readouterr().out
    restart = printed(out, "to train it from scratch again (this run is deleted):")
    assert "--experiment X" in restart and restart.endswith("--restart")
    assert "--experiment X" in printed(out, "to train it longer (N > 2):")
    record = json.load(open("runs/X/run.json"))
    x_created = record["created"] = "2000-01-01T00:00:00"  # a mark the restarted run must replace (no clock wait)
    with open("runs/X/run.json", "w") as handle:
        json.dump(record, handle)
    assert run_printed(restart) == 0
    out = capsys.readouterr().out
    deleting = printed(out, "--restart: deleting the run")
    assert deleting.startswith(os.path.abspath("runs/X")) and "store/" in deleting and "metrics.jsonl" in deleting
    assert json.load(open("runs/X/run.json"))["created"] != x_created
    assert [r["step"] for r in metrics("runs/X") if r["type"] == "train"] == [1, 2]
    assert folder_digest("runs/demo") == demo_before  # the other run is untouched


def test_restart_never_replaces_a_run_of_another_model_that_it_does_not_name(tmp_path, capsys):
    data = os.path.join(TEST_DATA, "text.jsonl")
    first, second = (create_model(str(tmp_path / where / "m"), size="demo", arch="bitnet", n_layers=1)
                     for where in ("a", "b"))
    common = ["--data", data, "--runs-dir", str(tmp_path / "runs"), "--num-train-iters", "1", "--batch-size", "2",
              "--max-seq-len", "32", "--no-plot"]
    assert main([first, *common]) == 0
    before = folder_digest(tmp_path / "runs" / "m")
    capsys.readouterr()
    assert main([second, *common, "--restart"]) == 1  # the same folder name "m", another model
    err = capsys.readouterr().err
    assert "nothing was deleted" in err and f"holds a run of {first}" in err
    assert folder_digest(tmp_path / "runs" / "m") == before
    named = printed(err.replace("error: ", ""), "--restart: the run folder").split("To replace that run, name it: ")[1]
    named = named.split("; to keep it")[0]
    assert "--experiment m" in named and named.endswith("--restart")
    assert run_printed(named) == 0
    assert json.load(open(tmp_path / "runs" / "m" / "run.json"))["source"] == second


def test_every_summary_ends_with_its_outputs_and_a_working_generate_command(tmp_path, capsys):
    assert main(tiny(tmp_path, "gen", 1)) == 0
    out = capsys.readouterr().out
    tail = out.rstrip().splitlines()[-4:]
    assert tail[0] == f"outputs in {tmp_path / 'gen'}:" and tail[1] == f"  model store: {tmp_path / 'gen' / 'store'}"
    generate = printed(out, "generate:")
    assert generate == f"python test_gen.py {tmp_path / 'gen' / 'store'} cpu --prompt The"
    words = shlex.split(generate)
    done = subprocess.run([sys.executable, os.path.join(ROOT, words[1]), *words[2:], "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "new tokens" in done.stdout + done.stderr, done.stderr


def test_an_unmerged_lora_run_says_how_to_generate_with_its_adapters_and_how_to_merge(tmp_path, capsys):
    assert main(tiny(tmp_path, "adapt", 1, "--mode", "lora", "--prompt", "The light", "--max-new-tokens", "3")) == 0
    out = capsys.readouterr().out
    generate = printed(out, "generate with the adapters (those of the last committed step):")
    assert generate.startswith("python test_gen.py ") and f"--adapter {tmp_path / 'adapt' / 'adapter'}" in generate
    words = shlex.split(generate)
    done = subprocess.run([sys.executable, os.path.join(ROOT, words[1]), *words[2:], "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "new tokens" in done.stdout + done.stderr, done.stderr
    merge = printed(out, "to fold them into a store of their own (for exports):")
    assert merge.endswith("--merge") and "--experiment adapt" in merge
    assert run_printed(merge) == 0  # the finished run merges its adapters
    out = capsys.readouterr().out
    assert f"  merged store: {tmp_path / 'adapt' / 'merged'}" in out
    assert printed(out, "generate:") == f"python test_gen.py {tmp_path / 'adapt' / 'merged'} cpu --prompt 'The light'"


# ---------------------------------------------------------------------------------------------- divergence
def test_a_diverging_run_is_flagged_while_it_runs_and_after(tmp_path, capsys):
    from offload_bitnet.train.metrics import status_lines

    assert main(tiny(tmp_path, "div", 8, "--lr", "3", "--eval-every", "4")) == 0
    out = capsys.readouterr().out
    warning = printed(out, "warning: the run is diverging: the training loss (smoothed) is")
    assert "--lr LR --restart" in warning and "--lr 3" not in warning
    assert "summary: finished, but its loss DIVERGED" in out
    assert "  WARNING: diverged: the validation loss is" in out
    records = metrics(str(tmp_path / "div"))
    flagged = [r for r in records if r["type"] == "diverging"]
    assert {r["metric"] for r in flagged} == {"train", "eval"} and all(r["value"] > r["limit"] for r in flagged)
    assert json.load(open(tmp_path / "div" / "status.json"))["diverging"]
    lines = status_lines(str(tmp_path / "div"))
    assert "LOSS DIVERGED" in lines[0] and any("WARNING: diverging" in line for line in lines)
    # A healthy run is not flagged.
    assert main(tiny(tmp_path, "calm", 4)) == 0
    out = capsys.readouterr().out
    assert "warning: the run is diverging" not in out and "summary: finished\n" in out and "WARNING" not in out
    assert not [r for r in metrics(str(tmp_path / "calm")) if r["type"] == "diverging"]


# ---------------------------------------------------------------------------------------------- refused runs
def test_a_refused_run_writes_nothing(tmp_path, capsys):
    store_path = create_model(str(tmp_path / "held"), size="demo", arch="bitnet", n_layers=1)
    holder = BlockStore(store_path, writable=True)  # another run trains this store
    try:
        assert main([store_path, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir",
                     str(tmp_path / "runs"), "--num-train-iters", "1", "--no-plot"]) == 1
    finally:
        holder.close()
    assert "is in use by pid" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs" / "held")  # no run.json, no run.lock, no folder
    # Refused after the demo store was made (the prompt does not fit the context): the store is kept for the
    # next attempt, nothing else is left.
    assert main(tiny(tmp_path, "long", 1, "--prompt", "x" * 5000)) == 1
    assert "Shorten it" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "long")) == ["run.json", "store"]
    assert main(tiny(tmp_path, "long", 1)) == 0 and BlockStore(str(tmp_path / "long" / "store")).step == 1
