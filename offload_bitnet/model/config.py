"""Model configuration: the shape of a LLaMA-family or BitNet b1.58 decoder, and named sizes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ARCHS = ("llama", "bitnet")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which one and what to do."""


@dataclass
class ModelConfig:
    """Shape and math options of a decoder-only transformer.

    ``arch="llama"``: SwiGLU MLP, as ``LlamaForCausalLM``.
    ``arch="bitnet"``: relu² MLP plus ``attn_sub_norm``/``ffn_sub_norm``, as ``BitNetForCausalLM``.
    """

    arch: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    hidden_dim: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    bos_id: int | None = 1
    eos_id: int | None = 2
    pad_id: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None and self.dim > 0:
            self.hidden_dim = llama_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        self.validate()

    def validate(self):
        """Raise ConfigError on values that cannot describe a working model."""
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")

    @property
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Output x input shape of every linear projection in one block."""
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        return {
            "q_proj": (q_out, self.dim),
            "k_proj": (kv_out, self.dim),
            "v_proj": (kv_out, self.dim),
            "o_proj": (self.dim, q_out),
            "gate_proj": (self.hidden_dim, self.dim),
            "up_proj": (self.hidden_dim, self.dim),
            "down_proj": (self.dim, self.hidden_dim),
        }

    @property
    def norm_shapes(self) -> dict[str, int]:
        """Length of every RMSNorm weight in one block."""
        shapes = {"input_layernorm": self.dim, "post_attention_layernorm": self.dim}
        if self.arch == "bitnet":
            shapes["attn_sub_norm"] = self.dim
            shapes["ffn_sub_norm"] = self.hidden_dim
        return shapes

    @property
    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor of one block: the projections and the norms."""
        return {**self.projection_shapes, **{name: (size,) for name, size in self.norm_shapes.items()}}

    def block_param_count(self) -> int:
        return sum(o * i for o, i in self.projection_shapes.values()) + sum(self.norm_shapes.values())

    def param_count(self) -> int:
        """Total trainable parameters (embedding and head counted once when tied)."""
        embed = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else embed
        return embed + head + self.dim + self.n_layers * self.block_param_count()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; this store may come from a newer version")
        return cls(**data)


def llama_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4*dim, scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Named sizes (vocab 32000 unless overridden). 7B/13B/34B/70B are the published LLaMA-2 / Code Llama shapes;
# 1B and 3B are Llama-3.2's shapes. The others follow one rule: head_dim 128 (64 at 350M), GQA with 8-16
# KV heads from 1B up, SwiGLU width about 2.7x dim, depth and width chosen so the count is within ~6% of the name.
SIZES: dict[str, dict] = {
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=260, max_seq_len=512,
                 bos_id=256, eos_id=257, pad_id=258),
    "tiny": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=704, vocab_size=260, max_seq_len=1024,
                 bos_id=256, eos_id=257, pad_id=258),
    "350M": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, hidden_dim=2816),
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192),
    "3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "34B": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, hidden_dim=22016, rope_theta=1e6),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    "100B": dict(dim=11264, n_layers=80, n_heads=88, n_kv_heads=8, hidden_dim=30720),
    "300B": dict(dim=16384, n_layers=96, n_heads=128, n_kv_heads=16, hidden_dim=53248),
}


def config_for_size(size: str, arch: str = "llama", **overrides) -> ModelConfig:
    """The ModelConfig of a named size (see ``SIZES``), with field overrides applied."""
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    values = dict(SIZES[size])
    values.update(overrides)
    values["arch"] = arch
    return ModelConfig(**values)
