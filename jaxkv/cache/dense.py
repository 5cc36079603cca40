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
    write_slots,
)

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """Keys and values of one layer, one slot per token: k `[batch, n_kv_heads, head_dim,
    capacity]`, v `[batch, n_kv_heads, capacity, head_dim]`."""

    k: Array
    v: Array
    window = None
    sinks = 0
    sink_positions = "original"

    @classmethod
    def zeros(
        cls, batch_size: int, capacity: int, n_kv_heads: int, head_dim: int, dtype: Any
    ) -> DenseLayer:
        return cls(*kv_zeros(batch_size, capacity, n_kv_heads, head_dim, dtype))

    @property
    def slots(self) -> int:
        return self.k.shape[K_SLOT_AXIS]

    def segments(self, plan: WritePlan, span: int | None) -> tuple[Segment, ...]:
        """The first `span` slots (all if None), masked by the shared position table."""
        span = self.slots if span is None else span
        if span == 0:
            return ()
        k, v = (self.k, self.v) if span == self.slots else self.read(span)
        return (Segment(k, v, plan.cached_positions(span)),)

    def read(self, span: int) -> tuple[Array, Array]:
        """Stored keys and values of the first `span` slots."""
        return self.k[..., :span], self.v[:, :, :span]

    def write(
        self, k_new: Array, v_new: Array, plan: WritePlan, after: Array | None = None
    ) -> DenseLayer:
        """Store the new keys and values at slots [plan.index, plan.index + S)."""

        def put(buf: Array, new: Array, perm: tuple[int, ...], axis: int) -> Array:
            dep = None if after is None else after.transpose(perm)
            return write_slots(buf, new.transpose(perm), plan.index, plan.valid, axis, dep)

        return DenseLayer(
            k=put(self.k, k_new, K_FROM_PROJECTION, K_SLOT_AXIS),
            v=put(self.v, v_new, V_FROM_PROJECTION, V_SLOT_AXIS),
        )

    def reset(self) -> DenseLayer:
        """Every slot empty (the shared table says so); values zeroed in place, so no stale
        value (even a NaN) can reach a decode step's p @ V (see jaxkv.cache.base)."""
        return DenseLayer(k=self.k, v=jnp.zeros_like(self.v))

    def truncate(self, keep: Array, table: Array) -> DenseLayer:
        """Forget positions >= keep[b] (`table`: the shared position table before); their
        values are zeroed."""
        freed = table >= keep[:, None]
        return DenseLayer(k=self.k, v=jnp.where(freed[:, None, :, None], 0, self.v))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": tuple(self.k.shape), "v": tuple(self.v.shape)}


LayerKV = DenseLayer  # the name of the first stage
