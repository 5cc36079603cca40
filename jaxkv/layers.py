"""Building blocks without attention: norms, rotary embeddings and the MLP.

Parameters are created with `self.param`, so a model's params are a plain nested dict.
Matrices are stored input-dim first (`x @ w`), and the MLP's input projections are fused
into one `wi` of shape [d_model, n, ffn_dim] (n = 2 for SwiGLU's gate and up, 1 for GELU),
which reads the weights in one matmul.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ModelConfig, RopeScaling

Array = jax.Array
_init = nn.initializers.normal(stddev=0.02)


class Norm(nn.Module):
    """RMSNorm (`config.norm == "rms"`; scaled by 1 + weight with `norm_plus_one`) or
    LayerNorm with bias (`"layer"`), computed in float32 and returned in the input dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        d = x.shape[-1]
        h = x.astype(jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        if cfg.norm == "rms":
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps)
            w = scale.astype(jnp.float32)
            return (h * (1.0 + w if cfg.norm_plus_one else w)).astype(x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Array:
    """Inverse frequencies theta^(-2i/head_dim) for i < head_dim/2, in float32, optionally
    rescaled (see `RopeScaling`)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    freqs = 1.0 / (theta**exponents)
    if scaling is not None and scaling.kind == "linear":
        freqs = freqs / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        old = scaling.original_max_position
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * np.pi / freqs
        scaled = np.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
        smooth = (old / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        freqs = np.where(medium, smoothed, scaled)
    return jnp.asarray(freqs, jnp.float32)


def apply_rope(
    x: Array, positions: Array, theta: float, scaling: RopeScaling | None = None
) -> Array:
    """Rotary embedding in the split-half layout (as Hugging Face Llama's `rotate_half`).

    x: [B, S, ..., head_dim]; positions: int [B, S]. Dimension i is rotated with i + head_dim/2
    by the angle position * theta^(-2i/head_dim). Computed in float32.
    """
    half = x.shape[-1] // 2
    freqs = rope_frequencies(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, S, half]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (half,))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Mlp(nn.Module):
    """SwiGLU (down(silu(gate(x)) * up(x))), GeGLU (down(gelu_tanh(gate(x)) * up(x))) or
    GELU (down(gelu_tanh(up(x)))) MLP."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        n_in = 1 if cfg.mlp == "gelu" else 2
        wi = self.param("wi", _init, (cfg.d_model, n_in, cfg.ffn_dim), jnp.float32)
        wo = self.param("wo", _init, (cfg.ffn_dim, cfg.d_model), jnp.float32)
        h = jnp.einsum("bsd,dnf->bsnf", x, wi.astype(x.dtype))
        if cfg.mlp_bias:
            h = h + self.param("bi", nn.initializers.zeros, (n_in, cfg.ffn_dim)).astype(x.dtype)
        if cfg.mlp == "swiglu":
            h = jax.nn.silu(h[:, :, 0]) * h[:, :, 1]
        elif cfg.mlp == "geglu":
            h = jax.nn.gelu(h[:, :, 0], approximate=True) * h[:, :, 1]
        else:
            h = jax.nn.gelu(h[:, :, 0], approximate=True)
        out = jnp.einsum("bsf,fd->bsd", h, wo.astype(x.dtype))
        if cfg.mlp_bias:
            out = out + self.param("bo", nn.initializers.zeros, (cfg.d_model,)).astype(x.dtype)
        return out
