"""LoRA adapters on a frozen base: small trainable matrices kept in RAM, saved in PEFT's format.

For a target projection W (out x in): y = base(x) + (dropout(x) A^T B^T) * alpha / rank, with A (rank x in)
initialised as PEFT does (Kaiming-uniform, a=sqrt(5)) and B (out x rank) zero, so training starts from the
base model exactly. The adapter sees the unquantized input even when the base is a BitLinear.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from offload_bitnet.io.files import write_file_atomic
from offload_bitnet.io.safetensors import decode_safetensors, encode_safetensors
from offload_bitnet.model.adamw import AdamWConfig, adamw_update
from offload_bitnet.model.block import dropout
from offload_bitnet.model.config import ModelConfig

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_STATE = "adapter_optimizer.safetensors"
ADAPTER_PROGRESS = "adapter_state.json"


@dataclass
class LoRAConfig:
    """Rank, scale, dropout and target projections of the adapters."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ALL_TARGETS
    init_seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {', '.join(ALL_TARGETS)}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter:
    """The low-rank path of one projection; called by ``model.project``."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout_p: float):
        self.lora_a, self.lora_b, self.scaling, self.dropout_p = lora_a, lora_b, scaling, dropout_p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = dropout(x, self.dropout_p, generator)
        return F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scaling


def peft_name(layer: int, projection: str, matrix: str) -> str:
    group = "self_attn" if projection in ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{group}.{projection}.{matrix}.weight"


class AdapterSet:
    """Every adapter of a model with its AdamW moments, all in RAM (fp32)."""

    def __init__(self, config: ModelConfig, lora: LoRAConfig):
        self.config, self.lora = config, lora
        self.step = 0
        self.extra: dict = {}
        generator = torch.Generator().manual_seed(lora.init_seed)
        shapes = config.projection_shapes
        self.weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for layer in range(config.n_layers):
            for name in lora.targets:
                out_features, in_features = shapes[name]
                bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), as PEFT's default init
                lora_a = (torch.rand(lora.rank, in_features, generator=generator) * 2 - 1) * bound
                self.weights[(layer, name)] = {"lora_A": lora_a, "lora_B": torch.zeros(out_features, lora.rank)}
        self.moments = {key: {m: (torch.zeros_like(t), torch.zeros_like(t)) for m, t in mats.items()}
                        for key, mats in self.weights.items()}

    def parameter_count(self) -> int:
        return sum(t.numel() for mats in self.weights.values() for t in mats.values())

    def block_adapters(self, layer: int, device, trainable: bool = False) -> dict[str, LoRAAdapter]:
        """``{"q_proj.lora": LoRAAdapter, ...}`` for one block; with ``trainable`` the matrices are fresh leaves."""
        adapters = {}
        for name in self.lora.targets:
            mats = self.weights[(layer, name)]
            lora_a, lora_b = (mats[m].to(device) for m in ("lora_A", "lora_B"))
            if trainable:
                lora_a, lora_b = lora_a.detach().requires_grad_(), lora_b.detach().requires_grad_()
            adapters[f"{name}.lora"] = LoRAAdapter(lora_a, lora_b, self.lora.scaling, self.lora.dropout)
        return adapters

    def update(self, layer: int, adapters: dict[str, LoRAAdapter], step: int, optim: AdamWConfig, lr: float | None,
               adamw=adamw_update, grad_of=lambda leaf: leaf.grad):
        """AdamW on one block's adapters from the gradients left on their leaves. ``adamw``: the update of one
        tensor, in place (``model.adamw.adamw_update``'s signature; the engine passes its backend's).
        ``grad_of(leaf)``: a leaf's summed gradient (the engine's ``GradSums.summed``)."""
        for key, adapter in adapters.items():
            name = key[: -len(".lora")]
            for matrix, leaf in (("lora_A", adapter.lora_a), ("lora_B", adapter.lora_b)):
                param = self.weights[(layer, name)][matrix]
                exp_avg, exp_avg_sq = self.moments[(layer, name)][matrix]
                grad = grad_of(leaf)
                grad = grad.float().cpu() if grad is not None else torch.zeros_like(param)
                adamw(param, grad, exp_avg, exp_avg_sq, step, optim, lr)

    def merged_weight(self, layer: int, name: str, base: torch.Tensor) -> torch.Tensor:
        """``base + B A * scaling`` in fp32 (for ``--merge`` exports)."""
        mats = self.weights.get((layer, name))
        if mats is None:
            return base.float()
        return base.float() + (mats["lora_B"] @ mats["lora_A"]) * self.lora.scaling

    # ------------------------------------------------------------------ files
    def save(self, directory: str, step: int, extra: dict | None = None, base_model: str = ""):
        """Write the adapters (PEFT names), their config, the moments and the step; the progress file is
        renamed last, so a crash leaves the previous checkpoint readable."""
        os.makedirs(directory, exist_ok=True)
        weights = {peft_name(layer, name, m): t for (layer, name), mats in self.weights.items() for m, t in mats.items()}
        moments = {}
        for (layer, name), mats in self.moments.items():
            for matrix, (exp_avg, exp_avg_sq) in mats.items():
                moments[peft_name(layer, name, matrix) + ".exp_avg"] = exp_avg
                moments[peft_name(layer, name, matrix) + ".exp_avg_sq"] = exp_avg_sq
        suffix = f".s{step:08d}"
        header, buffers = encode_safetensors(weights)
        write_file_atomic(os.path.join(directory, ADAPTER_WEIGHTS + suffix), header, *buffers)
        header, buffers = encode_safetensors(moments)
        write_file_atomic(os.path.join(directory, ADAPTER_STATE + suffix), header, *buffers)
        peft_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.lora.rank, "lora_alpha": self.lora.alpha,
            "lora_dropout": self.lora.dropout, "target_modules": list(self.lora.targets), "bias": "none",
            "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True,
        }
        write_file_atomic(os.path.join(directory, ADAPTER_CONFIG), json.dumps(peft_config, indent=1).encode())
        progress = {"step": step, "lora": asdict(self.lora), "extra": extra or {}, "files": suffix}
        write_file_atomic(os.path.join(directory, ADAPTER_PROGRESS), json.dumps(progress, indent=1).encode())
        # The PEFT-named file without suffix is what `peft` loads; it is a copy of the committed one.
        for name in (ADAPTER_WEIGHTS,):
            tmp = os.path.join(directory, name + ".link.tmp")
            if os.path.exists(tmp):
                os.remove(tmp)
            os.link(os.path.join(directory, name + suffix), tmp)
            os.replace(tmp, os.path.join(directory, name))
        for stale in os.listdir(directory):
            if stale.startswith((ADAPTER_WEIGHTS + ".s", ADAPTER_STATE + ".s")) and not stale.endswith(suffix):
                os.remove(os.path.join(directory, stale))
        self.step, self.extra = step, extra or {}

    @classmethod
    def load(cls, directory: str, config: ModelConfig) -> "AdapterSet":
        """Reload the last checkpoint written by ``save``."""
        with open(os.path.join(directory, ADAPTER_PROGRESS)) as handle:
            progress = json.load(handle)
        adapters = cls(config, LoRAConfig(**progress["lora"]))
        suffix = progress["files"]
        weights = _read_safetensors(os.path.join(directory, ADAPTER_WEIGHTS + suffix))
        moments = _read_safetensors(os.path.join(directory, ADAPTER_STATE + suffix))
        adapters._fill(weights, os.path.join(directory, ADAPTER_WEIGHTS + suffix))
        for (layer, name), mats in adapters.moments.items():
            for matrix in mats:
                key = peft_name(layer, name, matrix)
                mats[matrix] = (moments[key + ".exp_avg"].clone(), moments[key + ".exp_avg_sq"].clone())
        adapters.step, adapters.extra = progress["step"], progress["extra"]
        return adapters

    @classmethod
    def from_peft(cls, directory: str, config: ModelConfig) -> "AdapterSet":
        """Read a plain PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), e.g. one
        written by ``PeftModel.save_pretrained``, for merging. Moments start at zero and the step at 0.

        Options this module cannot represent (DoRA, per-module ranks, biases, partial layers, extra trained
        modules) raise ValueError naming the field; rsLoRA is kept by rescaling alpha (alpha/sqrt(r) = alpha'/r).
        """
        config_path = os.path.join(directory, ADAPTER_CONFIG)
        weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
        if not os.path.isfile(config_path):
            raise ValueError(f"{directory} is not a LoRA adapter folder: {ADAPTER_CONFIG} is missing")
        if not os.path.isfile(weights_path):
            hint = " (adapter_model.bin is not read: re-save it with safe_serialization=True)" \
                if os.path.isfile(os.path.join(directory, "adapter_model.bin")) else ""
            raise ValueError(f"{directory} has no {ADAPTER_WEIGHTS}{hint}")
        try:
            with open(config_path) as handle:
                peft_config = json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {config_path}: {error}") from error
        adapters = cls(config, lora_config_from_peft(peft_config, config_path))
        adapters._fill(_read_safetensors(weights_path), weights_path)
        return adapters

    def _fill(self, weights: dict[str, torch.Tensor], origin: str):
        """Take every adapter matrix from PEFT-named ``weights``, checking names and shapes against the model."""
        for (layer, name), mats in self.weights.items():
            for matrix, initial in mats.items():
                key = peft_name(layer, name, matrix)
                if key not in weights:
                    raise ValueError(f"{origin} has no tensor {key}: the adapter does not match this model "
                                     f"({self.config.n_layers} layers, targets {', '.join(self.lora.targets)})")
                if tuple(weights[key].shape) != tuple(initial.shape):
                    raise ValueError(f"{origin} tensor {key} has shape {tuple(weights[key].shape)}, this model and "
                                     f"rank {self.lora.rank} need {tuple(initial.shape)}: the adapter was trained "
                                     "on another base model")
                mats[matrix] = weights[key].float().clone()
        expected = {peft_name(layer, name, m) for (layer, name), mats in self.weights.items() for m in mats}
        extra = sorted(set(weights) - expected)
        if extra:
            raise ValueError(f"{origin} has {len(extra)} tensors this model has no place for (first: {extra[0]}): "
                             f"the adapter was trained on another base model or targets other projections")


class AdapterCheckpoint:
    """An adapter folder as the commit record of a LoRA run: each committed step's adapters, moments, step and
    extra (``AdapterSet.save``), and the last of them read back (to resume, or to undo an abandoned step).
    Its owner (the trainer, or whoever opens a LoRA engine) creates it; the engine only commits to it."""

    def __init__(self, directory: str, base_model: str = ""):
        self.directory, self.base_model = directory, base_model

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.directory, ADAPTER_PROGRESS))

    def restore(self, config: ModelConfig, lora: LoRAConfig) -> AdapterSet:
        """The adapters of the last commit, or fresh ones (``lora``) when nothing was committed yet."""
        return AdapterSet.load(self.directory, config) if self.exists() else AdapterSet(config, lora)

    def commit(self, adapters: AdapterSet, step: int, extra: dict | None = None):
        """Save ``adapters`` as step ``step`` (atomically: a crash leaves the previous commit readable)."""
        adapters.save(self.directory, step, extra, base_model=self.base_model)


# PEFT LoraConfig fields whose non-default values change the math in ways an AdapterSet cannot express.
_UNSUPPORTED_PEFT = {
    "use_dora": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "bias": ("none", None),
    "lora_bias": (False, None), "fan_in_fan_out": (False, None), "layers_to_transform": (None,),
    "layer_replication": (None,), "modules_to_save": (None, []), "trainable_token_indices": (None,),
    "target_parameters": (None, []), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
    "kasa_config": (None,), "monteclora_config": (None,), "arrow_config": (None,), "use_bdlora": (None,),
}


def lora_config_from_peft(peft_config: dict, origin: str = ADAPTER_CONFIG) -> LoRAConfig:
    """The LoRAConfig of a PEFT ``adapter_config.json`` dict; ValueError naming the field it cannot honour."""
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{origin}: peft_type is {peft_config.get('peft_type')!r}; only LORA adapters are supported")
    for key, allowed in _UNSUPPORTED_PEFT.items():
        if key in peft_config and peft_config[key] not in allowed:
            raise ValueError(f"{origin}: {key}={peft_config[key]!r} is not supported (only plain LoRA on "
                             f"{', '.join(ALL_TARGETS)}); merge this adapter with peft's merge_and_unload instead")
    targets = peft_config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"{origin}: target_modules must be a list of projection names, got {targets!r}")
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise ValueError(f"{origin}: target_modules {unknown} are not supported; choose from {', '.join(ALL_TARGETS)}")
    try:
        rank = int(peft_config["r"])
        alpha = float(peft_config.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{origin}: r and lora_alpha must be numbers ({error})") from error
    if peft_config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r); an AdapterSet scales by alpha/r
    # Keep the configured order of the projections (PEFT may write them as an unordered set).
    ordered = tuple(name for name in ALL_TARGETS if name in targets)
    return LoRAConfig(rank=rank, alpha=alpha, dropout=float(peft_config.get("lora_dropout") or 0.0), targets=ordered)


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as handle:
        return decode_safetensors(bytearray(handle.read()), path)
