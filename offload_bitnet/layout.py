"""How a unit's parameters are represented in the store's parts, for each training mode.

=============  ==========================================  ====================  ==================
tensor         ``weights`` part (read by forward)          ``shadow`` part        ``optim`` part
=============  ==========================================  ====================  ==================
projection     qat: ``name.packed`` uint8 [out/4, in] +     qat: ``name`` 16-bit   ``name.exp_avg``,
               ``name.scale`` fp32 [1];                                           ``name.exp_avg_sq``
               full: ``name`` 16-bit
embed / head   ``weight`` 16-bit (shadow dtype)             -                     same
norms          fp32                                         -                     same
=============  ==========================================  ====================  ==================

The ``optim`` part is absent until a unit's first update (moments start at zero), so a fresh store costs
no optimizer bytes. Ternary codes are always derived from the stored 16-bit shadow, so the forward pass
(packed) and the backward pass (shadow) see bit-identical quantized weights.
"""
from __future__ import annotations

import torch

from . import blockwise
from .store import DTYPES, StoreSettings
from .ternary import pack_weight, unpack_weight


class Layout:
    """Encode and decode one unit's tensors for a store's settings."""

    def __init__(self, settings: StoreSettings):
        self.settings = settings
        self.shadow_dtype = DTYPES[settings.shadow_dtype]
        self.blockwise_state = settings.state_dtype == "int8"
        self.state_dtype = None if self.blockwise_state else DTYPES[settings.state_dtype]

    def is_ternary(self, unit: str, name: str) -> bool:
        return self.settings.mode == "qat" and unit.startswith("block.") and name.endswith("_proj")

    def storage_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.shadow_dtype if tensor.dim() >= 2 else torch.float32

    def encode(self, unit: str, masters: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """fp32 master tensors to the ``weights`` and (qat) ``shadow`` parts."""
        weights, shadow = {}, {}
        for name, master in masters.items():
            stored = master.detach().to("cpu", self.storage_dtype(master))
            if self.is_ternary(unit, name):
                packed, scale = pack_weight(stored.float())
                weights[f"{name}.packed"], weights[f"{name}.scale"] = packed, scale
                shadow[name] = stored
            else:
                weights[name] = stored
        parts = {"weights": weights}
        if shadow:
            parts["shadow"] = shadow
        return parts

    def param_names(self, weights_part: dict) -> list[str]:
        return sorted({key.split(".")[0] if key.endswith((".packed", ".scale")) else key for key in weights_part})

    def forward_tensors(self, unit: str, weights_part: dict, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """The compute tensors forward needs, from the ``weights`` part only."""
        tensors = {}
        for name in self.param_names(weights_part):
            if f"{name}.packed" in weights_part:
                tensors[name] = unpack_weight(weights_part[f"{name}.packed"].to(device),
                                              weights_part[f"{name}.scale"].to(device), dtype)
            else:
                value = weights_part[name]
                tensors[name] = value.to(device, torch.float32 if value.dim() < 2 else dtype)
        return tensors

    def masters(self, unit: str, weights_part: dict, shadow_part: dict | None, device) -> dict[str, torch.Tensor]:
        """fp32 master tensors (the ones AdamW updates)."""
        masters = {}
        for name in self.param_names(weights_part):
            source = shadow_part[name] if f"{name}.packed" in weights_part else weights_part[name]
            masters[name] = source.to(device, torch.float32)
        return masters

    def moments(self, optim_part: dict | None, masters: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """fp32 (exp_avg, exp_avg_sq) per master; zeros before the first update."""
        moments = {}
        for name, master in masters.items():
            if optim_part is None:
                moments[name] = (torch.zeros_like(master), torch.zeros_like(master))
            elif self.blockwise_state:
                exp_avg = blockwise.decode_signed(_subpart(optim_part, f"{name}.exp_avg"), master.shape)
                exp_avg_sq = blockwise.decode_log(_subpart(optim_part, f"{name}.exp_avg_sq"), master.shape)
                moments[name] = (exp_avg.to(master.device), exp_avg_sq.to(master.device))
            else:
                moments[name] = (optim_part[f"{name}.exp_avg"].to(master.device, torch.float32),
                                 optim_part[f"{name}.exp_avg_sq"].to(master.device, torch.float32))
        return moments

    def encode_moments(self, moments: dict[str, tuple]) -> dict[str, torch.Tensor]:
        part = {}
        for name, (exp_avg, exp_avg_sq) in moments.items():
            if self.blockwise_state:
                for key, tensor in blockwise.encode_signed(exp_avg).items():
                    part[f"{name}.exp_avg.{key}"] = tensor.cpu()
                for key, tensor in blockwise.encode_log(exp_avg_sq).items():
                    part[f"{name}.exp_avg_sq.{key}"] = tensor.cpu()
            else:
                part[f"{name}.exp_avg"] = exp_avg.to("cpu", self.state_dtype)
                part[f"{name}.exp_avg_sq"] = exp_avg_sq.to("cpu", self.state_dtype)
        return part


def _subpart(part: dict, prefix: str) -> dict:
    """``{"q": ..., "absmax": ...}`` from keys ``prefix.q``, ``prefix.absmax``."""
    return {key[len(prefix) + 1:]: tensor for key, tensor in part.items() if key.startswith(prefix + ".")
            and "." not in key[len(prefix) + 1:]}
