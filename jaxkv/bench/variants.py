"""Alternative layer/cache layouts, kept only to measure them against the library's choice
(unrolled layers, one K and one V leaf per layer, keys stored transposed: see jaxkv.cache).

- "scan": layers under `lax.scan` with stacked params, K/V stacked as [layers, ...] and carried
  through the scan, written in place at (layer, slot).
- "stacked": unrolled layers, but K/V stacked as above (one leaf each for all layers).
- "token_major": the library's own decode step, but K and V stored token-major,
  [B, capacity, n_kv_heads, head_dim] (jaxkv's layout before 2026-11-29); attention reads them
  transposed into the layout it multiplies with.

All reuse the library's Block and the cache's write protocol: `StackedLayerKV` and
`TokenMajorLayerKV` are drop-ins for `LayerKV`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv.cache import KVCache, LayerKV, Segment, WritePlan
from jaxkv.cache.base import K_FROM_PROJECTION as _K_FROM_PROJECTION
from jaxkv.cache.base import K_SLOT_AXIS as _K_SLOT_AXIS
from jaxkv.cache.base import V_FROM_PROJECTION as _V_FROM_PROJECTION
from jaxkv.cache.base import V_SLOT_AXIS as _V_SLOT_AXIS
from jaxkv.cache.base import ordered_after as _after
from jaxkv.cache.base import write_slots as _write_slots
from jaxkv.config import ModelConfig
from jaxkv.layers import Norm
from jaxkv.model import Block, Params


class _DenseMask:
    """What attention asks of a dense layer kind: no window of its own, no sinks, and the
    first `span` slots as one segment."""

    window = None
    sinks = 0
    sink_positions = "original"

    def segments(self, plan: WritePlan, span: int | None) -> tuple[Segment, ...]:
        span = self.capacity if span is None else span
        if span == 0:
            return ()
        return (Segment(*self.read(span), plan.cached_positions(span)),)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedLayerKV(_DenseMask):
    """Layer `layer` of K/V buffers stacked over layers: [L, *LayerKV's layout]."""

    k: jax.Array
    v: jax.Array
    layer: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[1 + _K_SLOT_AXIS]

    def write(
        self, k_new: jax.Array, v_new: jax.Array, plan: WritePlan, after: jax.Array | None = None
    ) -> StackedLayerKV:
        def put(buf: jax.Array, new: jax.Array, perm: tuple[int, ...], axis: int) -> jax.Array:
            new = new.transpose(perm)
            dep = None if after is None else after.transpose(perm)
            start = [self.layer] + [0] * new.ndim
            start[1 + axis] = plan.index
            old = lax.dynamic_slice(buf, start, (1, *new.shape))[0]
            shape = [1] * new.ndim
            shape[0], shape[axis] = plan.valid.shape
            update = jnp.where(plan.valid.reshape(shape), _after(new.astype(buf.dtype), dep), old)
            return lax.dynamic_update_slice(buf, update[None], start)

        return StackedLayerKV(
            put(self.k, k_new, _K_FROM_PROJECTION, _K_SLOT_AXIS),
            put(self.v, v_new, _V_FROM_PROJECTION, _V_SLOT_AXIS),
            self.layer,
        )

    def read(self, span: int) -> tuple[jax.Array, jax.Array]:
        def get(buf: jax.Array, axis: int) -> jax.Array:
            shape = [1, *buf.shape[1:]]
            shape[1 + axis] = span
            return lax.dynamic_slice(buf, (self.layer,) + (0,) * (buf.ndim - 1), shape)[0]

        return get(self.k, _K_SLOT_AXIS), get(self.v, _V_SLOT_AXIS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenMajorLayerKV(_DenseMask):
    """One layer's K and V stored token-major: [B, capacity, n_kv_heads, head_dim] each."""

    k: jax.Array
    v: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def write(
        self, k_new: jax.Array, v_new: jax.Array, plan: WritePlan, after: jax.Array | None = None
    ) -> TokenMajorLayerKV:
        return TokenMajorLayerKV(
            k=_write_slots(self.k, k_new, plan.index, plan.valid, 1, after),
            v=_write_slots(self.v, v_new, plan.index, plan.valid, 1, after),
        )

    def read(self, span: int) -> tuple[jax.Array, jax.Array]:
        k, v = self.k[:, :span], self.v[:, :span]
        return k.transpose(_K_FROM_PROJECTION), v.transpose(_V_FROM_PROJECTION)


def token_major_cache(cache: KVCache) -> KVCache:
    """The same cache with every layer's K and V stored token-major."""
    layers = tuple(
        TokenMajorLayerKV(k=layer.k.transpose(0, 3, 1, 2), v=layer.v.transpose(0, 2, 1, 3))
        for layer in cache.layers
    )
    return dataclasses.replace(cache, layers=layers)


def stack_params(params: Params, config: ModelConfig) -> Params:
    layers = [params[f"layers_{i}"] for i in range(config.n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def stack_cache(cache: KVCache) -> KVCache:
    """The same cache with all layers' K (and V) in one [L, ...] leaf."""
    k = jnp.stack([layer.k for layer in cache.layers])
    v = jnp.stack([layer.v for layer in cache.layers])
    return dataclasses.replace(cache, layers=(LayerKV(k=k, v=v),))


def _head(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    x = Norm(config).apply({"params": params["final_norm"]}, x)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    return jnp.einsum("bsd,dv->bsv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "span", "scan"), donate_argnames=("cache",))
def decode_step_stacked(
    params: Params, cache: KVCache, tokens: jax.Array, *, config: ModelConfig, span: int, scan: bool
) -> tuple[jax.Array, KVCache]:
    """One decode step over a stacked cache (see stack_cache), with layers under lax.scan
    (`scan=True`, params from stack_params) or unrolled."""
    positions = cache.lengths[:, None]
    plan = cache.plan_write(positions)
    x = jnp.take(params["embed"], tokens[:, None], axis=0).astype(config.jnp_dtype)
    k_all, v_all = cache.layers[0].k, cache.layers[0].v
    block = Block(config)
    if scan:

        def body(carry: tuple, layer: tuple) -> tuple:
            x, k_all, v_all = carry
            p, i = layer
            kv = StackedLayerKV(k_all, v_all, i)
            x, kv = block.apply({"params": p}, x, positions, kv, plan, span)
            return (x, kv.k, kv.v), None

        idx = jnp.arange(config.n_layers)
        (x, k_all, v_all), _ = lax.scan(body, (x, k_all, v_all), (params["layers"], idx))
    else:
        for i in range(config.n_layers):
            kv = StackedLayerKV(k_all, v_all, jnp.int32(i))
            x, kv = block.apply({"params": params[f"layers_{i}"]}, x, positions, kv, plan, span)
            k_all, v_all = kv.k, kv.v
    logits = _head(params, config, x)[:, 0]
    return logits, cache.commit(plan, (LayerKV(k=k_all, v=v_all),), after=x[..., 0])


def layout_step_times(
    config: ModelConfig, params: Params, position: int, capacity: int, n_steps: int
) -> dict[str, float]:
    """Isolated seconds per decode step of the alternative layouts, batch 1."""
    from jaxkv.bench.common import isolated_step_time, synthetic_state, time_donating_steps
    from jaxkv.prefill import attention_span

    span = attention_span(position + n_steps, capacity)
    out = {}
    stacked_params = stack_params(params, config)
    tokens = jnp.zeros((1,), jnp.int32)
    for name, scan in (("scan_layers_stacked_cache", True), ("unrolled_stacked_cache", False)):
        cache = stack_cache(synthetic_state(config, 1, position, capacity).cache)
        p = stacked_params if scan else params
        step = lambda c, p=p, scan=scan: decode_step_stacked(
            p, c, tokens, config=config, span=span, scan=scan
        )
        out[name] = time_donating_steps(step, cache, n_steps)
    # The library's own step runs any cache whose layers keep the write/read protocol.
    state = synthetic_state(config, 1, position, capacity)
    state = dataclasses.replace(state, cache=token_major_cache(state.cache))
    out["unrolled_token_major_cache"] = isolated_step_time(params, config, state, n_steps, span)
    return out
