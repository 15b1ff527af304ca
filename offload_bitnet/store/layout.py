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

A packed-only store (``StoreSettings.packed_only``, a frozen qat base) has the ``weights`` parts alone. Where
something needs its projections' masters (exports, the in-memory reference) it gets the latent weights whose
quantization gives back the stored codes and scale (``ternary.latent_weight``).
"""
from __future__ import annotations

import torch

from offload_bitnet.io.buffers import BufferPool
from offload_bitnet.model.ternary import PackedTernary, latent_weight, pack_weight, unpack_weight
from offload_bitnet.store import blockwise
from offload_bitnet.store.blockstore import DTYPES, StoreSettings
from offload_bitnet.store.units import is_ternary


class Layout:
    """Encode and decode one unit's tensors for a store's settings. With a ``pool``, the CPU tensors it makes
    live in the pool's reusable memory."""

    def __init__(self, settings: StoreSettings, pool: BufferPool | None = None):
        self.settings = settings
        self.pool = pool
        self.shadow_dtype = DTYPES[settings.shadow_dtype]
        self.blockwise_state = settings.state_dtype == "int8"
        self.state_dtype = None if self.blockwise_state else DTYPES[settings.state_dtype]

    def empty(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialized tensor (from the pool when it is for the CPU)."""
        if self.pool is not None and torch.device(device).type == "cpu":
            return self.pool.empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=device)

    def _as(self, tensor: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
        """``tensor`` as ``dtype`` on ``device`` (itself when it already is)."""
        if self.pool is not None and torch.device(device).type == "cpu":
            return self.pool.convert(tensor, dtype)
        return tensor.to(device, dtype)

    def float32(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as fp32 on its device (itself when it already is)."""
        return self._as(tensor, torch.float32, tensor.device)

    def is_ternary(self, unit: str, name: str) -> bool:
        """Whether this store keeps the tensor as packed ternary codes (``units.is_ternary``)."""
        return is_ternary(self.settings.mode, unit, name)

    def storage_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.shadow_dtype if tensor.dim() >= 2 else torch.float32

    def encode(self, unit: str, masters: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """fp32 master tensors to the ``weights`` and (qat) ``shadow`` parts. A packed-only store packs its
        projections from the same 16-bit values as a qat store (the same codes) and keeps no shadow; it also
        takes projections already packed (``PackedTernary``) as they are."""
        weights, shadow = {}, {}
        for name, master in masters.items():
            if isinstance(master, PackedTernary):
                if not (self.settings.packed_only and self.is_ternary(unit, name)):
                    raise ValueError(f"unit {unit} tensor {name}: already packed ternary weights go only into a "
                                     "packed-only store's projections")
                weights[f"{name}.packed"] = master.packed.to("cpu", torch.uint8).contiguous()
                weights[f"{name}.scale"] = master.scale.to("cpu", torch.float32).reshape(1)
                continue
            stored = self._as(master.detach(), self.storage_dtype(master), "cpu")
            if self.is_ternary(unit, name):
                packed, scale = pack_weight(stored, scratch=self.empty(stored.shape, torch.float32, "cpu"))
                weights[f"{name}.packed"], weights[f"{name}.scale"] = packed, scale
                if not self.settings.packed_only:
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
        return {name: self.forward_tensor(weights_part, name, dtype, device) for name in self.param_names(weights_part)}

    def forward_tensor(self, weights_part: dict, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """One compute tensor of ``forward_tensors`` (a projection unpacked, or converted from 16 bits)."""
        if f"{name}.packed" in weights_part:
            packed = weights_part[f"{name}.packed"].to(device)
            return unpack_weight(packed, weights_part[f"{name}.scale"].to(device), dtype,
                                 out=self.empty((packed.shape[0] * 4, *packed.shape[1:]), dtype, device))
        value = weights_part[name]
        return self._as(value, torch.float32 if value.dim() < 2 else dtype, device)

    def masters(self, unit: str, weights_part: dict, shadow_part: dict | None, device,
                dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Master tensors (the ones AdamW updates), as ``dtype`` (None: as stored, 16-bit or fp32). A packed-only
        store (no ``shadow_part``) has no masters of its projections: they come as ``latent_weight`` (fp32)."""
        masters = {}
        for name in self.param_names(weights_part):
            if f"{name}.packed" in weights_part and shadow_part is None and self.settings.packed_only:
                latent = latent_weight(weights_part[f"{name}.packed"], weights_part[f"{name}.scale"])
                masters[name] = self._as(latent, dtype or torch.float32, device)
                continue
            source = shadow_part[name] if f"{name}.packed" in weights_part else weights_part[name]
            masters[name] = self._as(source, dtype or source.dtype, device)
        return masters

    def moments(self, optim_part: dict | None, shapes: dict[str, tuple], device) -> dict[str, tuple]:
        """fp32 (exp_avg, exp_avg_sq) per master (``shapes``: name -> shape); zeros before the first update
        (``optim_part`` None or empty)."""
        moments = {}
        for name, shape in shapes.items():
            if not optim_part:
                moments[name] = tuple(self.empty(shape, torch.float32, device).zero_() for _ in "mv")
            elif self.blockwise_state:
                exp_avg = blockwise.decode_signed(_subpart(optim_part, f"{name}.exp_avg"), shape,
                                                  out=self.empty(shape, torch.float32, "cpu"))
                exp_avg_sq = blockwise.decode_log(_subpart(optim_part, f"{name}.exp_avg_sq"), shape,
                                                  out=self.empty(shape, torch.float32, "cpu"))
                moments[name] = (exp_avg.to(device), exp_avg_sq.to(device))
            else:
                moments[name] = (self._as(optim_part[f"{name}.exp_avg"], torch.float32, device),
                                 self._as(optim_part[f"{name}.exp_avg_sq"], torch.float32, device))
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
                part[f"{name}.exp_avg"] = self._as(exp_avg, self.state_dtype, "cpu")
                part[f"{name}.exp_avg_sq"] = self._as(exp_avg_sq, self.state_dtype, "cpu")
        return part


def _subpart(part: dict, prefix: str) -> dict:
    """``{"q": ..., "absmax": ...}`` from keys ``prefix.q``, ``prefix.absmax``."""
    # Keys first: ``part`` may read each tensor when asked for (``LazySafetensors``).
    return {key[len(prefix) + 1:]: part[key] for key in part if key.startswith(prefix + ".")
            and "." not in key[len(prefix) + 1:]}
