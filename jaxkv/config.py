"""Model configuration: one frozen, hashable dataclass that describes every supported model.

`ModelConfig` is passed to jitted functions as a static argument, so it must stay hashable
(only ints, floats, strings, bools and None). Architecture families (Llama, Mistral, Qwen2,
GPT-2) are combinations of its options, never separate model code.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import jax.numpy as jnp

Norm = Literal["rms", "layer"]
Mlp = Literal["swiglu", "geglu", "gelu"]
PositionKind = Literal["rope", "learned"]

_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_KINDS = ("linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
QK_NORMS = (None, "head", "flat")
BLOCK_NORMS = ("pre", "post", "both")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling for long context.

    kind "linear": every frequency divided by `factor` (positions stretched).
    kind "llama3": Llama 3.1's scheme: low frequencies divided by `factor`, high ones kept,
    the band between interpolated, with wavelength bounds original_max_position /
    low_freq_factor and original_max_position / high_freq_factor.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in _ROPE_KINDS:
            raise ValueError(f"rope scaling kind must be one of {_ROPE_KINDS}, got {self.kind!r}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only transformer.

    Attributes:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads (None: same as n_heads). n_kv_heads == n_heads is
            multi-head attention, 1 is multi-query, anything between is grouped-query.
        ffn_dim: hidden width of the MLP.
        head_dim: width of one head (None: d_model // n_heads).
        max_seq_len: the longest sequence the model supports (learned position tables have
            exactly this many rows).
        norm: "rms" (RMSNorm, no bias) or "layer" (LayerNorm with bias).
        norm_eps: epsilon of the norms.
        mlp: "swiglu" (gate/up/down, SiLU), "geglu" (gate/up/down, tanh-approximated GELU on
            the gate, Gemma) or "gelu" (up/down, tanh-approximated GELU).
        position: "rope" (rotary, split-half layout) or "learned" (absolute table).
        rope_theta: rotary base frequency.
        rope_scaling: optional `RopeScaling` of the rotary frequencies.
        qkv_bias / out_bias / mlp_bias: biases on the q/k/v, output and MLP projections.
        tie_embeddings: the output projection is the transposed token embedding.
        sliding_window: if set, a query attends only to the last `sliding_window` positions
            (itself included), as in Mistral: on every layer, or with `layer_types` on the
            layers marked "sliding_attention" only.
        rope_layers: None (with rotary positions: every layer rotates), or one bool per layer,
            False for a layer without positional encoding (NoPE; SmolLM3's every 4th layer).
        qk_norm: None, or "head": queries and keys RMS-normalized over head_dim (one scale per
            head dimension, shared by the heads) before the rotary embedding (Qwen3, Gemma 3);
            "flat": over the whole projection of all heads, one scale per element (OLMo 2).
        norm_plus_one: RMSNorm scales by (1 + weight) (Gemma; weights stored as Gemma's).
        embed_scale: token embeddings are multiplied by sqrt(d_model) (in the activation
            dtype, as Gemma does).
        query_pre_attn_scalar: attention scores are scaled by query_pre_attn_scalar ** -0.5
            instead of head_dim ** -0.5 (Gemma 2/3).
        attn_softcap / final_softcap: scores (after scaling) and final logits are soft-capped
            as cap * tanh(x / cap) (Gemma 2).
        rope_local_theta: the rotary base of sliding-window layers, unscaled (Gemma 3's local
            layers); None: every layer uses rope_theta and rope_scaling.
        block_norms: where each block normalizes: "pre" (x + f(norm(x)), Llama), "post"
            (x + norm(f(x)), OLMo 2) or "both" (x + norm(f(norm(x))), Gemma 2/3).
        layer_types: None (every layer alike), or one entry per layer, "full_attention" or
            "sliding_attention" (Hugging Face's names): hybrid local/global models such as
            Gemma 2/3 or Qwen2 with max_window_layers. Sliding layers need `sliding_window`.
        dtype: dtype of activations and of the KV cache.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 2048
    norm: Norm = "rms"
    norm_eps: float = 1e-5
    mlp: Mlp = "swiglu"
    position: PositionKind = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    qk_norm: str | None = None
    rope_layers: tuple[bool, ...] | None = None
    block_norms: str = "pre"
    norm_plus_one: bool = False
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    rope_local_theta: float | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.mlp not in ("swiglu", "geglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu', 'geglu' or 'gelu', got {self.mlp!r}")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name} must be None or > 0, got {value!r}")
        if self.position not in ("rope", "learned"):
            raise ValueError(f"position must be 'rope' or 'learned', got {self.position!r}")
        if self.block_norms not in BLOCK_NORMS:
            raise ValueError(f"block_norms must be one of {BLOCK_NORMS}, got {self.block_norms!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window}")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", types)
            if len(types) != self.n_layers:
                raise ValueError(
                    f"layer_types has {len(types)} entries but n_layers={self.n_layers}"
                )
            bad = sorted(set(types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types has {bad}; each must be one of {LAYER_TYPES}")
            if "sliding_attention" in types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but no sliding_window")
        if self.rope_layers is not None:
            flags = tuple(bool(x) for x in self.rope_layers)
            object.__setattr__(self, "rope_layers", flags)
            if len(flags) != self.n_layers:
                raise ValueError(
                    f"rope_layers has {len(flags)} entries but n_layers={self.n_layers}"
                )
            if self.position != "rope":
                raise ValueError(f"rope_layers needs position='rope', got {self.position!r}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")

    @property
    def attn_scale(self) -> float:
        """The factor attention scores are scaled by."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one KV head (the GQA group size)."""
        return self.n_heads // self.n_kv_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full attention)."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    def layer_rope_base(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(theta, scaling) of the rotary embedding on layer `layer`."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    def layer_rope(self, layer: int) -> bool:
        """Whether layer `layer` applies the rotary embedding."""
        if self.position != "rope":
            return False
        return self.rope_layers is None or self.rope_layers[layer]

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """`layer_window` of every layer."""
        return tuple(self.layer_window(i) for i in range(self.n_layers))

    @property
    def jnp_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed. n_kv_heads and head_dim keep their resolved values
        unless given."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def param_count(self) -> int:
        """Number of parameters of a model with this config (computed from the shapes)."""
        d, f, hd = self.d_model, self.ffn_dim, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        if self.qkv_bias:
            attn += (self.n_heads + 2 * self.n_kv_heads) * hd
        if self.out_bias:
            attn += d
        n_in = 1 if self.mlp == "gelu" else 2
        mlp = d * n_in * f + f * d + ((n_in * f + d) if self.mlp_bias else 0)
        norm = d if self.norm == "rms" else 2 * d
        if self.qk_norm == "head":
            attn += 2 * hd
        elif self.qk_norm == "flat":
            attn += (self.n_heads + self.n_kv_heads) * hd
        per_layer = attn + mlp + (4 if self.block_norms == "both" else 2) * norm
        total = self.n_layers * per_layer + norm + self.vocab_size * d
        if not self.tie_embeddings:
            total += d * self.vocab_size
        if self.position == "learned":
            total += self.max_seq_len * d
        return total


PRESETS: dict[str, ModelConfig] = {
    # Tiny configs for tests and CPU benchmarks.
    "test-mha": ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, ffn_dim=128),
    "test-gqa": ModelConfig(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128
    ),
    "test-mqa": ModelConfig(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=128
    ),
    # ~3M parameters (the CPU benchmark's small config).
    "llama-3m": ModelConfig(
        vocab_size=512,
        d_model=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=768,
        max_seq_len=32768,
    ),
    # ~110M parameters (the CPU benchmark's large config).
    "llama-110m": ModelConfig(
        vocab_size=32000,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_dim=2048,
        max_seq_len=32768,
    ),
    # SmolLM2-135M shape (the real model's, for measurements where its file is not at hand).
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_dim=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        tie_embeddings=True,
    ),
    # TinyLlama-1.1B shape.
    "llama-1b": ModelConfig(
        vocab_size=32000,
        d_model=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        ffn_dim=5632,
        max_seq_len=8192,
        dtype="bfloat16",
    ),
    # Mistral-7B shape.
    "llama-7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        max_seq_len=8192,
        dtype="bfloat16",
    ),
}


def preset(name: str) -> ModelConfig:
    """A named config from PRESETS."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
