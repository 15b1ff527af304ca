"""``finetune.py`` survives kill -9 at any moment: the short version of ``bench/crash_test.py``.

The bench runs a small fine-tune uninterrupted, then the same one killed 5 times (fault points in block
write-back, manifest commit and prefetch, and wall-clock SIGKILLs), stopped by SIGTERM and SIGINT and broken
by an exception inside a block update, resuming each time; the final store must be bit-identical, and the
files the crashes left must be gone. The helpers it compares with are tested here too, so a "yes" means
something.
"""
from __future__ import annotations

import os
import re
import sys

import torch

from offload_bitnet.store.write import create_model
from repo_paths import BENCH

sys.path.insert(0, BENCH)
import crash_test  # noqa: E402


def test_five_kills_then_resume_is_bit_identical(tmp_path, capsys):
    status = crash_test.main(["--kills", "5", "--seed", "1", "--workdir", str(tmp_path)])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "N (kills) = 5, K (steps) = 20" in output
    assert re.search(r"^kills landed: 5/5 \(3 at fault points: commit\.rename, prefetch, write\.data; 2 by wall "
                     r"clock\)$", output, re.M), output
    assert "sigterm exit 143" in output and "sigint exit 130" in output and "raise exit 1" in output, output
    assert re.search(r"; 0 after the final run$", output, re.M), output
    assert "metrics.jsonl: 20/20 step records" in output, output
    assert output.rstrip().endswith("RESULT: PASS") and "\nbit-identical: yes\n" in output, output
    assert os.listdir(tmp_path) == []  # the scratch folder is removed


def test_snapshot_comparison_sees_one_flipped_bit(tmp_path):
    path = create_model(str(tmp_path / "store"), size="demo", n_layers=1)
    reference = crash_test.snapshot(path, str(tmp_path))
    assert crash_test.differences(reference, crash_test.snapshot(path, str(tmp_path))) == []
    changed = crash_test.snapshot(path, str(tmp_path))
    dtype, shape, raw = changed["tensors"][("block.000", "shadow", "q_proj")]
    raw = raw.clone()
    raw[5] ^= 1
    changed["tensors"][("block.000", "shadow", "q_proj")] = (dtype, shape, raw)
    changed["extra"] = dict(changed["extra"], train_state={"step": 3})
    problems = crash_test.differences(reference, changed)
    assert "tensor block.000/shadow/q_proj differs" in problems
    assert any("manifest extra differs" in p for p in problems), problems


def test_leftovers_are_files_the_manifest_does_not_name(tmp_path):
    path = create_model(str(tmp_path / "store"), size="demo", n_layers=1)
    assert crash_test.leftovers(path) == []
    open(os.path.join(path, "units", "block.000.weights.s00000001.safetensors"), "wb").write(b"x")
    open(os.path.join(path, "manifest.json.commit.tmp"), "wb").write(b"{")
    os.makedirs(os.path.join(path, "scratch"))
    torch.save(torch.zeros(1), os.path.join(path, "scratch", "stash.pt"))
    assert crash_test.leftovers(path) == ["manifest.json.commit.tmp", "scratch/stash.pt",
                                          "units/block.000.weights.s00000001.safetensors"]
