"""Smoke tests of the benchmark scripts: each runs with ``--quick`` (tiny shapes) and prints its figures.

Each bench is a separate process, as a user runs it; most of its few seconds go to importing torch (the
memory bench starts three processes). The figures of a quick run are not checked against the targets.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def run_bench(script: str, *args: str, workdir) -> str:
    command = [sys.executable, os.path.join(BENCH, script), "--quick", "--workdir", str(workdir), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{output[-4000:]}"
    assert "RESULT: PASS" in output, output[-4000:]
    # Everything went into the scratch folder, which the bench removes.
    assert os.listdir(workdir) == [], os.listdir(workdir)
    return output


def test_memory_vs_depth_quick(tmp_path):
    output = run_bench("memory_vs_depth.py", workdir=tmp_path)
    # blocks, params, in-memory need, store, rss after import, peak RSS, peak VM, s/step, losses
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+M\s+[\d.]+ GiB\s+[\d.]+ GiB\s+[\d,.]+ MiB\s+([\d,.]+) MiB\s+[\d,.]+ MiB"
                      r"\s+[\d.]+\s+[\d.]+ [\d.]+$", output, re.M)
    assert [int(depth) for depth, _ in rows] == [1, 4], output
    assert all(float(peak.replace(",", "")) > 50 for _, peak in rows), output  # a torch process is > 50 MiB
    assert re.search(r"peak RSS 4 blocks / 1 blocks: \d+\.\d+ <= 1\.250", output), output
    assert "address-space cap (RLIMIT_AS)" in output and "one optimizer step under the cap" in output, output


def test_io_per_step_quick(tmp_path):
    output = run_bench("io_per_step.py", workdir=tmp_path)
    for mode in ("qat", "full"):
        assert f"-- {mode}" in output
    for row in ("forward read", "backward read", "written"):
        assert len(re.findall(rf"^\s+{row}\s+[\d.]+ MiB \(\s*[\d.]+ bits/param\)", output, re.M)) == 2, (row, output)
    # qat forward: about 2 bits per projection weight; full: about 16.
    bits = [float(b) for b in re.findall(r"= (\d+\.\d+) bits per projection weight", output)]
    assert len(bits) == 4 and all(1.9 < b < 2.1 for b in bits[:2]) and all(15.9 < b < 16.1 for b in bits[2:]), bits
    assert "qat train-step forward bytes" in output and "qat eval forward (loss) bytes" in output


def test_step_time_quick_with_profile(tmp_path):
    # Every profiled row is printed (--profile-min-ms 0): which rows pass the default 0.5 ms/step threshold
    # depends on the machine's speed and load, and what is checked here is that each activity was timed.
    output = run_bench("step_time.py", "--profile", "--profile-min-ms", "0", workdir=tmp_path)
    assert len(re.findall(r"streamed :\s+\d+\.\d+ s/step", output)) == 2, output
    assert len(re.findall(r"in-memory:\s+\d+\.\d+ s/step", output)) == 2, output
    assert len(re.findall(r"streamed / in-memory: \d+\.\d+", output)) == 2, output
    assert "full streamed/in-memory step time" in output
    # The profiler found the functions it wraps (it names any it could not).
    assert "not timed" not in output, output
    for activity in ("fsync", "AdamW update", "compute: block forward / replay", "read: safetensors decode"):
        assert re.search(rf"^\s+\d+\.\d+s\s+\d+\.\d+s\s+\d+\.\d%  {re.escape(activity)}.* \([1-9]\d* calls/step\)$",
                         output, re.M), (activity, output)
    assert "more under" not in output, output


def test_forward_bound_counts_projection_bits_and_stored_tensors():
    sys.path.insert(0, BENCH)
    try:
        from io_per_step import forward_bound
    finally:
        sys.path.remove(BENCH)
    from offload_bitnet.model.config import ModelConfig

    config = ModelConfig(arch="bitnet", vocab_size=100, dim=8, n_layers=2, n_heads=2, hidden_dim=16)
    proj = 4 * 8 * 8 + 3 * 8 * 16  # q k v o + gate up down
    norms = 4 * (8 + 8 + 8 + 16)   # fp32: input, post-attention, attn_sub, ffn_sub
    bound, n_proj, other = forward_bound(config, "fp16", ["embed", "block.000", "block.001"], 2.0)
    assert n_proj == 2 * proj
    assert other == 100 * 8 * 2 + 2 * norms
    assert bound == 2 * proj * 2 // 8 + other
    with_head, _, other_head = forward_bound(config, "fp16", ["embed", "block.000", "norm", "head"], 2.0)
    assert other_head == 2 * 100 * 8 * 2 + norms + 4 * 8
