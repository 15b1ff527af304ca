import json
import math
import sys

import pytest

from offload_bitnet.metrics import (MetricsLog, PlotUnavailable, perplexity, plot_losses, smooth, summarize,
                                    write_status)


def fill(log, steps=5, eval_every=2):
    for step in range(1, steps + 1):
        log.append({"type": "train", "step": step, "loss": 6.0 - step, "tokens": 100, "wall_s": 0.5})
        if step % eval_every == 0:
            log.append({"type": "eval", "step": step, "val_loss": 6.5 - step + (step == 4) * 2})


def test_append_read_and_summary(tmp_path):
    log = MetricsLog(str(tmp_path / "run" / "metrics.jsonl"))
    fill(log)
    records = log.read()
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5]
    summary = summarize(records)
    assert summary["first_loss"] == 5.0 and summary["last_loss"] == 1.0 and summary["steps"] == 5
    assert summary["tokens"] == 500 and summary["train_seconds"] == pytest.approx(2.5)
    assert summary["best_val_loss"] == 4.5 and summary["best_val_step"] == 2  # step 4 got worse
    assert summary["last_val_loss"] == 4.5


def test_truncate_after_drops_uncommitted_steps_and_torn_lines(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    fill(log)
    with open(log.path, "a") as handle:
        handle.write('{"type": "train", "step": 6, "lo')  # a crash in the middle of a write
    assert log.truncate_after(3) == 3  # steps 4, 5 and the eval at 4
    records = log.read()
    assert max(r["step"] for r in records) == 3
    assert open(log.path).read().endswith("\n")
    assert log.truncate_after(3) == 0


def test_truncate_after_rewrites_a_torn_tail_even_when_nothing_else_goes(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    fill(log, steps=2)
    with open(log.path, "a") as handle:
        handle.write('{"type": "tra')
    log.truncate_after(10)
    log.append({"type": "train", "step": 3, "loss": 1.0})
    assert [r["step"] for r in log.read() if r["type"] == "train"] == [1, 2, 3]


def test_empty_log(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    assert log.read() == [] and log.truncate_after(0) == 0
    assert summarize([])["first_loss"] is None
    log.clear()


def test_status_is_replaced_atomically(tmp_path):
    path = str(tmp_path / "status.json")
    write_status(path, {"step": 1})
    write_status(path, {"step": 2, "phase": "training"})
    assert json.load(open(path)) == {"step": 2, "phase": "training"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_smooth_and_perplexity():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull toward 0
    values = smooth([10.0, 0.0], weight=0.5)
    assert values[0] == pytest.approx(10.0) and values[1] == pytest.approx(10 / 3)
    assert perplexity(math.log(20)) == pytest.approx(20)
    assert perplexity(1e4) == float("inf")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    fill(log)
    png = plot_losses(log.path, str(tmp_path / "loss.png"), "test")
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_records(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="no loss records"):
        plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(PlotUnavailable, match="pip install matplotlib"):
        plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
