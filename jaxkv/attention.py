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
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkv.cache import LayerCache, Segment, WritePlan
from jaxkv.cache.base import Received
from jaxkv.cache.quant import dequantize, unpack
from jaxkv.config import ModelConfig
from jaxkv.layers import apply_rope

Array = jax.Array
_init = nn.initializers.normal(stddev=0.02)
# Attention over the stored keys for one query per row (decode) as products (False) or as
# multiply-reduce (True); None picks per backend at trace time: products on CPU, where
# XLA:CPU's reductions are slow and the cache layout makes them plain matrix products
# (BENCHMARKS.md), multiply-reduce elsewhere, where XLA fuses the cache read into one pass.
# The benchmarks set it to measure one form against the other.
DECODE_BY_REDUCTION: bool | None = None


# Attention of many queries per row (prefill, extend) through `jax.nn.dot_product_attention`
# (True, the default), or through jaxkv's own two-part softmax (False). On a GPU in half
# precision it runs cuDNN's fused kernel; elsewhere XLA's implementation, which measured 2.4x
# faster than jaxkv's own form for a chunked SmolLM2 prefill on CPU (BENCHMARKS.md).
FUSED_PREFILL: bool = True


def _fused_prefill(dtype: object) -> str | None:
    """The jax.nn.dot_product_attention implementation to use, or None for jaxkv's own."""
    if not FUSED_PREFILL:
        return None
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def _decode_by_reduction() -> bool:
    if DECODE_BY_REDUCTION is not None:
        return DECODE_BY_REDUCTION
    return jax.default_backend() != "cpu"


# Masked scores are replaced (not offset) by this: finite, so a query that sees no key at all
# (a padding slot) gets a uniform average instead of NaN.
_MASKED = -1e30


def attention_mask(q_pos: Array, k_pos: Array, window: int | None, sinks: int = 0) -> Array:
    """bool [B, S, T]: which keys (positions k_pos [B, T], -1 empty) each query (q_pos [B, S])
    may attend to: not after the query, within the last `window` positions (itself included)
    or among the first `sinks` positions."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        recent = kp > qp - window
        mask &= (recent | (kp < sinks)) if sinks else recent
    return mask


def _segment_mask(q_pos: Array, pos: Array, window: int | None, sinks: int) -> Array:
    """bool [B, n, 1, S, T]: the mask of queries q_pos [B, S] over a segment's positions,
    [B, T] (n = 1) or per KV head [B, N, T] (n = N, e.g. H2O, whose heads keep different
    tokens)."""
    if pos.ndim == 2:
        return attention_mask(q_pos, pos, window, sinks)[:, None, None]
    qp, kp = q_pos[:, None, :, None], pos[:, :, None, :]  # [B, 1, S, 1], [B, N, 1, T]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= (kp > qp - window) | (kp < sinks)
    return mask[:, :, None]


def _masked_values(v: Array, pos: Array, axis: int) -> Array:
    """v with the slots of no position (empty, stale, rolled back) zeroed: a masked score gives
    weight 0, but 0 * NaN is NaN, so a stale NaN must not reach the product."""
    shape = [1] * v.ndim
    if pos.ndim == 3:  # per KV head [B, N, T]
        shape[0], shape[1], shape[axis] = pos.shape
    else:
        shape[0], shape[axis] = pos.shape
    return jnp.where((pos >= 0).reshape(shape), v, jnp.zeros((), v.dtype))


def _segment_scores(
    q: Array, q_sink: Array | None, seg: Segment, score: Callable[[Array, Array], Array]
) -> Array:
    """Scores `score(q, keys)` of a segment's keys ([B, N, H, T]), the first `seg.sink_slots`
    slots scored with q_sink (the query at its cache position) instead."""
    s = score(q, seg.k)
    n = seg.sink_slots
    if n and q_sink is not None:
        s = jnp.concatenate([score(q_sink, seg.k[..., :n]), s[..., n:]], axis=-1)
    return s


def _dequantized(seg: Segment, dtype: object) -> Segment:
    """A segment with int8 storage as full-precision keys and values (for attention of many
    queries, where the scores outweigh one pass over the stored keys)."""
    if seg.k_scale is None:
        return seg
    return seg._replace(
        k=dequantize(seg.k, seg.k_scale, 3, dtype),
        v=dequantize(seg.v, seg.v_scale, 2, dtype),
        k_scale=None,
        v_scale=None,
    )


def _capped(s: Array, softcap: float | None) -> Array:
    """Scaled scores, soft-capped as softcap * tanh(s / softcap) (Gemma 2) when given."""
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def _einsum_scores(spec: str) -> Callable[[Array, Array], Array]:
    return lambda q, k: jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def _reduced_scores(q: Array, k: Array) -> Array:
    """Decode scores as multiply-reduce: q [B, N, G, H], k [B, N, H, T] -> [B, N, G, T]."""
    return jnp.sum(q.astype(jnp.float32)[..., None] * k[:, :, None].astype(jnp.float32), axis=3)


def _channel_scores(q: Array, k: Array, k_scale: Array) -> Array:
    """Decode scores over int8 keys with one scale per channel and group of slots: q
    [B, N, G, H], k [B, N, H, T], k_scale [B, N, H, T / group] -> [B, N, G, T]. The scales
    fold into the query, once per group: sum_h (q_h * s_h,g) k_h,t."""
    b, n, h, t = k.shape
    groups = k_scale.shape[3]
    qs = q.astype(jnp.float32)[..., None] * k_scale[:, :, None]  # [B, N, G, H, groups]
    kg = k.reshape(b, n, h, groups, t // groups)
    s = jnp.einsum("bngha,bnhar->bngar", qs, kg, preferred_element_type=jnp.float32)
    return s.reshape(*s.shape[:3], t)


def attend(
    q: Array,
    q_pos: Array,
    new: tuple[Array, Array],
    segments: Sequence[Segment] = (),
    window: int | None = None,
    sinks: int = 0,
    q_sink: Array | None = None,
    probs: bool = False,
    vote: int = 0,
    scale: float | None = None,
    softcap: float | None = None,
) -> Array | tuple[Array, Received]:
    """Grouped-query attention of q over the new tokens and the stored segments.

    q: [B, S, N, G, H] (N KV heads with G query heads each, head dim H); q_pos: [B, S].
    new: the new tokens' own (k, v), [B, S, N, H] each, at positions q_pos.
    segments: what the cache holds (see jaxkv.cache.Segment), read before this step's write.
    window / sinks: the mask (see `attention_mask`). q_sink: q rotated at each query's
    position within the cache (sinks at cache positions), used for the keys of positions
    < sinks; None: every key is scored with q.
    One float32 softmax runs over the scores of every part without concatenating them, so
    attention never reads the buffer being written: XLA can then update it in place.
    Returns [B, S, N, G, H], and with `probs` also what score-based eviction accumulates
    (`Received`: the probability each stored slot and each new token received, summed over
    the block's queries and each KV head's group of query heads), with `vote` > 0 also the
    same sums over the last `vote` positions of each row's block (SnapKV's observation
    window; blocks of many queries only). Scores are scaled by `scale` (default
    head_dim ** -0.5) and, with `softcap`, capped as softcap * tanh(score / softcap).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[1] == 1:
        qs = None if q_sink is None else q_sink[:, 0]
        res = _attend_one(
            q[:, 0], q_pos[:, 0], new, segments, window, sinks, qs, probs, scale, softcap
        )
        return (res[0][:, None], res[1]) if probs else res[:, None]
    segments = [_dequantized(seg, q.dtype) for seg in segments]  # many queries: worth it
    fusable = (
        q_sink is None
        and not probs
        and softcap is None
        and all(seg.pos.ndim == 2 for seg in segments)
    )
    impl = _fused_prefill(q.dtype) if fusable else None
    if impl is not None:
        try:
            return _attend_fused(q, q_pos, new, segments, window, sinks, impl, scale)
        except (NotImplementedError, ValueError, RuntimeError):
            if impl == "xla":
                raise
            # cuDNN refused this shape or dtype at trace time: jaxkv's own form below.
    k, v = new
    s = jnp.einsum("bsngh,btnh->bngst", q, k, preferred_element_type=jnp.float32)
    if q_sink is not None:  # the block's own sinks, seen from each query's cache position
        s_sink = jnp.einsum("bsngh,btnh->bngst", q_sink, k, preferred_element_type=jnp.float32)
        s = jnp.where((q_pos < sinks)[:, None, None, None, :], s_sink, s)
    mask = attention_mask(q_pos, q_pos, window, sinks)[:, None, None]
    scores = [jnp.where(mask, _capped(s * scale, softcap), _MASKED)]  # each [B, N, G, S, T]
    values = [(v, "bngst,btnh->bsngh")]
    for seg in segments:
        s = _segment_scores(q, q_sink, seg, _einsum_scores("bsngh,bnht->bngst"))
        mask = _segment_mask(q_pos, seg.pos, window, sinks)
        scores.append(jnp.where(mask, _capped(s * scale, softcap), _MASKED))
        values.append((_masked_values(seg.v, seg.pos, 2), "bngst,bnth->bsngh"))
    top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
    weights = [jnp.exp(s - top) for s in scores]
    denom = sum(jnp.sum(w, axis=-1, keepdims=True) for w in weights)
    out = 0.0
    for w, (val, spec) in zip(weights, values, strict=True):
        p = (w / denom).astype(val.dtype)
        out = out + jnp.einsum(spec, p, val, preferred_element_type=jnp.float32)
    if not probs:
        return out.astype(q.dtype)
    real = (q_pos >= 0)[:, None, None, :, None]  # [B, 1, 1, S, 1]: padding queries vote not
    got = [jnp.sum(jnp.where(real, w / denom, 0.0), axis=(2, 3)) for w in weights]
    if not vote:
        return out.astype(q.dtype), Received(got[1:], got[0])
    last = jnp.max(q_pos, axis=1, keepdims=True)  # [B, 1]: each row's newest position
    voter = ((q_pos >= 0) & (q_pos > last - vote))[:, None, None, :, None]
    votes = [jnp.sum(jnp.where(voter, w / denom, 0.0), axis=(2, 3)) for w in weights]
    return out.astype(q.dtype), Received(got[1:], got[0], votes[1:], votes[0])


def _attend_fused(
    q: Array,
    q_pos: Array,
    new: tuple[Array, Array],
    segments: Sequence[Segment],
    window: int | None,
    sinks: int,
    implementation: str,
    scale: float,
) -> Array:
    """`attend` through jax.nn.dot_product_attention: the stored segments (read before this
    step's write, as in `attend`) and the new keys side by side as one key sequence, with the
    position mask. Query head n * G + g uses KV head n, as jax's grouped attention does."""
    b, s, n, g, h = q.shape
    k, v = new
    ks, vs, ps = [], [], []
    for seg in segments:
        ks.append(seg.k.transpose(0, 3, 1, 2).astype(k.dtype))
        vs.append(_masked_values(seg.v, seg.pos, 2).transpose(0, 2, 1, 3).astype(v.dtype))
        ps.append(seg.pos)
    k = jnp.concatenate([*ks, k], axis=1)
    v = jnp.concatenate([*vs, v], axis=1)
    k_pos = jnp.concatenate([*ps, q_pos], axis=1)
    mask = attention_mask(q_pos, k_pos, window, sinks)
    # A padding query (position -1) sees nothing; let it see its own column, so no row of the
    # fused kernel is wholly masked (cuDNN may give NaN there). Its output is never stored.
    own = jnp.eye(s, dtype=bool)[None] & (q_pos < 0)[:, :, None]
    mask = mask.at[:, :, mask.shape[2] - s :].set(mask[:, :, mask.shape[2] - s :] | own)
    mask = mask[:, None]  # [B, 1, S, T]
    out = jax.nn.dot_product_attention(
        q.reshape(b, s, n * g, h), k, v, mask=mask, scale=scale, implementation=implementation
    )
    return out.reshape(b, s, n, g, h).astype(q.dtype)


def _attend_one(
    q: Array,
    q_pos: Array,
    new: tuple[Array, Array],
    segments: Sequence[Segment],
    window: int | None,
    sinks: int,
    q_sink: Array | None,
    probs: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
) -> Array | tuple[Array, Received]:
    """`attend` for one query per row (decode): q [B, N, G, H], q_pos [B]; returns
    [B, N, G, H] (and with `probs`, as `attend`: [B, N, T] per segment and [B, N, 1]). The
    token's own key is an elementwise product; the stored keys are two matrix products per KV
    head (or multiply-reduce, see DECODE_BY_REDUCTION)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32)
    k, v = new[0][:, 0, :, None, :], new[1][:, 0, :, None, :]  # [B, N, 1, H]
    s_new = _capped(jnp.sum(qf * k, axis=-1) * scale, softcap)
    s_new = jnp.where(q_pos[:, None, None] >= 0, s_new, _MASKED)
    if not segments:  # the row sees only itself (or, as padding, nothing: an average)
        out = jnp.broadcast_to(v, q.shape).astype(q.dtype)
        if not probs:
            return out
        own = jnp.where(q_pos >= 0, float(q.shape[2]), 0.0)  # each query head: probability 1
        return out, Received([], jnp.broadcast_to(own[:, None, None], (*q.shape[:2], 1)))
    by_reduction = _decode_by_reduction()
    scores, values = [], []
    for seg in segments:
        if seg.k_scale is not None:  # int4: unpacked to int8 (no float copy of the cache)
            seg = seg._replace(k=unpack(seg.k, 2), v=unpack(seg.v, 3))
        score = _reduced_scores if by_reduction else _einsum_scores("bngh,bnht->bngt")
        if seg.k_scale is not None and seg.k_scale.ndim == 4:  # keys per channel (KIVI)
            s = _channel_scores(q, seg.k, seg.k_scale)
        else:
            s = _segment_scores(q, q_sink, seg, score)
        if seg.k_scale is not None and seg.k_scale.ndim == 3:  # a scale per slot (and head)
            s = s * seg.k_scale[:, :, None, :]
        mask = _segment_mask(q_pos[:, None], seg.pos, window, sinks)[:, :, :, 0]  # [B,n,1,T]
        scores.append(jnp.where(mask, _capped(s * scale, softcap), _MASKED))
        values.append((seg.v, seg.v_scale))  # empty slots hold zeros (jaxkv.cache.base)
    top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1) for s in scores])
    top = jnp.maximum(top, s_new)  # [B, N, G]
    w_new = jnp.exp(s_new - top)
    denom = w_new
    o = w_new[..., None] * v.astype(jnp.float32)
    ws = []
    for s, (cv, v_scale) in zip(scores, values, strict=True):
        w = jnp.exp(s - top[..., None])
        ws.append(w)
        denom = denom + jnp.sum(w, axis=-1)
        if v_scale is not None:  # int8 values: each slot's scale folds into its weight
            w = w * v_scale[:, :, None, :]
        if by_reduction:
            o = o + jnp.sum(w[..., None] * cv[:, :, None].astype(jnp.float32), axis=3)
        else:
            wd = q.dtype if v_scale is not None else cv.dtype
            o = o + jnp.einsum(
                "bngt,bnth->bngh", w.astype(wd), cv, preferred_element_type=jnp.float32
            )
    out = (o / denom[..., None]).astype(q.dtype)
    if not probs:
        return out
    real = (q_pos >= 0)[:, None, None]  # [B, 1, 1]
    got = [jnp.sum(jnp.where(real[..., None], w / denom[..., None], 0.0), axis=2) for w in ws]
    return out, Received(got, jnp.sum(jnp.where(real, w_new / denom, 0.0), axis=2)[..., None])


def _rms(x: Array, scale: Array, eps: float, plus_one: bool = False) -> Array:
    """RMSNorm over the last axis in float32 (scaled by 1 + scale with `plus_one`, Gemma),
    returned in x's dtype."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    w = scale.astype(jnp.float32)
    return (h * (1.0 + w if plus_one else w)).astype(x.dtype)


def _narrower(a: int | None, b: int | None) -> int | None:
    """The smaller of two windows (None: no window)."""
    if a is None or b is None:
        return b if a is None else a
    return min(a, b)


class Attention(nn.Module):
    """Self-attention over the new tokens and, if given, the cached ones."""

    config: ModelConfig
    layer: int = 0

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        kv: LayerCache | None = None,
        plan: WritePlan | None = None,
        span: int | None = None,
    ) -> tuple[Array, LayerCache | None]:
        cfg = self.config
        g, hd = cfg.q_per_kv, cfg.head_dim
        w = self.param("qkv", _init, (cfg.d_model, cfg.n_kv_heads, g + 2, hd), jnp.float32)
        h = jnp.einsum("bsd,dngh->bsngh", x, w.astype(x.dtype))
        if cfg.qkv_bias:
            bias = self.param("qkv_bias", nn.initializers.zeros, (cfg.n_kv_heads, g + 2, hd))
            h = h + bias.astype(x.dtype)
        q, k, v = h[:, :, :, :g], h[:, :, :, g], h[:, :, :, g + 1]
        if cfg.qk_norm == "head":  # over head_dim, before the rotary embedding (Qwen3)
            one = cfg.norm_plus_one
            q = _rms(q, self.param("q_norm", nn.initializers.ones, (hd,)), cfg.norm_eps, one)
            k = _rms(k, self.param("k_norm", nn.initializers.ones, (hd,)), cfg.norm_eps, one)
        elif cfg.qk_norm == "flat":  # over every head's projection at once (OLMo 2)
            b, s_len = q.shape[:2]
            nq, nk = cfg.n_heads * hd, cfg.n_kv_heads * hd
            q_scale = self.param("q_norm", nn.initializers.ones, (nq,))
            k_scale = self.param("k_norm", nn.initializers.ones, (nk,))
            q = _rms(q.reshape(b, s_len, nq), q_scale, cfg.norm_eps).reshape(q.shape)
            k = _rms(k.reshape(b, s_len, nk), k_scale, cfg.norm_eps).reshape(k.shape)
        q_raw = q
        rope = cfg.layer_rope(self.layer)
        theta, scaling = cfg.layer_rope_base(self.layer)
        if rope:
            q = apply_rope(q, positions, theta, scaling)
            k = apply_rope(k, positions, theta, scaling)
        window, sinks, q_sink, segments = cfg.layer_window(self.layer), 0, None, ()
        if kv is not None:  # the new tokens see each other (causally) and what is stored
            window = _narrower(window, kv.window)
            sinks = kv.sinks
            segments = kv.segments(plan, span)
            if sinks and kv.sink_positions == "cache" and rope:
                in_cache = jnp.minimum(positions, sinks + window - 1)
                q_sink = apply_rope(q_raw, in_cache, theta, scaling)
        scored = getattr(kv, "needs_probs", False)  # score-based eviction (H2O, SnapKV)
        vote = getattr(kv, "vote_queries", 0)
        out = attend(
            q,
            positions,
            (k, v),
            segments,
            window,
            sinks,
            q_sink,
            scored,
            vote,
            cfg.attn_scale,
            cfg.attn_softcap,
        )
        if scored:
            out, probs = out
            kv = kv.write(k, v, plan, after=out[:, :, :, 0], probs=probs)
        elif kv is not None:  # stored after attention read the cache: updated in place
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
