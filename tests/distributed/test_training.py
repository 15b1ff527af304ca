"""``finetune.py`` under real torchrun (distributed/training.py): 2 gloo ranks with 1 micro-batch each train the
model one process trains with ``--grad-accum 2`` (qat, full, lora; dropout on), bit for bit; a rank killed at a
seeded moment and the same command relaunched ends at the same model; rank 0 alone writes the run's records;
refusals come before anything is written.

Every process runs one thread (torchrun sets ``OMP_NUM_THREADS=1`` for its workers; the one-process runs get the
same): reductions inside a matmul round differently with another thread count."""
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from offload_bitnet import create_model
from repo_paths import BENCH, TEST_DATA

sys.path.insert(0, BENCH)
from distributed_finetune_crash import run_finetune as finetune  # noqa: E402

STEPS = 3
COMMON = ["--num-train-iters", str(STEPS), "--max-seq-len", "32", "--batch-size", "4", "--no-plot",
          "--val-fraction", "0.1", "--dropout", "0.1", "--seed", "3"]


def succeeded(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def model_args(mode: str, folder) -> list[str]:
    """MODEL and mode options: the demo BitNet (qat, created by the run), a full LLaMA store, a LoRA on it."""
    if mode == "qat":
        return []
    store = os.path.join(str(folder), "llama")
    if not os.path.exists(store):
        torch.set_num_threads(1)  # the stores compared must start equal
        create_model(store, size="demo", arch="llama", n_layers=2, mode="full", tie_embeddings=False)
    data = ["--data", os.path.join(TEST_DATA, "demo.txt")]
    return [store, *data] + (["--mode", "lora", "--lora-dropout", "0.1"] if mode == "lora" else [])


def result_tensors(run_dir: str, mode: str, export: str) -> dict:
    if mode == "lora":
        return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    return load_file(os.path.join(export, "model.safetensors"))


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mode -> (folder, tensors of the 2-rank run, tensors of the one-process --grad-accum 2 run, 2-rank output)."""
    done = {}

    def get(mode: str):
        if mode not in done:
            folder = tmp_path_factory.mktemp(f"runs_{mode}")
            outputs = {}
            for name, ranks, extra in (("ranks", 2, []), ("one", 0, ["--grad-accum", "2"])):
                # A full store given as MODEL is trained in place by one process: each run gets its own copy.
                model = model_args(mode, folder / name)
                export = str(folder / f"{name}_hf")
                args = [*model, "--runs-dir", str(folder / "runs"), "--experiment", name, *COMMON, *extra]
                if mode != "lora":
                    args += ["--export-path", export, "--export-format", "hf"]
                outputs[name] = succeeded(finetune(args, ranks, str(folder)))
                outputs[name + "_tensors"] = result_tensors(str(folder / "runs" / name), mode, export)
                outputs[name + "_args"] = args
            done[mode] = (folder, outputs)
        return done[mode]
    return get


@pytest.mark.parametrize("mode", ["qat", "full", "lora"])
def test_two_ranks_train_what_one_process_trains_with_grad_accum_2(runs, mode):
    folder, outputs = runs(mode)
    assert_bit_identical(outputs["ranks_tensors"], outputs["one_tensors"])
    losses = [[json.loads(line)["loss"] for line in open(folder / "runs" / name / "metrics.jsonl")
               if json.loads(line)["type"] == "train"] for name in ("ranks", "one")]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS


def test_rank_zero_alone_reports_and_writes_the_records(runs):
    folder, outputs = runs("qat")
    run_dir = folder / "runs" / "ranks"
    stdout = outputs["ranks"].stdout
    for step in range(1, STEPS + 1):
        assert stdout.count(f"step {step}/{STEPS} loss") == 1, stdout
    assert "data parallel: 2 ranks (gloo)" in stdout and "1 micro-batch(es) of 2 per rank" in stdout
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert [r["tokens"] for r in records if r["type"] == "train"] == [4 * 31] * STEPS  # every rank's tokens
    assert json.load(open(run_dir / "status.json"))["phase"] == "finished"
    assert sorted(p for p in os.listdir(run_dir) if p.startswith("store.rank")) == ["store.rank0", "store.rank1"]
    assert (run_dir / "run.lock").exists() and (run_dir / "run.rank1.lock").exists()
    # The resume and generate commands a user copies: torchrun again, and test_gen.py in one process.
    assert "generate: python " in stdout and "test_gen.py" in stdout
    # Warnings too come once, from rank 0 (the demo store has no tokenizer of its own).
    assert outputs["ranks"].stderr.count("warning: using the built-in byte tokenizer") == 1, outputs["ranks"].stderr


@pytest.mark.parametrize("faults, rank", [("commit.rename:3:kill", 1),  # between the ranks' switches of step 2
                                          ("update:4:kill", 0)])        # inside an owner's block update, step 2
def test_a_rank_killed_then_the_same_command_relaunched_ends_bit_identical(runs, tmp_path, faults, rank):
    folder, outputs = runs("qat")
    args = [arg.replace(str(folder), str(tmp_path)) for arg in outputs["ranks_args"]]
    crashed = finetune(args, 2, str(tmp_path), faults=faults, fault_rank=rank)
    assert crashed.returncode != 0, crashed.stdout[-2000:]
    statuses = json.load(open(tmp_path / "runs" / "ranks" / "status.json"))
    assert statuses["step"] < STEPS  # it died before the end
    resumed = succeeded(finetune(args, 2, str(tmp_path)))
    assert "resuming" in resumed.stdout
    assert_bit_identical(result_tensors(str(tmp_path / "runs" / "ranks"), "qat", args[args.index("--export-path") + 1]),
                         outputs["ranks_tensors"])


def test_one_process_refuses_a_data_parallel_run_folder(runs):
    folder, outputs = runs("qat")
    result = finetune(outputs["ranks_args"], 0, str(folder))
    assert result.returncode != 0
    assert "holds a data-parallel run (2 rank stores): resume it with torchrun" in result.stderr


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_anything_is_written(tmp_path):
    args = ["--runs-dir", str(tmp_path / "runs"), "--experiment", "bad", *COMMON, "--batch-size", "3"]
    result = finetune(args, 2, str(tmp_path))
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-2000:]  # a usage error
    assert ("--batch-size 3 (sequences per optimizer step) does not split over 2 ranks x --grad-accum 1 "
            "micro-batches: it must be a multiple of 2. Valid --batch-size with --grad-accum 1: 2, 4, 6") in result.stderr
    for rank in (0, 1):  # every rank's error reaches the user, naming the rank
        assert f"error: rank {rank} of 2: --batch-size 3 (sequences" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "runs" / "bad").exists()


def test_the_dry_run_plans_each_ranks_share(tmp_path):
    args = ["--runs-dir", str(tmp_path / "runs"), *COMMON, "--batch-size", "8", "--grad-accum", "2", "--dry-run",
            "--world-size", "2"]
    result = succeeded(finetune(args, 0, str(tmp_path)))
    assert "data parallel: 2 ranks; each step every rank runs 2 micro-batch(es) of 2 sequence(s)" in result.stdout
    # Memory and time are one rank's: its micro-batches of 2, not one process's of 4.
    assert "8 sequences, on each rank 2 micro-batch(es) of 2" in result.stdout and "peak memory per rank" in result.stdout
    one = succeeded(finetune(args[:-2] + ["--world-size", "1"], 0, str(tmp_path)))
    tokens = [int(re.search(r"~([\d,]+) tokens", line).group(1).replace(",", ""))
              for run in (result, one) for line in run.stdout.splitlines() if line.startswith("  per step:")]
    assert tokens[0] * 2 == tokens[1]
    for rank in (0, 1):
        assert f"rank {rank}: owns " in result.stdout
    assert not (tmp_path / "runs").exists()
