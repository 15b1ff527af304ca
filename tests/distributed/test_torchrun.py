"""Real torchrun: 2 ranks started by ``torchrun --standalone --max-restarts 1``; rank 1 is killed between the
ranks' manifest switches on the first attempt, torchrun restarts both, and they finish where an uninterrupted
run does (the rank program of bench/distributed_crash.py)."""
import os
import sys

from rank_runs import assert_same_state, commit_program, launch, rank_stores
from repo_paths import BENCH

sys.path.insert(0, BENCH)
import distributed_crash  # noqa: E402


def test_torchrun_restart_after_a_kill_between_the_switches(tmp_path):
    reference = rank_stores(tmp_path / "reference", n_layers=4)
    assert [r["exitcode"] for r in launch(commit_program, 2, str(tmp_path / "results"), store_dirs=reference,
                                          steps=3)] == [0, 0]
    paths = rank_stores(tmp_path / "run", n_layers=4)
    # commit.rename passes: 2 per step (switch, release); the 3rd is step 2's switch
    code, results, output = distributed_crash.torchrun(paths, 3, fault_rank=1, fault="commit.rename:3:kill",
                                                       max_restarts=1, first_attempt_only=True)
    assert code == 0, output[-4000:]
    # the restarted attempt resumed at step 1 (an attempt that was not killed would have started at 0)
    assert [(r["start"], r["step"]) for r in results] == [(1, 3), (1, 3)], results
    for path, expected in zip(paths, reference):
        assert_same_state(path, expected)
        assert not [name for name in os.listdir(os.path.join(path, "units")) if name.endswith(".tmp")]
