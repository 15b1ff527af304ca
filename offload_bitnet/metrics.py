"""Run records: ``metrics.jsonl`` (one JSON object per step and per evaluation), ``status.json`` (the latest
state, for watching a run from elsewhere) and ``loss.png`` (train and validation loss).

Records carry ``"type"``: ``train`` (one per optimizer step), ``eval`` (validation loss) or ``sample``
(generated text). A resumed run first drops records past the store's committed step, so the file always
describes the weights on disk.
"""
from __future__ import annotations

import json
import math
import os

from .store import write_file_atomic


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
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    return {
        "steps": train[-1]["step"] if train else 0,
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "tokens": sum(r.get("tokens", 0) for r in train),
        "train_seconds": sum(r.get("wall_s", 0.0) for r in train),
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_step": best["step"] if best else None,
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
    }


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run prints ``inf`` instead of overflowing."""
    return math.exp(loss) if loss < 700 else float("inf")


def write_status(path: str, status: dict):
    """Replace ``status.json`` atomically (a reader never sees half a file)."""
    write_file_atomic(path, (json.dumps(status, indent=1) + "\n").encode())


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for index, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** index))
    return out


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
        axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        axes.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="train loss (smoothed)")
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
