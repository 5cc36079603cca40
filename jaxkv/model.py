"""The decoder-only transformer (Flax Linen) and its uncached reference `forward`.

The model is a pure function of (params, tokens, positions, cache): the cache goes in as an
argument and comes back as a return value. Layers are unrolled in Python, each with its own
cache leaves (faster than `lax.scan` over stacked layers on GPU; see BENCHMARKS.md).

Param tree (a plain nested dict):
    embed [vocab, d_model]; pos_embed [max_seq_len, d_model] (learned positions only)
    layers_{i}/attn_norm?, attn/{qkv, o, qkv_bias?, o_bias?, q_norm?, k_norm?}, attn_post_norm?,
        mlp_norm?, mlp/{wi, wo, bi?, bo?}, mlp_post_norm? (see ModelConfig.block_norms)
    final_norm/{scale, bias?}; lm_head [d_model, vocab] (untied only)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import checks
from jaxkv.attention import Attention
from jaxkv.cache import KVCache, LayerCache, WritePlan
from jaxkv.config import ModelConfig
from jaxkv.layers import Mlp, Norm

Array = jax.Array
Params = dict[str, Any]
_init = nn.initializers.normal(stddev=0.02)


class Block(nn.Module):
    """Transformer block: x + attn(norm(x)), then x + mlp(norm(x)) ("pre" norms), or with the
    norms after each sublayer ("post": x + norm(attn(x))) or on both sides ("both")."""

    config: ModelConfig
    layer: int = 0

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        kv: LayerCache | None,
        plan: WritePlan | None,
        span: int | None,
    ) -> tuple[Array, LayerCache | None]:
        cfg = self.config
        pre, post = cfg.block_norms in ("pre", "both"), cfg.block_norms in ("post", "both")
        h = Norm(cfg, name="attn_norm")(x) if pre else x
        h, kv = Attention(cfg, self.layer, name="attn")(h, positions, kv, plan, span)
        x = x + (Norm(cfg, name="attn_post_norm")(h) if post else h)
        h = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x) if pre else x)
        x = x + (Norm(cfg, name="mlp_post_norm")(h) if post else h)
        return x, kv


class Transformer(nn.Module):
    """Token ids and positions in, float32 logits (and the updated cache) out.

    tokens: int [B, S]; positions: int [B, S], -1 marks a token that is padding (it is not
    stored in the cache and nothing attends to it). With a cache, the new tokens' keys and
    values are written into it and attention covers its first `span` slots (all if None).
    `logits_at` ([B] column indices) computes logits for one column per row only.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array,
        cache: KVCache | None = None,
        span: int | None = None,
        logits_at: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        cfg = self.config
        dtype = cfg.jnp_dtype
        embed = self.param("embed", _init, (cfg.vocab_size, cfg.d_model), jnp.float32)
        x = jnp.take(embed, tokens, axis=0).astype(dtype)
        if cfg.embed_scale:  # sqrt(d_model), rounded to the activation dtype (as Gemma)
            x = x * jnp.asarray(cfg.d_model**0.5, dtype)
        if cfg.position == "learned":
            table = self.param("pos_embed", _init, (cfg.max_seq_len, cfg.d_model), jnp.float32)
            x = x + jnp.take(table, jnp.maximum(positions, 0), axis=0).astype(dtype)
        plan = cache.plan_write(positions) if cache is not None else None
        layers = []
        for i in range(cfg.n_layers):
            kv = cache.layers[i] if cache is not None else None
            x, kv = Block(cfg, i, name=f"layers_{i}")(x, positions, kv, plan, span)
            layers.append(kv)
        x = Norm(cfg, name="final_norm")(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
        if cfg.tie_embeddings:
            head = embed.T
        else:
            head = self.param("lm_head", _init, (cfg.d_model, cfg.vocab_size), jnp.float32)
        logits = jnp.einsum(
            "bsd,dv->bsv", x, head.astype(dtype), preferred_element_type=jnp.float32
        )
        if cfg.final_softcap is not None:
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        new_cache = None
        if cache is not None:  # the position table is updated after every layer read it
            new_cache = cache.commit(plan, tuple(layers), after=x[..., 0])
        return logits, new_cache


def init_params(config: ModelConfig, key: Array, dtype: Any = None) -> Params:
    """Random params for `config` (normal(0.02) matrices, unit norms), cast to `dtype`
    (default: config.dtype)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(lambda k: Transformer(config).init(k, tokens, tokens)["params"])(key)
    return cast_params(params, dtype or config.dtype)


def cast_params(params: Params, dtype: Any) -> Params:
    """Params with every floating array cast to `dtype`."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )


def apply(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    positions: Array,
    cache: KVCache | None = None,
    span: int | None = None,
    logits_at: Array | None = None,
) -> tuple[Array, KVCache | None]:
    """Run the model (traceable; no validation). See `Transformer`."""
    return Transformer(config).apply({"params": params}, tokens, positions, cache, span, logits_at)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params: Params, config: ModelConfig, tokens: Array, positions: Array) -> Array:
    return apply(params, config, tokens, positions)[0]


def forward(params: Params, config: ModelConfig, tokens: Any, positions: Any = None) -> Array:
    """Full causal forward with no cache: logits float32 [B, S, vocab] for every position.

    This is the reference every cached path is tested against. `tokens` is int [B, S] (all
    rows the same length); `positions` defaults to 0..S-1 for every row (-1 marks padding).
    """
    rows = checks.token_rows(tokens, config.vocab_size)
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(
            f"forward needs rows of one length, got lengths {sorted(lengths)}; pad them and "
            "pass positions with -1 for padding"
        )
    tokens = np.stack(rows).astype(np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    positions = np.asarray(positions, dtype=np.int32)
    if positions.shape != tokens.shape:
        raise ValueError(f"positions shape {positions.shape} != tokens shape {tokens.shape}")
    if config.position == "learned" and positions.max() >= config.max_seq_len:
        raise ValueError(
            f"position {int(positions.max())} is beyond max_seq_len {config.max_seq_len}"
        )
    return _forward(params, config, jnp.asarray(tokens), jnp.asarray(positions))
