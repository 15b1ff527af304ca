"""Training data: the dataset (examples from ``records``, fitted to the context, a validation split) and its
deterministic batches. Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from offload_bitnet.model.loss import IGNORE_INDEX
from offload_bitnet.train.records import DataError, DataOptions, DataStats, Example, fit_length, load_file, pack


@dataclass
class Dataset:
    """Training and validation sequences plus what loading them found."""

    train: list[Example]
    val: list[Example]
    stats: DataStats
    options: DataOptions

    def steps_for_epochs(self, epochs: float, batch_size: int) -> int:
        return max(1, math.ceil(epochs * len(self.train) / batch_size))

    def token_count(self, which: str = "train") -> tuple[int, int]:
        """(tokens, trained tokens) of the train or val split."""
        examples = self.train if which == "train" else self.val
        tokens = sum(len(e) for e in examples)
        targets = sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples)
        return tokens, targets

    def max_token_id(self) -> int:
        return max((max(e.ids) for e in self.train + self.val if e.ids), default=-1)

    def summary(self) -> str:
        tokens, targets = self.token_count("train")
        kinds = ", ".join(f"{count} {kind}" + ("" if kind.endswith("file") else " record") + ("s" if count > 1 else "")
                          for kind, count in sorted(self.stats.kinds.items()))
        return (f"data: {kinds} -> {len(self.train)} training sequence(s) "
                f"({tokens:,} tokens, {targets:,} trained), {len(self.val)} validation sequence(s)")


def load_examples(paths: list[str], tokenizer, options: DataOptions, stats: DataStats) -> list[Example]:
    examples = []
    for path in paths:
        stats.files.append(path)
        examples += load_file(path, tokenizer, options, stats)
    return fit_length(examples, options.max_seq_len, stats, keep_long_text=options.packing)


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (at least 1 when fraction > 0), chosen by a seeded shuffle; both
    parts keep the file order."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    count = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(mix_seed(seed, "validation")))
    held = set(order[:count].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


def load_dataset(train_paths: list[str], val_paths: list[str], tokenizer, options: DataOptions,
                 val_fraction: float, seed: int) -> Dataset:
    """Read, tokenize, split and (optionally) pack the training and validation data."""
    stats = DataStats()
    examples = load_examples(train_paths, tokenizer, options, stats)
    if not examples:
        raise DataError(f"no training examples left in {', '.join(train_paths)}: "
                        + ("; ".join(stats.notes(options.max_seq_len)) or "the data is empty"))
    if val_paths:
        train, val = examples, load_examples(val_paths, tokenizer, options, stats)
    else:
        train, val = split_validation(examples, val_fraction, seed)
    if options.packing:
        train, val = pack(train, options.max_seq_len), pack(val, options.max_seq_len)
    return Dataset(train, val, stats, options)


# ---------------------------------------------------------------------- batches
def mix_seed(seed: int, *keys) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (independent streams per purpose and epoch)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *keys))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchOrder:
    """Which examples form the batch of each step: an endless sequence of seeded per-epoch shuffles.

    Example ``k`` of the stream (``k = step * batch_size + j``) is ``perm(k // n)[k % n]``, so the position
    in the data is the step number alone and a resumed run continues exactly where it stopped.
    """

    def __init__(self, count: int, batch_size: int, seed: int):
        if count < 1:
            raise DataError("no training sequences to draw batches from")
        self.count = count
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            generator = torch.Generator().manual_seed(mix_seed(self.seed, "epoch", epoch))
            self._perms[epoch] = torch.randperm(self.count, generator=generator).tolist()
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        """Example indices of 0-based ``step``."""
        start = step * self.batch_size
        return [self.permutation(k // self.count)[k % self.count] for k in range(start, start + self.batch_size)]

    def epoch_at(self, steps_done: int) -> float:
        """Epochs completed after ``steps_done`` steps."""
        return steps_done * self.batch_size / self.count


def pad_value(tokenizer) -> int:
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return 0


def collate(examples: list[Example], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, labels)`` [B, length]; padding has label -100."""
    length = length or max(len(e) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example)] = torch.tensor(example.ids, dtype=torch.long)
        labels[row, :len(example)] = torch.tensor(example.labels, dtype=torch.long)
    return ids, labels


def micro_batches(examples: list[Example], grad_accum: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a step's batch into ``grad_accum`` equal micro-batches, all padded to one length (the engine
    shares rotary tables across the micro-batches of a step)."""
    length = max(len(e) for e in examples)
    size = len(examples) // grad_accum
    return [collate(examples[i * size:(i + 1) * size], pad_id, length) for i in range(grad_accum)]


def eval_batches(examples: list[Example], batch_size: int, pad_id: int, max_batches: int = 0):
    """Validation batches in order (``max_batches`` 0: all)."""
    count = 0
    for start in range(0, len(examples), batch_size):
        if max_batches and count >= max_batches:
            return
        yield collate(examples[start:start + batch_size], pad_id)
        count += 1
