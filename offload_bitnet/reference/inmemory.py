"""The whole model in memory as one ``nn.Module``: the reference the streaming engine is checked against.

It uses the same block math and the same dropout RNG keys, but plain autograd over fp32 master weights
(straight-through fake quantization in ``qat``) and ``torch.optim.AdamW``. Only for models that fit in RAM.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from offload_bitnet.model.config import ModelConfig
from offload_bitnet.model.loss import IGNORE_INDEX, shift_labels
from offload_bitnet.store.layout import Layout
from offload_bitnet.model.block import block_forward, dropout_generator, rms_norm, rope_tables
from offload_bitnet.model.adamw import AdamWConfig, torch_param_groups
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.units import block_unit
from offload_bitnet.model.ternary import ste_quantize_weight


class InMemoryModel(nn.Module):
    """All units of a store as fp32 parameters."""

    def __init__(self, config: ModelConfig, units: dict[str, dict[str, torch.Tensor]], mode: str):
        super().__init__()
        self.config = config
        self.mode = mode
        self.units = nn.ModuleDict({
            unit.replace(".", "_"): nn.ParameterDict({n: nn.Parameter(t.detach().float().clone()) for n, t in ts.items()})
            for unit, ts in units.items()
        })

    @classmethod
    def from_store(cls, store: BlockStore) -> "InMemoryModel":
        layout = Layout(store.settings)
        units = {}
        for unit in store.units:
            weights = store.read(unit, "weights")
            shadow = store.read(unit, "shadow") if store.has_part(unit, "shadow") else None
            units[unit] = layout.masters(unit, weights, shadow, "cpu")
        return cls(store.config, units, store.settings.mode)

    def unit(self, name: str) -> nn.ParameterDict:
        return self.units[name.replace(".", "_")]

    def named_unit_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {key.replace("_", ".", 1) if key.startswith("block_") else key: dict(params.items())
                for key, params in self.units.items()}

    def head_weight(self) -> torch.Tensor:
        return self.unit("embed" if self.config.tie_embeddings else "head")["weight"]

    def forward(self, input_ids: torch.Tensor, *, dropout: float = 0.0, seed: int = 0, step: int = 0,
                micro: int = 0) -> torch.Tensor:
        """Final-norm hidden states; dropout masks keyed like the engine's (seed, step, micro, layer)."""
        cfg = self.config
        cos, sin = rope_tables(cfg, torch.arange(input_ids.shape[1]))
        x = F.embedding(input_ids, self.unit("embed")["weight"])
        for layer in range(cfg.n_layers):
            params = dict(self.unit(block_unit(layer)).items())
            if self.mode == "qat":
                params = {n: ste_quantize_weight(p) if n.endswith("_proj") else p for n, p in params.items()}
            generator = dropout_generator(seed, step, micro, layer, input_ids.device) if dropout > 0 else None
            x = block_forward(params, x, cfg, cos, sin, quantize=self.mode == "qat", dropout_p=dropout,
                              generator=generator)
        return rms_norm(x, self.unit("norm")["weight"], cfg.norm_eps)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self(input_ids), self.head_weight())

    def step_loss(self, micro_batches, *, dropout: float = 0.0, seed: int = 0, step: int = 1) -> torch.Tensor:
        """The loss one engine step minimizes: token-mean cross-entropy over all micro-batches."""
        targets = [shift_labels(ids, labels) for ids, labels in micro_batches]
        n_tokens = sum(int((t != IGNORE_INDEX).sum()) for t in targets)
        total = 0.0
        for micro, ((ids, _), target) in enumerate(zip(micro_batches, targets)):
            logits = F.linear(self(ids, dropout=dropout, seed=seed, step=step, micro=micro), self.head_weight())
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
        return total / n_tokens

    def optimizer(self, config: AdamWConfig) -> torch.optim.AdamW:
        """``torch.optim.AdamW`` with the engine's decay rule (matrices decay, norms do not)."""
        named = dict(self.named_parameters())
        return torch.optim.AdamW(torch_param_groups(named, config), lr=config.lr, betas=(config.beta1, config.beta2),
                                 eps=config.eps, fused=True)
