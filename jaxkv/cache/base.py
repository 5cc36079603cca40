"""What every cache kind shares: the write plan, the segments attention reads, and the
helpers that keep writes in place.

A layer's cache answers three questions (the `LayerCache` protocol below):

- `segments(plan, span)`: what attention may read before this step's write: one or more
  `Segment`s of stored keys `[B, N, H, T]`, values `[B, N, T, H]` and their positions
  `[B, T]` (-1: empty). Attention combines every segment and the new tokens under one
  softmax, with masked scores replaced (a select: a stale key, even NaN, never matters).
- Empty slots hold zero values: a masked slot gets weight 0 in p @ V, but 0 * NaN is NaN, so
  whatever empties a slot zeroes its value (`KVCache.init`, `reset` for reuse, `truncate`).
  Then a decode step reads V as it is, with no per-step mask over the cache (which cost
  1.55x per step on CPU, llama-3m at position 4096); multi-query attention (prefill,
  extend) masks values as well. Evicted ring slots hold older values the model computed.
- `write(k, v, plan, after)`: store the new tokens (`[B, S, N, H]`, as the projections make
  them), ordered after `after` (the layer's attention output) so XLA updates the donated
  buffers in place.
- its mask: `window` (keys older than the last `window` positions are invisible; None: no
  limit) and `sinks` (the first `sinks` positions of a row stay visible whatever the window),
  with `sink_positions` saying how the query sees the sinks ("cache": at positions within the
  cache, as StreamingLLM does; "original": at the original positions).

In-place updates: a write that XLA can order after every read of the same buffer is done in
place; one it cannot order makes XLA copy the whole buffer first (seen on CPU: two full copies
per leaf per step). So each write takes `after`, an array computed from the reads, and its
update is made to depend on it; attention never reads the buffer being written.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv.cache.quant import KVQuant, is_quantized, packed, quantize

Array = jax.Array


class Segment(NamedTuple):
    """What attention reads from one part of a layer's cache.

    k: [B, N, H, T]; v: [B, N, T, H]; pos: int32 [B, T], the position held in each slot (-1:
    nothing). The first `sink_slots` slots hold attention sinks, which a query with
    cache-relative sink positions scores at its own position within the cache.
    """

    k: Array
    v: Array
    pos: Array
    sink_slots: int = 0
    k_scale: Array | None = None  # [B, N, T] with int8 storage (see jaxkv.cache.quant)
    v_scale: Array | None = None


class Received(NamedTuple):
    """What attention hands a score-based cache (`needs_probs`): the attention probability
    each stored slot (`stored`, [B, N, T] per segment) and each new token (`new`, [B, N, S])
    received, summed over the block's queries and over the query heads of each KV head's
    group (padding queries excluded). With `vote_queries` > 0 (SnapKV), `vote_stored` and
    `vote_new` sum the same over only the last `vote_queries` positions of each row's block."""

    stored: list
    new: Array
    vote_stored: list | None = None
    vote_new: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WritePlan:
    """Where a write of S new tokens per row goes, shared by every layer of a step.

    index: first dense slot written (int32 scalar; dense layers write slots
        [index, index + S), shared by all rows).
    valid: bool [B, S], which new tokens are stored (position >= 0 and the write fits).
    positions: int32 [B, S], the new tokens' positions (-1: padding).
    old_positions: int32 [B, capacity], the dense position table before the write.
    """

    index: Array
    valid: Array
    positions: Array
    old_positions: Array

    def cached_positions(self, span: int) -> Array:
        """Positions held in the first `span` dense slots before this write (-1: empty)."""
        return self.old_positions[:, :span]


class LayerCache(Protocol):
    """One layer's cache (a registered-dataclass pytree; its policy knobs are static)."""

    window: int | None
    sinks: int
    sink_positions: str

    @property
    def slots(self) -> int: ...

    def segments(self, plan: WritePlan, span: int | None) -> tuple[Segment, ...]: ...

    def write(
        self, k: Array, v: Array, plan: WritePlan, after: Array | None = None
    ) -> LayerCache: ...

    def reset(self) -> LayerCache: ...

    def truncate(self, keep: Array, table: Array) -> LayerCache: ...


def ordered_after(new: Array, dep: Array | None) -> Array:
    """`new`, made to depend on `dep` (an array of new's shape) without changing its value:
    elementwise, so sharded arrays need no communication. (A NaN or inf in `dep` makes the
    result NaN or -1, but then the computation is lost anyway.)"""
    if dep is None:
        return new
    if jnp.issubdtype(new.dtype, jnp.integer):
        return jnp.where(dep.astype(jnp.float32) <= jnp.inf, new, -1).astype(new.dtype)
    return new + (dep * 0).astype(new.dtype)


def write_slots(
    buf: Array, new: Array, index: Array, valid: Array, axis: int, dep: Array | None = None
) -> Array:
    """Write `new` into `buf` at slots [index, index + S) of `axis` (new has S there, buf has
    the capacity; both have the batch first), keeping the old contents where `valid` ([B, S])
    is False, after `dep` (shaped like `new`) is computed."""
    s = new.shape[axis]
    old = lax.dynamic_slice_in_dim(buf, index, s, axis=axis)
    shape = [1] * new.ndim
    shape[0], shape[axis] = valid.shape
    update = jnp.where(valid.reshape(shape), ordered_after(new.astype(buf.dtype), dep), old)
    return lax.dynamic_update_slice_in_dim(buf, update, index, axis=axis)


def scatter_slots(buf: Array, new: Array, slots: Array, axis: int, dep: Array | None) -> Array:
    """Write row b's new token s ([B, S, N, H] as projected, or [B, S, N] scales) into slot
    slots[b, s] of `axis` of `buf` ([B, N, H, T] with axis 3, [B, N, T, H] or [B, N, T] with
    axis 2), after `dep`. A slot
    >= the buffer's size is not written (the caller marks dropped tokens that way), and the
    valid slots of a row must be distinct (duplicate scatter indices write in undefined order)."""
    rows = jnp.arange(buf.shape[0])[:, None]
    value = ordered_after(new.astype(buf.dtype), dep)
    # k: (rows, :, :, slots); v [B, N, T, H] and scales [B, N, T]: (rows, :, slots)
    index = (rows, slice(None), slice(None), slots) if axis == 3 else (rows, slice(None), slots)
    return buf.at[index].set(value, mode="drop")


def kv_zeros(
    batch: int,
    slots: int,
    n_kv_heads: int,
    head_dim: int,
    dtype: Any,
    spec: KVQuant | None = None,
) -> dict:
    """Zeroed k [B, N, H, slots] and v [B, N, slots, H] of a storage dtype (for int4, H / 2
    packed bytes), and with quantized storage their float32 scales k_scale, v_scale in the
    layout `spec` asks for (jaxkv.cache.quant; default per token and KV head, [B, N, slots])."""
    h = head_dim // 2 if packed(dtype) else head_dim
    out = {
        "k": jnp.zeros((batch, n_kv_heads, h, slots), dtype),
        "v": jnp.zeros((batch, n_kv_heads, slots, h), dtype),
    }
    if is_quantized(dtype):
        n = 1 if spec is not None and spec.scales == "token" else n_kv_heads
        out["v_scale"] = jnp.zeros((batch, n, slots), jnp.float32)
        if spec is not None and spec.scales == "kivi":
            groups = slots // spec.group
            out["k_scale"] = jnp.zeros((batch, n_kv_heads, head_dim, groups), jnp.float32)
        else:
            out["k_scale"] = jnp.zeros((batch, n, slots), jnp.float32)
    return out


def store(new: Array, buf: Array, scale: Array | None = None) -> tuple[Array, Array | None]:
    """What a layer with buffer `buf` (and scales `scale`) stores for new keys or values
    ([B, S, N, H]): themselves, or quantized (int8 [B, S, N, H] or packed [B, S, N, H / 2],
    scales [B, S, N], or [B, S, 1] when the layer's scales are shared by the heads)."""
    if not is_quantized(buf.dtype):
        return new, None
    shared = scale is not None and scale.ndim == 3 and scale.shape[1] == 1
    return quantize(new, pack=packed(buf.dtype), shared=shared)


def zero_values(layer: Any, freed: Array) -> dict:
    """Replacement `v` (and `v_scale`) of a layer with the slots where `freed` ([B, slots]) is
    True zeroed: an empty slot holds a zero value (see the module docstring)."""
    out = {"v": jnp.where(freed[:, None, :, None], 0, layer.v).astype(layer.v.dtype)}
    if layer.v_scale is not None:
        out["v_scale"] = jnp.where(freed[:, None, :], 0.0, layer.v_scale)
    return out


# Where the slots are in each leaf, and how a [B, S, n_kv_heads, head_dim] projection output is
# transposed into it.
K_SLOT_AXIS, K_FROM_PROJECTION = 3, (0, 2, 3, 1)  # [B, N, H, C]
V_SLOT_AXIS, V_FROM_PROJECTION = 2, (0, 2, 1, 3)  # [B, N, C, H]
