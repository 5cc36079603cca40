"""The KV cache: the one module that knows how keys and values are stored and written.

A `KVCache` is an immutable pytree of fixed-shape arrays. It goes into jitted functions as an
argument and comes back updated; nothing is hidden in module state.

Layout (measured against token-major and stacked layouts, see BENCHMARKS.md):

- one `LayerKV` per layer, with separate leaves per head and slot:
  `k`: `[batch, n_kv_heads, head_dim, capacity]` (keys stored transposed) and
  `v`: `[batch, n_kv_heads, capacity, head_dim]`.
  Decode attention is then two plain matrix products per KV head with no transpose of the
  stored data: scores = q [G, head_dim] @ k [head_dim, T] and out = p [G, T] @ v [T, head_dim]
  (a token-major `[batch, capacity, heads, head_dim]` cache made XLA:CPU copy and transpose
  the keys and values at every step);
- `positions`: int32 `[batch, capacity]`, the sequence position stored in each slot, -1 for an
  empty slot. Attention masks with it, so rows may hold different amounts of padding and a row
  that stops simply stops filling slots;
- `lengths`: int32 `[batch]`, tokens stored per row, which is also the position of the row's
  next token;
- `index`: int32 scalar, the next slot to write. All rows write the same slot range, so each
  write is one `lax.dynamic_update_slice` per leaf (no scatter).

Writing follows a small protocol that callers use without knowing the layout:
`plan = cache.plan_write(positions)` decides where the new tokens go and which are stored;
each layer reads what is stored with `layer.read(span)` (masked by
`plan.cached_positions(span)`), attends over that plus its new keys, and stores them with
`layer.write(k, v, plan, after=...)` (new keys and values as the projections make them,
`[batch, new, n_kv_heads, head_dim]`); `cache.commit(plan, layers, after=...)` returns the new
cache. A ring buffer with attention sinks, int8 storage with scales, or a paged pool changes
this module only (`read` returns the layout above whatever the storage).

In-place updates: a write that XLA can order after every read of the same buffer is done in
place; one it cannot order (the read and the write are independent computations) makes XLA
copy the whole buffer first (seen on CPU: two full copies per leaf per step). So each write
takes `after`, an array computed from the reads (the layer's attention output), and its
update is made to depend on it; attention never reads the buffer being written.

A token is stored only where its position is >= 0 and the whole write fits in the capacity;
otherwise its slot keeps its old contents. Nothing is ever written out of range (which
`dynamic_update_slice` would silently clamp).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv.config import ModelConfig

Array = jax.Array


def _after(new: Array, after: Array | None) -> Array:
    """`new`, made to depend on `after` (an array of new's shape) without changing its value:
    elementwise, so sharded arrays need no communication. (A NaN or inf in `after` makes the
    result NaN or -1, but then the computation is lost anyway.)"""
    if after is None:
        return new
    if jnp.issubdtype(new.dtype, jnp.integer):
        return jnp.where(after.astype(jnp.float32) <= jnp.inf, new, -1).astype(new.dtype)
    return new + (after * 0).astype(new.dtype)


def _write_slots(
    buf: Array, new: Array, index: Array, valid: Array, axis: int, after: Array | None = None
) -> Array:
    """Write `new` into `buf` at slots [index, index + S) of `axis` (new has S there, buf has
    the capacity; both have the batch first), keeping the old contents where `valid` ([B, S])
    is False, after `after` (shaped like `new`) is computed."""
    s = new.shape[axis]
    old = lax.dynamic_slice_in_dim(buf, index, s, axis=axis)
    shape = [1] * new.ndim
    shape[0], shape[axis] = valid.shape
    update = jnp.where(valid.reshape(shape), _after(new.astype(buf.dtype), after), old)
    return lax.dynamic_update_slice_in_dim(buf, update, index, axis=axis)


# Where the slots are in each leaf, and how a [B, S, n_kv_heads, head_dim] projection output is
# transposed into it.
_K_SLOT_AXIS, _K_FROM_PROJECTION = 3, (0, 2, 3, 1)  # [B, N, H, C]
_V_SLOT_AXIS, _V_FROM_PROJECTION = 2, (0, 2, 1, 3)  # [B, N, C, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """Keys and values of one layer: k `[batch, n_kv_heads, head_dim, capacity]`,
    v `[batch, n_kv_heads, capacity, head_dim]`."""

    k: Array
    v: Array

    @classmethod
    def zeros(
        cls, batch_size: int, capacity: int, n_kv_heads: int, head_dim: int, dtype: Any
    ) -> LayerKV:
        return cls(
            k=jnp.zeros((batch_size, n_kv_heads, head_dim, capacity), dtype),
            v=jnp.zeros((batch_size, n_kv_heads, capacity, head_dim), dtype),
        )

    def write(
        self, k_new: Array, v_new: Array, plan: WritePlan, after: Array | None = None
    ) -> LayerKV:
        """Store this layer's new keys and values (`[B, S, n_kv_heads, head_dim]`, as the
        projections make them), ordered after `after` (shaped like them: the layer's attention
        output; see the module docstring)."""

        def put(buf: Array, new: Array, perm: tuple[int, ...], axis: int) -> Array:
            dep = None if after is None else after.transpose(perm)
            return _write_slots(buf, new.transpose(perm), plan.index, plan.valid, axis, dep)

        return LayerKV(
            k=put(self.k, k_new, _K_FROM_PROJECTION, _K_SLOT_AXIS),
            v=put(self.v, v_new, _V_FROM_PROJECTION, _V_SLOT_AXIS),
        )

    def read(self, span: int) -> tuple[Array, Array]:
        """Stored keys `[B, n_kv_heads, head_dim, span]` and values
        `[B, n_kv_heads, span, head_dim]` of the first `span` slots, for attention (read them
        before `write`: attention takes this step's new keys from the projections directly)."""
        if span == self.capacity:
            return self.k, self.v
        return self.k[..., :span], self.v[:, :, :span]

    @property
    def capacity(self) -> int:
        return self.k.shape[_K_SLOT_AXIS]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": tuple(self.k.shape), "v": tuple(self.v.shape)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WritePlan:
    """Where a write of S new tokens per row goes.

    index: first slot written (int32 scalar).
    valid: bool [B, S], which new tokens are stored.
    positions: int32 [B, S], the new tokens' positions.
    old_positions: int32 [B, capacity], the cache's position table before the write.
    """

    index: Array
    valid: Array
    positions: Array
    old_positions: Array

    def cached_positions(self, span: int) -> Array:
        """Positions held in the first `span` slots before this write (-1: empty): the mask
        for the keys `LayerKV.read(span)` returns."""
        return self.old_positions[:, :span]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Explicit KV cache state. See the module docstring for the layout."""

    layers: tuple[LayerKV, ...]
    positions: Array
    lengths: Array
    index: Array

    @classmethod
    def init(
        cls, config: ModelConfig, batch_size: int, capacity: int, dtype: Any = None
    ) -> KVCache:
        """An empty cache for `batch_size` rows of up to `capacity` tokens each."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        dtype = jnp.dtype(dtype or config.dtype)
        layers = tuple(
            LayerKV.zeros(batch_size, capacity, config.n_kv_heads, config.head_dim, dtype)
            for _ in range(config.n_layers)
        )
        return cls(
            layers=layers,
            positions=jnp.full((batch_size, capacity), -1, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def plan_write(self, positions: Array) -> WritePlan:
        """Plan the write of S new tokens per row at slots [index, index + S).

        `positions` is int32 [B, S]: each new token's sequence position, or -1 for a token that
        must not be stored (padding, or a row that has stopped). If the write does not fit in
        the capacity, nothing is stored.
        """
        s = positions.shape[1]
        fits = self.index + s <= self.capacity
        valid = (positions >= 0) & fits
        return WritePlan(
            index=self.index,
            valid=valid,
            positions=positions.astype(jnp.int32),
            old_positions=self.positions,
        )

    def commit(
        self, plan: WritePlan, layers: tuple[LayerKV, ...], after: Array | None = None
    ) -> KVCache:
        """The cache after `plan`, with the layers each layer wrote; the position table is
        updated after `after` ([B, S], from the model's final activations: every layer's
        mask read the table).

        `index` moves past the last column in which any row stored a token, so a step in which
        no row stores anything leaves the cache unchanged.
        """
        s = plan.valid.shape[1]
        cols = jnp.arange(1, s + 1, dtype=jnp.int32)
        used = jnp.max(jnp.where(plan.valid, cols[None, :], 0))
        table = _write_slots(self.positions, plan.positions, plan.index, plan.valid, 1, after)
        return KVCache(
            layers=tuple(layers),
            positions=table,
            lengths=self.lengths + jnp.sum(plan.valid, axis=1, dtype=jnp.int32),
            index=self.index + used,
        )

    def truncate(self, keep: Any) -> KVCache:
        """The cache with row b keeping only its positions below keep[b] (an int or [B] ints):
        later tokens are forgotten (rolled back), so the row continues at position
        min(lengths[b], keep[b]). Only the position table, lengths and index change (no K/V is
        copied); the freed slots are masked by their position -1 and `index` moves back to
        just past the last slot still held, so they are written again."""
        arr = np.asarray(keep)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"keep must be ints (one, or one per row), got dtype {arr.dtype}")
        if arr.shape not in ((), (self.batch_size,)):
            raise ValueError(
                f"keep must be one int or {self.batch_size} ints (one per row), got shape "
                f"{arr.shape}"
            )
        if arr.size and int(arr.min()) < 0:
            raise ValueError(f"keep must be >= 0, got {arr.tolist()}")
        keep = jnp.broadcast_to(jnp.asarray(arr, jnp.int32), self.lengths.shape)
        table = jnp.where(self.positions < keep[:, None], self.positions, -1)
        held = jnp.any(table >= 0, axis=0)
        slots = jnp.arange(1, self.capacity + 1, dtype=jnp.int32)
        return KVCache(
            layers=self.layers,
            positions=table,
            lengths=jnp.minimum(self.lengths, keep),
            index=jnp.max(jnp.where(held, slots, 0)),
        )

    def check_compatible(self, config: ModelConfig, batch_size: int | None = None) -> None:
        """Raise ValueError if this cache cannot serve `config` (and `batch_size`)."""
        if self.n_layers != config.n_layers:
            raise ValueError(
                f"cache has {self.n_layers} layers but the config has n_layers={config.n_layers}"
            )
        b, c, n, h = self.batch_size, self.capacity, config.n_kv_heads, config.head_dim
        want = {"k": (b, n, h, c), "v": (b, n, c, h)}
        dims = {
            "k": f"(batch, n_kv_heads={n}, head_dim={h}, capacity)",
            "v": f"(batch, n_kv_heads={n}, capacity, head_dim={h})",
        }
        for i, layer in enumerate(self.layers):
            for name, shape in layer.shapes().items():
                if shape != want[name]:
                    raise ValueError(
                        f"cache layer {i} {name} has shape {shape}, but the config needs "
                        f"{dims[name]} = {want[name]}"
                    )
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"cache was built for batch size {self.batch_size}, got {batch_size} rows"
            )


def cache_memory_bytes(
    config: ModelConfig, batch_size: int, capacity: int, dtype: Any = None
) -> int:
    """Bytes a `KVCache` of this size occupies: K and V of every layer, plus the int32
    position table and lengths. K/V alone is 2 * layers * batch * capacity * kv_heads *
    head_dim * itemsize."""
    itemsize = np.dtype(jnp.dtype(dtype or config.dtype)).itemsize
    kv = 2 * config.n_layers * batch_size * capacity * config.n_kv_heads * config.head_dim
    return kv * itemsize + 4 * batch_size * capacity + 4 * batch_size + 4
