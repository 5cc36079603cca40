"""Self-attention: fused q/k/v projection, rotary embedding, masked softmax attention.

Masks are built from positions, never from slot indices: a key is visible to a query when the
key's slot holds a position >= 0, not after the query's position, and (with a sliding window)
within the window. The same code therefore serves the uncached forward, ragged prefill and
decode, whatever padding or stopped rows the cache holds.

Weights:
- `qkv`: [d_model, n_kv_heads, q_per_kv + 2, head_dim]. For each KV head, its group of query
  heads, then its key, then its value: one matmul reads all three, and the layout splits
  cleanly over KV heads when sharded. Query head h belongs to KV head h // q_per_kv, as in
  Hugging Face's `repeat_kv`.
- `o`: [n_kv_heads, q_per_kv, head_dim, d_model].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkv.cache import LayerKV, WritePlan
from jaxkv.config import ModelConfig
from jaxkv.layers import apply_rope

Array = jax.Array
_init = nn.initializers.normal(stddev=0.02)
# Masked scores are replaced (not offset) by this: finite, so a query that sees no key at all
# (a padding slot) gets a uniform average instead of NaN.
_MASKED = -1e30


def attention_mask(q_pos: Array, k_pos: Array, window: int | None) -> Array:
    """bool [B, S, T]: which keys (positions k_pos [B, T], -1 empty) each query (q_pos [B, S])
    may attend to."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    return mask


def attend(
    q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array, window: int | None = None
) -> Array:
    """Grouped-query attention.

    q: [B, S, n_kv_heads, q_per_kv, head_dim]; k, v: [B, T, n_kv_heads, head_dim];
    q_pos: [B, S]; k_pos: [B, T]. Scores and softmax in float32. Returns q's shape.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bsngh,btnh->bngst", q, k, preferred_element_type=jnp.float32)
    mask = attention_mask(q_pos, k_pos, window)[:, None, None]
    scores = jnp.where(mask, scores * scale, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bngst,btnh->bsngh", probs.astype(v.dtype), v)


class Attention(nn.Module):
    """Self-attention over the new tokens and, if given, the cached ones."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        kv: LayerKV | None = None,
        plan: WritePlan | None = None,
        span: int | None = None,
    ) -> tuple[Array, LayerKV | None]:
        cfg = self.config
        g, hd = cfg.q_per_kv, cfg.head_dim
        w = self.param("qkv", _init, (cfg.d_model, cfg.n_kv_heads, g + 2, hd), jnp.float32)
        h = jnp.einsum("bsd,dngh->bsngh", x, w.astype(x.dtype))
        if cfg.qkv_bias:
            bias = self.param("qkv_bias", nn.initializers.zeros, (cfg.n_kv_heads, g + 2, hd))
            h = h + bias.astype(x.dtype)
        q, k, v = h[:, :, :, :g], h[:, :, :, g], h[:, :, :, g + 1]
        if cfg.position == "rope":
            q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
            k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
        if kv is None:
            keys, values, k_pos = k, v, positions
        else:
            span = kv.k.shape[1] if span is None else span
            kv = kv.write(k, v, plan)
            keys, values = kv.read(span)
            k_pos = plan.key_positions(span)
        out = attend(q, keys, values, positions, k_pos, cfg.sliding_window)
        wo = self.param("o", _init, (cfg.n_kv_heads, g, hd, cfg.d_model), jnp.float32)
        y = jnp.einsum("bsngh,nghd->bsd", out, wo.astype(x.dtype))
        if cfg.out_bias:
            y = y + self.param("o_bias", nn.initializers.zeros, (cfg.d_model,)).astype(x.dtype)
        return y, kv
