"""Shared helpers for the benchmarks: model configs, scratch stores, medians and PASS/FAIL lines.

Every bench pins torch to one thread (timings and memory are then comparable between runs and machines),
keeps its stores in a scratch folder on disk that it deletes at the end, and exits non-zero when a target
is missed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile

import torch

from offload_bitnet.model.config import ModelConfig
from offload_bitnet.store.write import random_units, write_store
from offload_bitnet.store.blockstore import StoreSettings

# A bench run prints ``PASS``/``FAIL`` lines through ``check``; ``finish`` turns them into the exit status.
_FAILURES: list[str] = []
# In quick mode (tiny shapes) targets are printed but not enforced; errors (``fail``) still count.
_QUICK = [False]


def pin_threads():
    """One compute thread: the benches measure the engine, not the machine's core count."""
    torch.set_num_threads(1)


def bench_config(arch: str, dim: int, n_layers: int, n_heads: int, vocab_size: int,
                 hidden_dim: int | None = None, max_seq_len: int = 2048) -> ModelConfig:
    """An untied decoder of the given shape (MHA: as many KV heads as heads; hidden from Meta's rule)."""
    return ModelConfig(arch=arch, vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_heads, hidden_dim=hidden_dim, tie_embeddings=False, max_seq_len=max_seq_len,
                       bos_id=None, eos_id=None, pad_id=None)


def make_store(path: str, config: ModelConfig, mode: str, seed: int = 0, shadow_dtype: str = "fp16",
               state_dtype: str = "fp32") -> str:
    """Write a randomly initialized store at ``path`` (one unit in memory at a time) and close it."""
    settings = StoreSettings(mode=mode, shadow_dtype=shadow_dtype, state_dtype=state_dtype)
    write_store(path, config, random_units(config, seed), settings,
                extra={"created_from": f"bench, random init, seed {seed}"}).close()
    return path


def token_batch(config: ModelConfig, seq: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids ``[batch, seq]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=generator)


def median(values) -> float:
    return statistics.median(values)


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


@contextlib.contextmanager
def scratch_dir(parent: str | None, keep: bool = False):
    """A fresh folder for the bench's stores (under ``parent``, default the system temp dir), removed after."""
    if parent:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix="offload-bench-", dir=parent)
    try:
        yield path
    finally:
        if keep:
            print(f"kept scratch folder {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def filesystem_of(path: str) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts), so a reader can tell disk from tmpfs."""
    best, fstype = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                fields = line.split()
                mount = fields[1]
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, fstype = mount, fields[2]
    except OSError:
        pass
    return fstype


class StealMeter:
    """Share of the machine's CPU time the hypervisor gave to other guests (``steal`` in /proc/stat) while the
    meter ran. On a shared VM it comes and goes, and wall times measured under it are slow by about that share
    (more for multi-threaded work). None where /proc/stat is missing."""

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return fields[7], sum(fields)  # steal, total

    def fraction(self) -> float | None:
        now = self._read()
        if now is None or self._start is None or now[1] == self._start[1]:
            return None
        return (now[0] - self._start[0]) / (now[1] - self._start[1])


def check(label: str, value: float, limit: float, detail: str = "") -> bool:
    """Print ``PASS``/``FAIL`` for ``value <= limit`` and remember a failure for ``finish``.

    In quick mode the line says ``quick-pass``/``quick-miss`` and a miss does not fail the run: tiny shapes
    are dominated by fixed costs (fsync, interpreter), so the targets are not meant for them."""
    ok = value <= limit
    word = ("quick-pass" if ok else "quick-miss") if _QUICK[0] else ("PASS" if ok else "FAIL")
    print(f"{word} {label}: {value:.3f} <= {limit:.3f}{' ' + detail if detail else ''}")
    if not ok and not _QUICK[0]:
        _FAILURES.append(label)
    return ok


def fail(label: str, reason: str):
    """Record a failed target that is not a simple comparison."""
    print(f"FAIL {label}: {reason}")
    _FAILURES.append(label)


def finish() -> int:
    """Exit status of the bench: 0 when every target passed, 1 otherwise (naming the failures)."""
    if _FAILURES:
        print(f"RESULT: FAIL ({', '.join(_FAILURES)})")
        return 1
    print("RESULT: PASS (quick mode: targets not enforced)" if _QUICK[0] else "RESULT: PASS")
    return 0


def banner(title: str, quick: bool):
    """Print what ran where; enters quick mode (targets not enforced) when ``quick``."""
    _QUICK[0] = quick
    print(f"== {title} ==")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    if quick:
        print("QUICK MODE: tiny shapes for a smoke test; the figures say nothing about the targets, "
              "which are printed but not enforced.")
