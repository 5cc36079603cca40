"""The dense kind: every token of a row gets its own slot until the capacity is reached.

Layout (measured against token-major and stacked layouts, see BENCHMARKS.md): k
`[batch, n_kv_heads, head_dim, capacity]` (keys stored transposed) and v
`[batch, n_kv_heads, capacity, head_dim]`, so decode attention is two plain matrix products
per KV head with no transpose of the stored data.

All rows write the same slot range (the cache's shared `index`; prompts are left-padded so
their last tokens line up), so each write is one `lax.dynamic_update_slice` per leaf. The
positions of the slots live in the cache's shared table (`KVCache.positions`), which every
dense layer reads through the write plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxkv.cache.base import (
    K_FROM_PROJECTION,
    K_SLOT_AXIS,
    V_FROM_PROJECTION,
    V_SLOT_AXIS,
    Segment,
    WritePlan,
    kv_zeros,
    store,
    write_slots,
    zero_values,
)

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """Keys and values of one layer, one slot per token: k `[batch, n_kv_heads, head_dim,
    capacity]`, v `[batch, n_kv_heads, capacity, head_dim]`."""

    k: Array
    v: Array
    k_scale: Array | None = None  # [B, N, capacity] with int8 storage
    v_scale: Array | None = None
    window = None
    sinks = 0
    sink_positions = "original"

    @classmethod
    def zeros(
        cls, batch_size: int, capacity: int, n_kv_heads: int, head_dim: int, dtype: Any
    ) -> DenseLayer:
        return cls(**kv_zeros(batch_size, capacity, n_kv_heads, head_dim, dtype))

    @property
    def slots(self) -> int:
        return self.k.shape[K_SLOT_AXIS]

    def segments(self, plan: WritePlan, span: int | None) -> tuple[Segment, ...]:
        """The first `span` slots (all if None), masked by the shared position table."""
        span = self.slots if span is None else span
        if span == 0:
            return ()
        if span == self.slots:
            return (Segment(self.k, self.v, plan.cached_positions(span), 0, *self.scales()),)
        scales = [None if x is None else x[..., :span] for x in self.scales()]
        return (Segment(*self.read(span), plan.cached_positions(span), 0, *scales),)

    def scales(self) -> tuple[Array | None, Array | None]:
        return self.k_scale, self.v_scale

    def read(self, span: int) -> tuple[Array, Array]:
        """Stored keys and values of the first `span` slots."""
        return self.k[..., :span], self.v[:, :, :span]

    def write(
        self, k_new: Array, v_new: Array, plan: WritePlan, after: Array | None = None
    ) -> DenseLayer:
        """Store the new keys and values at slots [plan.index, plan.index + S)."""
        quantized = self.k_scale is not None
        (k_new, k_scale), (v_new, v_scale) = store(k_new, self.k), store(v_new, self.v)
        if after is not None:  # shaped like what is stored (int4 packs head_dim in halves)
            after = after[..., : k_new.shape[-1]]

        def put(buf: Array, new: Array, perm: tuple[int, ...], axis: int) -> Array:
            dep = None if after is None else after.transpose(perm)
            return write_slots(buf, new.transpose(perm), plan.index, plan.valid, axis, dep)

        out = DenseLayer(
            k=put(self.k, k_new, K_FROM_PROJECTION, K_SLOT_AXIS),
            v=put(self.v, v_new, V_FROM_PROJECTION, V_SLOT_AXIS),
        )
        if not quantized:
            return out
        dep = None if after is None else after[..., 0].transpose(0, 2, 1)

        def put_scale(buf: Array, new: Array) -> Array:  # [B, S, N] into [B, N, capacity]
            return write_slots(buf, new.transpose(0, 2, 1), plan.index, plan.valid, 2, dep)

        return dataclasses.replace(
            out, k_scale=put_scale(self.k_scale, k_scale), v_scale=put_scale(self.v_scale, v_scale)
        )

    def reset(self) -> DenseLayer:
        """Every slot empty (the shared table says so); values zeroed in place, so no stale
        value (even a NaN) can reach a decode step's p @ V (see jaxkv.cache.base)."""
        return dataclasses.replace(
            self, **zero_values(self, jnp.ones((self.v.shape[0], self.slots), bool))
        )

    def truncate(self, keep: Array, table: Array) -> DenseLayer:
        """Forget positions >= keep[b] (`table`: the shared position table before); their
        values are zeroed."""
        return dataclasses.replace(self, **zero_values(self, table >= keep[:, None]))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": tuple(self.k.shape), "v": tuple(self.v.shape)}


LayerKV = DenseLayer  # the name of the first stage
