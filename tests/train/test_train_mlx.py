"""finetune.py on ``--device mlx``: a run stopped by SIGTERM and resumed ends bit-identical to an uninterrupted
one (the torch version: test_train.test_sigterm_mid_run_then_resume_is_bit_identical_to_an_uninterrupted_run)."""
import signal
import subprocess

import pytest
import torch

pytest.importorskip("mlx.core")

from offload_bitnet.store.blockstore import BlockStore  # noqa: E402
from offload_bitnet.train.trainer import STATE_KEY  # noqa: E402
from test_train import ROOT, cli, metrics, run_env, store_tensors  # noqa: E402


def mlx_cli(tmp_path, experiment, steps):
    return cli(tmp_path, experiment, steps) + ["--device", "mlx"]


def test_sigterm_then_resume_on_mlx_is_bit_identical_to_an_uninterrupted_mlx_run(tmp_path):
    steps = 8
    straight = subprocess.Popen(mlx_cli(tmp_path, "straight", steps), env=run_env(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop_env = dict(run_env(), OFFLOAD_BITNET_FAULTS="commit.cleanup:4:sigterm")
    process = subprocess.Popen(mlx_cli(tmp_path, "stopped", steps), env=stop_env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM received: finishing the current step" in output
    straight_output, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_output
    stopped_at = BlockStore(str(tmp_path / "stopped" / "store")).step
    assert 3 <= stopped_at < steps

    resumed = subprocess.run(mlx_cli(tmp_path, "stopped", steps), env=run_env(), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at}/{steps}" in resumed.stdout

    step_a, tensors_a = store_tensors(str(tmp_path / "straight" / "store"))
    step_b, tensors_b = store_tensors(str(tmp_path / "stopped" / "store"))
    assert step_a == step_b == steps and tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        for name in tensors_a[key]:
            assert torch.equal(tensors_a[key][name], tensors_b[key][name]), (key, name)
    state_a = BlockStore(str(tmp_path / "straight" / "store")).extra[STATE_KEY]
    state_b = BlockStore(str(tmp_path / "stopped" / "store")).extra[STATE_KEY]
    assert {k: v for k, v in state_a.items() if k != "run_dir"} == {k: v for k, v in state_b.items() if k != "run_dir"}
    losses_a = [(r["step"], r["loss"]) for r in metrics(str(tmp_path / "straight")) if r["type"] == "train"]
    losses_b = [(r["step"], r["loss"]) for r in metrics(str(tmp_path / "stopped")) if r["type"] == "train"]
    assert losses_a == losses_b and [s for s, _ in losses_a] == list(range(1, steps + 1))
    assert losses_a[-1][1] < losses_a[0][1]
