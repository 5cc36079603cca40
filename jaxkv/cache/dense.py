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
from jax import lax

from jaxkv.cache.base import (
    K_FROM_PROJECTION,
    K_SLOT_AXIS,
    V_FROM_PROJECTION,
    V_SLOT_AXIS,
    Segment,
    WritePlan,
    kv_zeros,
    ordered_after,
    store,
    write_slots,
    zero_values,
)
from jaxkv.cache.quant import KVQuant, dequantize, packed, quantize, quantize_channels

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """Keys and values of one layer, one slot per token: k `[batch, n_kv_heads, head_dim,
    capacity]`, v `[batch, n_kv_heads, capacity, head_dim]`."""

    k: Array
    v: Array
    k_scale: Array | None = None  # with quantized storage (layouts: jaxkv.cache.quant)
    v_scale: Array | None = None
    k_res: Array | None = None  # [B, N, H, group]: the group being filled, full precision
    v_res: Array | None = None  # [B, N, group, H]
    res_pos: Array | None = None  # int32 [B, group]: the positions the copy holds (-1: none)
    group: int = dataclasses.field(metadata=dict(static=True), default=0)
    residual: bool = dataclasses.field(metadata=dict(static=True), default=False)
    window = None
    sinks = 0
    sink_positions = "original"

    @classmethod
    def zeros(
        cls,
        batch_size: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: Any,
        spec: KVQuant | None = None,
        residual_dtype: Any = jnp.float32,
    ) -> DenseLayer:
        """An empty layer; with a grouped quantized layout (`spec.grouped`: KIVI keys or a
        residual) the capacity must be a multiple of `spec.group`."""
        out = kv_zeros(batch_size, capacity, n_kv_heads, head_dim, dtype, spec)
        if spec is None or not spec.grouped:
            return cls(**out)
        r = spec.group
        if capacity % r:
            raise ValueError(f"capacity {capacity} is not a multiple of the group {r}")
        return cls(
            **out,
            k_res=jnp.zeros((batch_size, n_kv_heads, head_dim, r), residual_dtype),
            v_res=jnp.zeros((batch_size, n_kv_heads, r, head_dim), residual_dtype),
            res_pos=jnp.full((batch_size, r), -1, jnp.int32),
            group=r,
            residual=spec.residual,
        )

    @property
    def slots(self) -> int:
        return self.k.shape[K_SLOT_AXIS]

    def _group_start(self, index: Array) -> Array:
        """First slot of the group being filled at `index` (the last group when full)."""
        r = self.group
        return jnp.minimum((index // r) * r, self.slots - r)

    def segments(self, plan: WritePlan, span: int | None) -> tuple[Segment, ...]:
        """The first `span` slots (all if None), masked by the shared position table; with a
        residual, the group being filled is read from its full-precision copy instead."""
        span = self.slots if span is None else span
        if span == 0:
            return ()
        if self.group:  # whole groups (KIVI key scales cover a group each)
            span = min(self.slots, -(-span // self.group) * self.group)
        pos = plan.cached_positions(span)
        if span == self.slots:
            seg = Segment(self.k, self.v, pos, 0, *self.scales())
        else:
            ks, vs = self.scales()
            if ks is not None:
                ks = ks[..., : span // self.group] if ks.ndim == 4 else ks[..., :span]
                vs = vs[..., :span]
            seg = Segment(*self.read(span), pos, 0, ks, vs)
        if not self.residual:
            return (seg,)
        start = self._group_start(plan.index)
        quantized = jnp.where(jnp.arange(span)[None] < start, pos, -1)
        # The copy is of the group being filled, or (full cache) of the last group; right
        # after a group completes it holds that group, now read from the store.
        stale = (plan.index % self.group == 0) & (plan.index < self.slots)
        held = jnp.where(stale, -1, self.res_pos)
        return (seg._replace(pos=quantized), Segment(self.k_res, self.v_res, held))

    def scales(self) -> tuple[Array | None, Array | None]:
        return self.k_scale, self.v_scale

    def read(self, span: int) -> tuple[Array, Array]:
        """Stored keys and values of the first `span` slots."""
        return self.k[..., :span], self.v[:, :, :span]

    def write(
        self, k_new: Array, v_new: Array, plan: WritePlan, after: Array | None = None
    ) -> DenseLayer:
        """Store the new keys and values at slots [plan.index, plan.index + S)."""
        if self.group:
            return self._write_grouped(k_new, v_new, plan, after)
        quantized = self.k_scale is not None
        (k_new, k_scale) = store(k_new, self.k, self.k_scale)
        (v_new, v_scale) = store(v_new, self.v, self.v_scale)
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

        def put_scale(buf: Array, new: Array) -> Array:  # [B, S, n] into [B, n, capacity]
            d = None if dep is None else dep[:, : new.shape[2]]
            return write_slots(buf, new.transpose(0, 2, 1), plan.index, plan.valid, 2, d)

        return dataclasses.replace(
            out, k_scale=put_scale(self.k_scale, k_scale), v_scale=put_scale(self.v_scale, v_scale)
        )

    def _write_grouped(
        self, k_new: Array, v_new: Array, plan: WritePlan, after: Array | None
    ) -> DenseLayer:
        """The write of a layer that keeps the group being filled in full precision: the
        region from that group's first slot to the end of the last group the new tokens
        reach (its earlier tokens from the full-precision copy, then the new ones) is
        quantized whole and stored, so the group's scales (per channel with KIVI) cover
        every token it holds; the full-precision copy moves to the last group written."""
        r, i, s = self.group, plan.index, k_new.shape[1]
        off, first = i % r, i - i % r
        length = r * -(-(r - 1 + s) // r)  # static: every group the write can reach
        kt = k_new.transpose(K_FROM_PROJECTION).astype(self.k_res.dtype)  # [B, N, H, S]
        vt = v_new.transpose(V_FROM_PROJECTION).astype(self.v_res.dtype)  # [B, N, S, H]
        b, n, h = kt.shape[:3]
        kr = jnp.zeros((b, n, h, length), kt.dtype).at[..., :r].set(self.k_res)
        vr = jnp.zeros((b, n, length, h), vt.dtype).at[:, :, :r].set(self.v_res)
        kr = lax.dynamic_update_slice_in_dim(kr, kt, off, axis=3)
        vr = lax.dynamic_update_slice_in_dim(vr, vt, off, axis=2)
        # Positions of the region's slots: the copy's before `off` (the copy holds the group
        # being filled; at off == 0 nothing of it), then the new tokens'.
        before = jnp.where(jnp.arange(r)[None] < off, self.res_pos, -1)
        pos = jnp.pad(before, ((0, 0), (0, length - r)), constant_values=-1)
        new_pos = jnp.where(plan.valid, plan.positions, -1)
        pos = lax.dynamic_update_slice_in_dim(pos, new_pos, off, axis=1)  # [B, length]
        ok = pos >= 0
        kr = jnp.where(ok[:, None, None, :], kr, 0)
        vr = jnp.where(ok[:, None, :, None], vr, 0)
        pack = packed(self.k.dtype)
        if self.k_scale.ndim == 4:  # KIVI: keys per channel and group
            kq, ks = quantize_channels(kr, r, pack)
        else:
            shared = self.k_scale.shape[1] == 1
            kq, ks = quantize(kr.transpose(0, 3, 1, 2), pack, shared)  # [B, L, N, H]
            kq, ks = kq.transpose(K_FROM_PROJECTION), ks.transpose(0, 2, 1)
        vq, vs = quantize(vr.transpose(0, 2, 1, 3), pack, self.v_scale.shape[1] == 1)
        vq, vs = vq.transpose(V_FROM_PROJECTION), vs.transpose(0, 2, 1)
        dep = None if after is None else after[:, 0, :, :1, None]  # [B, N, 1, 1]
        slots = first + jnp.arange(length)  # past the capacity: dropped

        def put(buf: Array, new: Array, index: Array, axis: int) -> Array:
            d = dep if new.ndim == 4 else (None if dep is None else dep[..., 0])
            value = ordered_after(new, None if d is None else d[:, : new.shape[1]])
            where = (slice(None),) * axis + (index,)
            return buf.at[where].set(value.astype(buf.dtype), mode="drop")

        groups = first // r + jnp.arange(length // r)
        # The copy moves to the group of the last column any row stored (trailing padding
        # columns store nothing, and the shared index moves past `used` columns only, as in
        # KVCache.commit); a write that stores nothing (a full cache, every row paused) keeps
        # the copy as it is.
        used = jnp.max(jnp.where(plan.valid, jnp.arange(1, s + 1, dtype=jnp.int32), 0))
        last = jnp.maximum(off + used - 1, 0) // r * r
        stored = used > 0

        def moved(old: Array, region: Array, axis: int) -> Array:
            return jnp.where(stored, lax.dynamic_slice_in_dim(region, last, r, axis=axis), old)

        return dataclasses.replace(
            self,
            k=put(self.k, kq, slots, 3),
            v=put(self.v, vq, slots, 2),
            k_scale=put(self.k_scale, ks, groups if ks.ndim == 4 else slots, ks.ndim - 1),
            v_scale=put(self.v_scale, vs, slots, 2),
            k_res=moved(self.k_res, kr, 3),
            v_res=moved(self.v_res, vr, 2),
            res_pos=moved(self.res_pos, pos, 1),
        )

    def reset(self) -> DenseLayer:
        """Every slot empty (the shared table says so); values zeroed in place, so no stale
        value (even a NaN) can reach a decode step's p @ V (see jaxkv.cache.base)."""
        out = zero_values(self, jnp.ones((self.v.shape[0], self.slots), bool))
        if self.group:
            out["k_res"], out["v_res"] = jnp.zeros_like(self.k_res), jnp.zeros_like(self.v_res)
            out["res_pos"] = jnp.full_like(self.res_pos, -1)
        return dataclasses.replace(self, **out)

    def truncate(self, keep: Array, table: Array) -> DenseLayer:
        """Forget positions >= keep[b] (`table`: the shared position table before); their
        values are zeroed. A layer with a full-precision copy of the group being filled keeps
        it when the rollback stays in that group, and otherwise reloads it from the
        (dequantized) store of the group now being filled: tokens rolled back into a group
        that was complete are read as quantized from then on."""
        freed = table >= keep[:, None]
        out = zero_values(self, freed)
        if not self.group:
            return dataclasses.replace(self, **out)
        slot = jnp.arange(1, self.slots + 1)
        held = jnp.any(~freed & (table >= 0), axis=0)
        index = jnp.max(jnp.where(held, slot, 0), initial=0)
        before = jnp.max(jnp.where(jnp.any(table >= 0, axis=0), slot, 0), initial=0)
        start, r = self._group_start(index), self.group
        k = lax.dynamic_slice_in_dim(self.k, start, r, axis=3)
        ks = self.k_scale
        if ks.ndim == 4:
            ks = lax.dynamic_slice_in_dim(ks, start // r, 1, axis=3)
        else:
            ks = lax.dynamic_slice_in_dim(ks, start, r, axis=2)
        v = lax.dynamic_slice_in_dim(out["v"], start, r, axis=2)
        vs = lax.dynamic_slice_in_dim(out["v_scale"], start, r, axis=2)
        kept = jnp.where(freed, -1, table)
        res_pos = lax.dynamic_slice_in_dim(kept, start, r, axis=1)
        # Rolled back within the group being filled: the copy stays (its freed slots
        # emptied); into an earlier group: the copy is reloaded from the store.
        same = (before > 0) & (start == (before - 1) // r * r)  # the copy's group
        gone = (self.res_pos < 0) | (self.res_pos >= keep[:, None])  # [B, R]
        kept_v = jnp.where(gone[:, None, :, None], 0, self.v_res).astype(self.v_res.dtype)
        out["k_res"] = jnp.where(same, self.k_res, dequantize(k, ks, 3, self.k_res.dtype))
        out["v_res"] = jnp.where(same, kept_v, dequantize(v, vs, 2, self.v_res.dtype))
        out["res_pos"] = jnp.where(same, jnp.where(gone, -1, self.res_pos), res_pos)
        return dataclasses.replace(self, **out)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": tuple(self.k.shape), "v": tuple(self.v.shape)}


LayerKV = DenseLayer  # the name of the first stage
