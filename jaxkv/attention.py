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

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkv.cache import LayerKV, WritePlan
from jaxkv.config import ModelConfig
from jaxkv.layers import apply_rope

Array = jax.Array
_init = nn.initializers.normal(stddev=0.02)
# Decode attention (one query per row) as multiply-reduce (True) or as dots (False); None picks
# per backend at trace time: dots on CPU, where they measured faster (BENCHMARKS.md), and
# multiply-reduce elsewhere, where it lets XLA fuse the cache read. The benchmarks set it to
# measure one form against the other.
DECODE_BY_REDUCTION: bool | None = None


def _decode_by_reduction() -> bool:
    if DECODE_BY_REDUCTION is not None:
        return DECODE_BY_REDUCTION
    return jax.default_backend() != "cpu"


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
    q: Array,
    q_pos: Array,
    parts: list[tuple[Array, Array, Array]],
    window: int | None = None,
) -> Array:
    """Grouped-query attention of q over one or more parts of keys and values.

    q: [B, S, n_kv_heads, q_per_kv, head_dim]; q_pos: [B, S]; each part is (k, v, k_pos) with
    k, v: [B, T, n_kv_heads, head_dim] and k_pos: [B, T]. One softmax runs over the scores of
    all parts (float32). With a cache the parts are the stored keys (read before this step's
    write) and the new tokens' own keys, so attention never reads the buffer being updated:
    XLA can then write it in place.
    """
    scale = q.shape[-1] ** -0.5
    one = q.shape[1] == 1 and _decode_by_reduction()
    axis = 1 if one else -1  # the key axis of the scores
    scores = []
    for k, _, k_pos in parts:
        if one:  # [B, T, N, G] by multiply-reduce (see _scores_one)
            s = _scores_one(q, k)
            mask = attention_mask(q_pos, k_pos, window)[:, 0, :, None, None]
        else:  # [B, N, G, S, T]
            s = jnp.einsum("bsngh,btnh->bngst", q, k, preferred_element_type=jnp.float32)
            mask = attention_mask(q_pos, k_pos, window)[:, None, None]
        scores.append(jnp.where(mask, s * scale, _MASKED))
    # One softmax over all parts without concatenating them: shared max, summed denominators.
    top = functools.reduce(jnp.maximum, [jnp.max(s, axis=axis, keepdims=True) for s in scores])
    weights = [jnp.exp(s - top) for s in scores]
    denom = sum(jnp.sum(w, axis=axis, keepdims=True) for w in weights)
    out = None
    for (_, v, _), w in zip(parts, weights, strict=True):
        p = w / denom
        if one:  # sum_t p[b, t, n, g] v[b, t, n, h]
            o = jnp.sum(p[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)[:, None]
        else:
            o = jnp.einsum(
                "bngst,btnh->bsngh", p.astype(v.dtype), v, preferred_element_type=jnp.float32
            )
        out = o if out is None else out + o
    return out.astype(q.dtype)


def _scores_one(q: Array, k: Array) -> Array:
    """q . k for one query per row, as broadcast-multiply-reduce instead of a dot: [B, T, N, G].

    With one query the products are matrix-vector work bound by reading K. Written as a
    reduction, XLA fuses the read of the cache (and its slice to the span) into one pass,
    where a dot would first copy the sliced K into a gemm-friendly layout.
    """
    qf = q[:, 0].astype(jnp.float32)  # [B, N, G, H]
    return jnp.sum(qf[:, None] * k[:, :, :, None, :].astype(jnp.float32), axis=-1)


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
        parts = [(k, v, positions)]  # the new tokens see each other (causally)
        if kv is not None:
            span = kv.k.shape[1] if span is None else span
            if span > 0:  # and the tokens stored before them
                parts.insert(0, (*kv.read(span), plan.cached_positions(span)))
        out = attend(q, positions, parts, cfg.sliding_window)
        if kv is not None:  # stored after attention read the cache: updated in place
            kv = kv.write(k, v, plan, after=out[:, :, :, 0])
        wo = self.param("o", _init, (cfg.n_kv_heads, g, hd, cfg.d_model), jnp.float32)
        # A plain [B, S, H*hd] @ [H*hd, D] matmul: both reshapes are free (an einsum over
        # (n, g, h) may contract in another order and transpose the weight at every call),
        # and with heads sharded each device multiplies its own heads before one all-reduce.
        b, sq = out.shape[:2]
        y = out.reshape(b, sq, -1) @ wo.astype(x.dtype).reshape(-1, cfg.d_model)
        if cfg.out_bias:
            y = y + self.param("o_bias", nn.initializers.zeros, (cfg.d_model,)).astype(x.dtype)
        return y, kv
