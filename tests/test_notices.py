"""What a process says besides results: rank 0 of a data-parallel run alone prints progress and warnings, and
every rank's errors (argparse's included) name the rank."""
from __future__ import annotations

import pytest

from offload_bitnet import notices
from offload_bitnet.argparsing import ArgumentParser


@pytest.fixture
def restore_rank():
    yield
    notices.set_quiet(False)
    notices._rank_label = ""


def test_one_process_says_and_warns_without_a_rank(capsys, restore_rank):
    notices.say("step 1")
    notices.warn("warning: something")
    out, err = capsys.readouterr()
    assert out == "step 1\n" and err == "warning: something\n"
    assert notices.rank_label() == ""


@pytest.mark.parametrize("rank, speaks", [(0, True), (1, False)])
def test_only_rank_zero_says_and_warns(capsys, restore_rank, rank, speaks):
    notices.set_rank(rank, 2)
    notices.say("step 1")
    notices.warn("warning: something")
    out, err = capsys.readouterr()
    assert (out, err) == (("step 1\n", "warning: something\n") if speaks else ("", ""))
    assert notices.rank_label() == f"rank {rank} of 2: "


def test_a_usage_error_on_a_quiet_rank_still_reaches_stderr_naming_it(capsys, restore_rank):
    notices.set_rank(1, 2)
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--learning-rate", type=float)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lerning-rate", "1"])
    assert capsys.readouterr().err.startswith("error: rank 1 of 2: unknown option --lerning-rate")


def test_a_world_of_one_names_no_rank(restore_rank):
    notices.set_rank(0, 1)
    assert notices.rank_label() == ""
