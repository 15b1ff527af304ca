"""Run records: ``metrics.jsonl`` (one JSON object per step and per evaluation), ``status.json`` (the latest
state, for watching a run from elsewhere) and ``loss.png`` (train and validation loss).

Records carry ``"type"``: ``train`` (one per optimizer step), ``eval`` (validation loss), ``skip`` (a step
skipped for a non-finite loss or gradient), ``sample`` (generated text) or ``diverging`` (a loss went far above
its start: ``DivergenceWatch``; ``recovered`` when it came back below the limit). A resumed run first drops records
past the store's committed step, so the file always describes the weights on disk.

``offload-bitnet status RUN_DIR`` (``print_status``) and ``offload-bitnet plot RUN_DIR`` (``plot_run``) read
these files from another terminal while a run goes on.
"""
from __future__ import annotations

import json
import math
import os

from offload_bitnet.progress import format_seconds
from offload_bitnet.io.files import write_file_atomic
from offload_bitnet.io.locks import lock_holder


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed, so no PNG can be drawn."""


class MetricsLog:
    """Append-only JSON-lines log of a run."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def read(self) -> list[dict]:
        """Every record; a torn last line (from a crash mid-write) is ignored."""
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def truncate_after(self, step: int) -> int:
        """Drop records of steps after ``step`` (written before a crash, never committed). Returns how many."""
        records = self.read()
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records) or (os.path.exists(self.path) and not _ends_cleanly(self.path)):
            write_file_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return len(records) - len(kept)

    def clear(self):
        if os.path.exists(self.path):
            os.remove(self.path)

    def append(self, record: dict):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class DiscardedMetrics(MetricsLog):
    """The metrics of a data-parallel rank other than 0: rank 0 alone writes metrics.jsonl."""

    def __init__(self):
        self.path = os.devnull

    def read(self) -> list[dict]:
        return []

    def truncate_after(self, step: int) -> int:
        return 0

    def clear(self):
        pass

    def append(self, record: dict):
        pass


def _ends_cleanly(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def summarize(records: list[dict]) -> dict:
    """First and last train loss, steps, tokens and the best validation loss found in ``records``."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    skips = [r for r in records if r.get("type") == "skip"]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    return {
        "steps": max([r["step"] for r in train + skips], default=0),
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "tokens": sum(r.get("tokens", 0) for r in train),
        "train_seconds": sum(r.get("wall_s", 0.0) for r in train),
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_step": best["step"] if best else None,
        "first_val_loss": evals[0]["val_loss"] if evals else None,
        "first_val_step": evals[0]["step"] if evals else None,
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
        "last_val_step": evals[-1]["step"] if evals else None,
        "skipped": len(skips),
        "diverged": DivergenceWatch.of(records).findings(),
    }


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run prints ``inf`` instead of overflowing."""
    return math.exp(loss) if loss < 700 else float("inf")


def write_status(path: str, status: dict):
    """Replace ``status.json`` atomically (a reader never sees half a file)."""
    write_file_atomic(path, (json.dumps(status, indent=1) + "\n").encode())


class SmoothedLoss:
    """Exponential moving average with Adam's bias correction: the average of the values seen so far, weighted
    ``weight`` per step back, so it starts at the first value instead of being pulled toward 0."""

    def __init__(self, weight: float):
        self.weight = weight
        self.average = 0.0
        self.count = 0

    def add(self, value: float) -> float:
        """Take in the next value; returns the smoothed value at it."""
        self.count += 1
        self.average = self.weight * self.average + (1 - self.weight) * value
        return self.average / (1 - self.weight ** self.count)


def smoothing_weight(count: int) -> float:
    """The plot's smoothing for a curve of ``count`` points: a window of a tenth of the run, 1 to 50 steps.

    A moving average trails a falling loss by about its window, so a fixed window of 10 steps would draw the
    smoothed line above every raw point of a 20-step run; a window of a tenth keeps the lag at a tenth of the
    run (a run of under 20 steps is not smoothed at all)."""
    window = min(max(count / 10, 1.0), 50.0)
    return 1.0 - 1.0 / window


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average of ``values`` (``weight``: default from their count)."""
    average = SmoothedLoss(smoothing_weight(len(values)) if weight is None else weight)
    return [average.add(value) for value in values]


# A run diverges when its loss ends far above where it started. The training loss is judged smoothed (over
# about 10 steps, so that one hard batch is no alarm); validation losses as they are. "Far above" is more than
# DIVERGENCE_MARGIN nats and more than DIVERGENCE_SHARE of the start: a fine-tune starting at 2.0 nats is flagged
# above 3.0, a demo model from random init (5.6 nats) above 7.0. During a quantization warmup (quant mix below
# 1) the loss rises by design: such records are not judged, and the start is the first one at the full mix.
DIVERGENCE_WEIGHT = 0.9
DIVERGENCE_MARGIN = 1.0
DIVERGENCE_SHARE = 0.25


def divergence_limit(start: float) -> float:
    """The loss above which a run that started at ``start`` counts as diverging."""
    return start + max(DIVERGENCE_MARGIN, DIVERGENCE_SHARE * abs(start))


class DivergenceWatch:
    """Follows a run's train and eval records and tells whether its loss is now far above its start."""

    def __init__(self):
        self.smoothed = SmoothedLoss(DIVERGENCE_WEIGHT)
        self.start: dict[str, float] = {}
        self.now: dict[str, tuple[int, float]] = {}

    @classmethod
    def of(cls, records: list[dict]) -> "DivergenceWatch":
        watch = cls()
        for record in records:
            watch.add(record)
        return watch

    def add(self, record: dict):
        """Take in a ``train`` or ``eval`` record (others are ignored)."""
        kind = record.get("type")
        if kind not in ("train", "eval") or record.get("quant_mix", 1.0) < 1.0:
            return
        value = record["loss"] if kind == "train" else record["val_loss"]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        if kind == "train":
            value = self.smoothed.add(value)
        self.start.setdefault(kind, value)
        self.now[kind] = (record.get("step", 0), value)

    def findings(self) -> list[dict]:
        """One entry per loss that is now above its limit: what, at which step, its value, start and limit."""
        found = []
        for kind, label in (("train", "training loss (smoothed)"), ("eval", "validation loss")):
            if kind in self.now:
                step, value = self.now[kind]
                limit = divergence_limit(self.start[kind])
                if value > limit:
                    found.append({"metric": kind, "step": step, "value": value, "start": self.start[kind],
                                  "limit": limit, "message": f"the {label} is {value:.4g} at step {step}, far above "
                                  f"its start {self.start[kind]:.4g} (limit {limit:.4g})"})
        return found


def plot_losses(metrics_path: str, png_path: str, title: str = "") -> str:
    """Draw train loss (raw and smoothed) and validation loss against the step into ``png_path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed, so no loss plot was drawn "
                              "(pip install matplotlib; the numbers are in metrics.jsonl)") from None
    records = MetricsLog(metrics_path).read()
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        raise ValueError(f"{metrics_path} has no loss records to plot yet")
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        axes.plot(steps, losses, color="tab:blue", alpha=0.6, linewidth=1.2, marker="." if len(steps) <= 50 else None,
                  label="train loss")
        if smoothing_weight(len(losses)) > 0:  # a run too short to smooth shows its raw losses only
            axes.plot(steps, smooth(losses), color="navy", linewidth=2, label="train loss (smoothed)")
    if evals:
        axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                  linewidth=2, label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = png_path + ".tmp.png"
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, png_path)
    return png_path


# ---------------------------------------------------------------------------------------------- the CLI side
def status_lines(run_dir: str) -> list[str]:
    """A run's state for ``offload-bitnet status``: phase, step, loss, ETA, validation and who runs it."""
    status_path = os.path.join(run_dir, "status.json")
    try:
        with open(status_path) as handle:
            status = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{run_dir} has no status.json: not a run folder of finetune.py (runs live in "
                         "RUNS_DIR/EXPERIMENT, runs/demo by default), or its run has not started a step yet") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {status_path}: {error}") from None
    records = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    summary = summarize(records)
    step, total = status.get("step", 0), status.get("total_steps") or 0
    share = f" ({100 * step / total:.0f}%)" if total else ""
    diverged = ", LOSS DIVERGED" if summary["diverged"] else ""
    lines = [f"{run_dir}: {status.get('phase', '?')}{diverged}, step {step}/{total}{share}, "
             f"updated {status.get('updated', '?')}"]
    if summary["last_loss"] is not None:
        lr = status.get("lr")
        lines.append(f"  train loss {summary['last_loss']:.4f} (first {summary['first_loss']:.4f})"
                     + (f", lr {lr:.2e}" if isinstance(lr, (int, float)) else ""))
    if summary["last_val_loss"] is not None:
        lines.append(f"  validation loss {summary['last_val_loss']:.4f} (perplexity "
                     f"{perplexity(summary['last_val_loss']):.2f}) at step {summary['last_val_step']}; best "
                     f"{summary['best_val_loss']:.4f} at step {summary['best_val_step']}")
    if summary["skipped"]:
        lines.append(f"  {summary['skipped']} step(s) skipped for a non-finite loss or gradient")
    for finding in summary["diverged"]:
        lines.append(f"  WARNING: diverging: {finding['message']}; the learning rate is likely too high")
    store = status.get("store")
    holders = [lock_holder(path) for path in (os.path.join(run_dir, "run.lock"),
                                              os.path.join(store, "lock") if store else "")]
    holder = next((h for h in holders if h), None)
    if holder:
        eta = status.get("eta_s")
        lines.append(f"  running: {holder}" + (f", ETA {format_seconds(eta)}" if isinstance(eta, (int, float))
                                                and status.get("phase") == "training" else ""))
    else:
        lines.append("  not running" + (" (it stopped before finishing: re-run its command to resume)"
                                        if status.get("phase") == "training" else ""))
        if status.get("resume_command") and status.get("phase") != "finished":
            lines.append(f"  resume with: {status['resume_command']}")
    where = f"  store {store} (step {status.get('store_step')})" if store else ""
    if status.get("adapter_dir"):
        where += f"; adapters {status['adapter_dir']} (step {status.get('adapter_step')})"
    if where:
        lines.append(where)
    return lines


def print_status(run_dir: str) -> int:
    """``offload-bitnet status RUN_DIR``."""
    for line in status_lines(run_dir):
        print(line)
    return 0


def plot_run(run_dir: str) -> int:
    """``offload-bitnet plot RUN_DIR``: (re)draw RUN_DIR/loss.png from its metrics."""
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        raise ValueError(f"{run_dir} has no metrics.jsonl: not a run folder of finetune.py, or its run has not "
                         "finished a step yet")
    path = plot_losses(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"),
                       os.path.basename(os.path.normpath(run_dir)))
    print(f"loss plot: {path}")
    return 0
