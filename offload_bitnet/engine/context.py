"""The step context: everything one training step's passes share, and every per-step value (the step's number,
learning rate, optimizer settings and quantization mix, the bytes its updates submit), so that none of them is
an attribute of the engine that a caller could set or a later step could inherit."""
from __future__ import annotations

import dataclasses

import torch

from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.model.block import rope_tables
from offload_bitnet.model.loss import IGNORE_INDEX, shift_labels


def check_quant_mix(quant_mix: float) -> float:
    """``quant_mix`` as a float in [0, 1]; ValueError otherwise."""
    if not 0 <= quant_mix <= 1:
        raise ValueError(f"quant_mix must be in [0, 1], got {quant_mix}")
    return float(quant_mix)


class StepContext:
    """What one training step's passes share.

    ``quant_mix``: the mix of full-precision and ternary weights the step sees (qat; 1: plain ternary);
    ``quantize``: the activation quantization it implies; ``optim``: the AdamW settings of this step (with a
    scheduled weight decay); ``submitted_bytes``: the size of the parts its updates made so far."""

    @property
    def submitted_bytes(self) -> int:
        return sum(self._submitted)

    def add_submitted(self, nbytes: int):
        """Count the parts of one update. Updates run on the writer thread and on main (a stolen update) at the
        same time: a list's append is atomic where ``+=`` on an attribute could lose one of two counts."""
        self._submitted.append(nbytes)

    def __init__(self, engine, micro_batches, step: int, lr: float | None, optim: AdamWConfig,
                 quant_mix: float = 1.0, weight_decay: float | None = None):
        self.step, self.lr = step, lr
        self.optim = optim if weight_decay is None else dataclasses.replace(optim, weight_decay=weight_decay)
        self.quant_mix = check_quant_mix(quant_mix)
        self._submitted: list[int] = []
        self.ids = [batch[0].to(engine.device) for batch in micro_batches]
        self.targets = [shift_labels(batch[0], batch[1]).to(engine.device) for batch in micro_batches]
        self.n_tokens = sum(int((t != IGNORE_INDEX).sum()) for t in self.targets)
        if self.n_tokens == 0:
            raise ValueError("no token in this batch has a target")
        self.quantize = engine.quantize * self.quant_mix
        # Several micro-batches: lazy projections are made once per pass and kept (see StreamingEngine.lazy).
        self.keep = len(self.ids) > 1
        self.tables = {}  # rope tables per sequence length: micro-batches may differ in length
        for ids in self.ids:
            if ids.shape[1] not in self.tables:
                positions = torch.arange(ids.shape[1], device=engine.device)
                self.tables[ids.shape[1]] = rope_tables(engine.config, positions, engine.dtype)
        self.micro_range = range(len(self.ids))
        # The step's index of this process's first micro-batch (dropout masks are drawn per global micro-batch
        # index): 0 alone; a data-parallel rank sets it, so its masks are the ones one process draws for them.
        self.micro_offset = 0
        self.rng_states: dict = {}
        self.loss = 0.0
