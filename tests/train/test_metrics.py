import json
import math
import os
import sys

import pytest

from offload_bitnet.train.metrics import (MetricsLog, PlotUnavailable, perplexity, plot_losses, plot_run,
                                          print_status, smooth, status_lines, summarize, write_status)
from repo_paths import REPO


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
    assert summary["last_val_loss"] == 4.5 and summary["last_val_step"] == 4
    assert summary["first_val_loss"] == 4.5 and summary["first_val_step"] == 2 and summary["skipped"] == 0


def test_summary_counts_skipped_steps(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    fill(log, steps=2)
    log.append({"type": "skip", "step": 3, "reason": "non-finite loss (nan)", "loss": None})
    summary = summarize(log.read())
    assert summary["skipped"] == 1 and summary["steps"] == 3 and summary["last_loss"] == 4.0


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


def make_run(tmp_path, phase="training", holder=None):
    run_dir = tmp_path / "exp"
    log = MetricsLog(str(run_dir / "metrics.jsonl"))
    fill(log)
    store = tmp_path / "store"
    store.mkdir()
    if holder:
        (store / "lock").write_text(holder)
    write_status(str(run_dir / "status.json"), {"phase": phase, "step": 5, "total_steps": 20, "store": str(store),
                                                 "store_step": 5, "lr": 1e-4, "eta_s": 90.0, "updated": "now"})
    return str(run_dir)


def test_status_of_a_running_and_of_a_stopped_run(tmp_path, capsys):
    me = f"pid {os.getpid()} on {os.uname().nodename}"
    lines = status_lines(make_run(tmp_path, holder=me))
    assert lines[0].endswith("exp: training, step 5/20 (25%), updated now")
    assert "train loss 1.0000 (first 5.0000), lr 1.00e-04" in lines[1]
    assert "validation loss 4.5000" in lines[2] and "best 4.5000 at step 2" in lines[2]
    assert f"  running: {me}, ETA 1m30s" in lines
    assert print_status(make_run(tmp_path / "b", holder=me)) == 0 and "running: pid" in capsys.readouterr().out

    # A lock file left by a process that is gone (pid 2**22 + 1 is above the largest pid_max Linux allows): not running.
    dead = status_lines(make_run(tmp_path / "c", holder=f"pid {2**22 + 1} on {os.uname().nodename}"))
    assert "  not running (it stopped before finishing: re-run its command to resume)" in dead


def test_status_and_plot_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="has no status.json: not a run folder"):
        status_lines(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="has no metrics.jsonl"):
        plot_run(str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()


def test_plot_run_draws_the_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = make_run(tmp_path)
    assert plot_run(run_dir) == 0
    assert "loss plot:" in capsys.readouterr().out
    with open(os.path.join(run_dir, "loss.png"), "rb") as handle:
        assert handle.read(4) == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- smoothing
def test_smoothing_is_unbiased_from_the_first_point():
    from offload_bitnet.train.metrics import SmoothedLoss

    average = SmoothedLoss(0.9)
    assert [average.add(3.0) for _ in range(5)] == pytest.approx([3.0] * 5)  # an uncorrected EMA starts at 0.3
    assert smooth([4.0, 2.0], weight=0.9)[1] == pytest.approx((0.09 * 4 + 0.1 * 2) / 0.19)


def test_a_short_run_is_not_drawn_above_every_raw_point():
    falling = [3.0, 2.8, 2.5, 2.3, 2.2, 2.0, 1.9]  # a quick-start run: 7 falling losses
    assert smooth(falling) == pytest.approx(falling)  # too short to smooth: no lag at all
    run = [5.0 - 0.1 * step for step in range(30)]  # 30 steps of a straight fall
    smoothed = smooth(run)
    lag = max(s - r for s, r in zip(smoothed, run))
    assert lag < 0.25  # a window of 3 steps: under 3 steps' fall (0.3); a fixed 0.9 weight lags ~0.9
    assert max(s - r for s, r in zip(smooth(run, weight=0.9), run)) > 0.6


def test_a_long_run_is_smoothed():
    noise = [2.0 + (0.5 if step % 2 else -0.5) for step in range(400)]
    smoothed = smooth(noise)[100:]
    assert max(smoothed) - min(smoothed) < 0.05  # the +-0.5 zigzag is averaged out (window 40)


# ---------------------------------------------------------------------------------------------- divergence
def test_divergence_rule_margin_smoothing_and_recovery():
    from offload_bitnet.train.metrics import DivergenceWatch, divergence_limit

    assert divergence_limit(2.0) == pytest.approx(3.0) and divergence_limit(5.6) == pytest.approx(7.0)
    watch = DivergenceWatch()
    watch.add({"type": "eval", "step": 0, "val_loss": 2.0})
    for step, loss in enumerate([2.0, 1.9, 4.5, 1.8, 1.7], 1):  # one hard batch is no alarm
        watch.add({"type": "train", "step": step, "loss": loss})
    assert watch.findings() == []
    for step in range(6, 12):
        watch.add({"type": "train", "step": step, "loss": 40.0})
    (train,) = watch.findings()
    assert train["metric"] == "train" and train["step"] == 11 and train["start"] == 2.0
    assert train["value"] > 3.0 and "far above its start 2" in train["message"]
    watch.add({"type": "eval", "step": 11, "val_loss": 3.5})
    assert [f["metric"] for f in watch.findings()] == ["train", "eval"]
    for step in range(12, 60):  # it comes back
        watch.add({"type": "train", "step": step, "loss": 1.5})
    watch.add({"type": "eval", "step": 60, "val_loss": 1.6})
    assert watch.findings() == []


def test_divergence_ignores_a_quantization_warmup():
    from offload_bitnet.train.metrics import DivergenceWatch

    records = [{"type": "eval", "step": 0, "val_loss": 3.0, "quant_mix": 0.0},
               {"type": "eval", "step": 0, "val_loss": 18.8, "quant_mix": 1.0}]
    records += [{"type": "train", "step": s, "loss": 2.7 + s, "quant_mix": s / 10} for s in range(1, 10)]
    records += [{"type": "train", "step": s, "loss": 12.8 - 0.1 * s, "quant_mix": 1.0} for s in range(10, 30)]
    records += [{"type": "eval", "step": 30, "val_loss": 10.4, "quant_mix": 1.0}]
    assert DivergenceWatch.of(records).findings() == []  # judged from the ternary start (12.8 and 18.8)
    assert summarize(records)["diverged"] == []


def test_status_says_a_run_diverged(tmp_path):
    run_dir = tmp_path / "div"
    log = MetricsLog(str(run_dir / "metrics.jsonl"))
    for step, loss in enumerate([5.5, 30.0, 700.0, 743.0], 1):
        log.append({"type": "train", "step": step, "loss": loss})
    write_status(str(run_dir / "status.json"), {"phase": "finished", "step": 4, "total_steps": 4})
    lines = status_lines(str(run_dir))
    assert lines[0].startswith(f"{run_dir}: finished, LOSS DIVERGED, step 4/4")
    assert any(line.startswith("  WARNING: diverging: the training loss (smoothed) is") for line in lines)
    assert summarize(log.read())["diverged"][0]["metric"] == "train"


def test_the_default_install_draws_the_plot():
    import ast

    setup = open(os.path.join(REPO, "setup.py")).read()
    call = next(node for node in ast.walk(ast.parse(setup)) if isinstance(node, ast.Call)
                and getattr(node.func, "id", "") == "setup")
    requires = next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "install_requires")
    assert "matplotlib" in requires
