import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from offload_bitnet import create_model
from offload_bitnet.store import BlockStore
from offload_bitnet.train import STATE_KEY, Stopper, main, resume_command
from offload_bitnet.runconfig import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    assert [r["step"] for r in records if r["type"] == "eval"] == [3, 6]
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


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, capsys):
    assert main(tiny(tmp_path, "plan", 10, "--dry-run", "--grad-accum", "2")) == 0
    out = capsys.readouterr().out
    for fragment in ("plan for plan:", "806,912 parameters", "on disk:", "per step: 4 x 32 tokens in 2 micro-batch",
                     "reads", "writes", "peak memory:", "time per step:", "run: 10 steps"):
        assert fragment in out
    assert not os.path.exists(tmp_path / "plan" / "store")


# ---------------------------------------------------------------------------------------------- resume
def cli(tmp_path, experiment, steps):
    return [sys.executable, os.path.join(ROOT, "finetune.py"), "--runs-dir", str(tmp_path), "--experiment", experiment,
            "--num-train-iters", str(steps), "--max-seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
            "--dropout", "0.1", "--schedule", "two-stage", "--weight-decay", "0.1", "--eval-every", "4",
            "--val-fraction", "0.1", "--no-plot", "--seed", "7"]


def run_env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_sigterm_mid_run_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    steps = 12
    # The uninterrupted run goes alongside the one that gets stopped.
    straight = subprocess.Popen(cli(tmp_path, "straight", steps), env=run_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    process = subprocess.Popen(cli(tmp_path, "stopped", steps), env=run_env(), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGTERM)
            break
    rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM received: finishing the current step" in output
    assert "resume with: " in output and "--experiment stopped" in output
    straight_output, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_output
    stopped_at = BlockStore(str(tmp_path / "stopped" / "store")).step
    assert 3 <= stopped_at < steps

    resumed = subprocess.run(cli(tmp_path, "stopped", steps), env=run_env(), cwd=ROOT, capture_output=True,
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
    assert main(tiny(tmp_path, "t", 5)) == 0
    assert BlockStore(str(tmp_path / "t" / "store")).step == 5


def test_stopper_deadlines():
    until_later = time.strftime("%H:%M", time.localtime(time.time() - 120))  # already passed today: tomorrow
    stopper = Stopper(RunConfig(until=until_later))
    assert stopper.deadline > time.time() + 23 * 3600 and stopper.reason(1.0) is None
    stopper = Stopper(RunConfig(max_hours=1.0))
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
    hf_dir = export_model(source, str(tmp_path / "hf-model"), "hf-bitnet")
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

    assert main(["--mode", "lora"]) == 2
    assert "LoRA mode is not implemented yet" in capsys.readouterr().err
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
