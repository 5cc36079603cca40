"""The ring kind: a sliding window of the last `window` tokens, optionally behind
`sinks` attention sinks (StreamingLLM), in `sinks + window` slots whatever the length.

Slots are chosen per row from the token's position: position p < sinks goes to slot p (kept
forever), any other to slot sinks + (p - sinks) % window, which overwrites the token `window`
positions older. A block of new tokens (a prefill chunk) stores only each row's last `window`
tokens (and its sinks), so no two tokens of one write share a slot. Writes are per-row
scatters ordered after attention's read: in place, no cache-sized copy.

Positions: keys are stored rotated at their original positions. Inside the window, a
query's distance to every key is then what it would be at positions within the cache (the
window is contiguous), so only the sinks differ: with `sink_positions="cache"` attention
scores the sink slots with the query rotated at its position within the cache,
min(position, sinks + window - 1) (StreamingLLM: the kept tokens at positions
0..sinks+window-1); with "original" it uses the original positions throughout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxkv.cache.base import (
    K_SLOT_AXIS,
    Segment,
    WritePlan,
    kv_zeros,
    ordered_after,
    scatter_slots,
    store,
    zero_values,
)

Array = jax.Array
SINK_POSITIONS = ("cache", "original")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingLayer:
    """k `[B, N, H, sinks + window]`, v `[B, N, sinks + window, H]`, pos int32
    `[B, sinks + window]` (the position in each slot, -1: empty)."""

    k: Array
    v: Array
    pos: Array
    k_scale: Array | None = None  # [B, N, slots] with int8 storage
    v_scale: Array | None = None
    window: int = dataclasses.field(metadata=dict(static=True), default=1)
    sinks: int = dataclasses.field(metadata=dict(static=True), default=0)
    sink_positions: str = dataclasses.field(metadata=dict(static=True), default="cache")

    @classmethod
    def zeros(
        cls,
        batch_size: int,
        window: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: Any,
        sinks: int = 0,
        sink_positions: str = "cache",
        spec: Any = None,
    ) -> RingLayer:
        slots = sinks + window
        return cls(
            **kv_zeros(batch_size, slots, n_kv_heads, head_dim, dtype, spec),
            pos=jnp.full((batch_size, slots), -1, jnp.int32),
            window=window,
            sinks=sinks,
            sink_positions=sink_positions,
        )

    @property
    def slots(self) -> int:
        return self.k.shape[K_SLOT_AXIS]

    def segments(self, plan: WritePlan, span: int | None) -> tuple[Segment, ...]:
        """Every slot (span 0: the cache is known to be empty, nothing to read)."""
        if span == 0:
            return ()
        sink_slots = self.sinks if self.sink_positions == "cache" else 0
        return (Segment(self.k, self.v, self.pos, sink_slots, self.k_scale, self.v_scale),)

    def slot_of(self, positions: Array, valid: Array) -> Array:
        """int32 [B, S]: the slot of each new token, or `slots` (dropped) for a token not
        stored: invalid, or overwritten by a later token of the same block."""
        s, w = self.sinks, self.window
        last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
        keep = valid & ((positions < s) | (positions > last - w))
        slot = jnp.where(positions < s, positions, s + (positions - s) % w)
        return jnp.where(keep, slot, self.slots).astype(jnp.int32)

    def write(
        self, k_new: Array, v_new: Array, plan: WritePlan, after: Array | None = None
    ) -> RingLayer:
        slots = self.slot_of(plan.positions, plan.valid)
        pos_dep = None if after is None else after[:, :, 0, 0]
        rows = jnp.arange(self.pos.shape[0])[:, None]
        pos = self.pos.at[rows, slots].set(ordered_after(plan.positions, pos_dep), mode="drop")
        quantized = self.k_scale is not None
        (k_new, k_scale) = store(k_new, self.k, self.k_scale)
        (v_new, v_scale) = store(v_new, self.v, self.v_scale)
        if after is not None:  # shaped like what is stored (int4 packs head_dim in halves)
            after = after[..., : k_new.shape[-1]]
        out = dataclasses.replace(
            self,
            k=scatter_slots(self.k, k_new, slots, 3, after),
            v=scatter_slots(self.v, v_new, slots, 2, after),
            pos=pos,
        )
        if not quantized:
            return out
        dep = None if after is None else after[..., : k_scale.shape[-1], 0]  # [B, S, n]
        return dataclasses.replace(
            out,
            k_scale=scatter_slots(self.k_scale, k_scale, slots, 2, dep),
            v_scale=scatter_slots(self.v_scale, v_scale, slots, 2, dep),
        )

    def reset(self) -> RingLayer:
        """Every slot empty, values zeroed (see jaxkv.cache.base)."""
        everything = jnp.ones(self.pos.shape, bool)
        return dataclasses.replace(
            self, **zero_values(self, everything), pos=jnp.full_like(self.pos, -1)
        )

    def truncate(self, keep: Array, table: Array | None = None) -> RingLayer:
        """Forget positions >= keep[b]; their values are zeroed."""
        freed = self.pos >= keep[:, None]
        return dataclasses.replace(
            self, **zero_values(self, freed), pos=jnp.where(freed, -1, self.pos)
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": tuple(self.k.shape), "v": tuple(self.v.shape), "pos": tuple(self.pos.shape)}
