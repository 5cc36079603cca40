"""The model's cache: one layer cache per layer (kinds may differ), per-row lengths, and the
shared state of the dense layers.

A `KVCache` is an immutable pytree of fixed-shape arrays. It goes into jitted functions as an
argument and comes back updated; nothing is hidden in module state.

- `layers`: one cache per layer, each a kind from this package (`DenseLayer`, `RingLayer`);
- `positions`: int32 `[batch, capacity]`, the position held in each dense slot (-1: empty),
  shared by the dense layers (`[batch, 0]` when no layer is dense);
- `lengths`: int32 `[batch]`, tokens stored per row, which is also the position of the row's
  next token;
- `index`: int32 scalar, the next dense slot to write (all rows write the same one).

Writing follows a small protocol that callers use without knowing the kinds:
`plan = cache.plan_write(positions)` decides which new tokens are stored (position >= 0 and,
with dense layers, the write fits); each layer reads `layer.segments(plan, span)`, attends
over them plus its new keys, and stores them with `layer.write(k, v, plan, after=...)`;
`cache.commit(plan, layers, after=...)` returns the new cache.

Room: with dense layers a row stops when the capacity is reached; a cache of rings only
never fills (`room()` is None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.base import WritePlan, write_slots
from jaxkv.cache.dense import DenseLayer
from jaxkv.cache.heavy import HeavyLayer
from jaxkv.cache.kinds import Dense, Heavy, Kind, SnapKV, Window, layer_kinds, needs_capacity
from jaxkv.cache.quant import KVQuant, packed, quant_spec, storage_dtype
from jaxkv.cache.ring import RingLayer
from jaxkv.config import ModelConfig

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Explicit KV cache state. See the module docstring for the layout."""

    layers: tuple[Any, ...]
    positions: Array
    lengths: Array
    index: Array

    @classmethod
    def init(
        cls,
        config: ModelConfig,
        batch_size: int,
        capacity: int | None = None,
        dtype: Any = None,
        kinds: Kind | Sequence[Kind] | None = None,
    ) -> KVCache:
        """An empty cache for `batch_size` rows. `kinds` picks each layer's kind (see
        jaxkv.cache.kinds; default: what the model's layers need); `capacity` is the slots per
        row of the dense layers (needed only when some layer is dense)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if capacity is not None and (
            isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1
        ):
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        resolved = layer_kinds(config, kinds, capacity)
        if needs_capacity(resolved) and capacity is None:
            raise ValueError("a cache with dense layers needs a capacity (slots per row)")
        spec = check_storage(resolved, dtype)
        if spec is not None and spec.grouped:
            # Whole groups: the capacity grows to the next multiple of the group.
            capacity = -(-capacity // spec.group) * spec.group
        dtype = storage_dtype(dtype or config.dtype)
        if packed(dtype) and config.head_dim % 2:
            raise ValueError(
                f"int4 storage packs head_dim in pairs; head_dim={config.head_dim} is odd"
            )
        n, h = config.n_kv_heads, config.head_dim
        layers = []
        for kind in resolved:
            if isinstance(kind, Dense):
                layers.append(
                    DenseLayer.zeros(batch_size, capacity, n, h, dtype, spec, config.dtype)
                )
            elif isinstance(kind, (Heavy, SnapKV)):
                if isinstance(kind, Heavy):
                    args = (kind.heavy, kind.recent, n, h, dtype, kind.policy)
                else:
                    heavy = kind.budget - kind.window
                    args = (heavy, kind.window, n, h, dtype, kind.decode, kind.kernel)
                layers.append(HeavyLayer.zeros(batch_size, *args))
            else:
                layers.append(
                    RingLayer.zeros(
                        batch_size, kind.size, n, h, dtype, kind.sinks, kind.positions, spec
                    )
                )
        dense_slots = capacity if needs_capacity(resolved) else 0
        return cls(
            layers=tuple(layers),
            positions=jnp.full((batch_size, dense_slots), -1, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def capacity(self) -> int:
        """Slots per row of the dense layers (0: no dense layer)."""
        return self.positions.shape[1]

    @property
    def has_dense(self) -> bool:
        return any(isinstance(layer, DenseLayer) for layer in self.layers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def room(self) -> int | None:
        """Tokens every row can still store (host side: reads `index`), or None when no layer
        limits it (a cache of rings)."""
        if not self.has_dense:
            return None
        return self.capacity - int(self.index)

    def describe(self) -> str:
        """The layer kinds, e.g. '5 x ring(window=1024) + 1 x dense(capacity=32768)'."""
        names: dict[str, int] = {}
        for layer in self.layers:
            if isinstance(layer, DenseLayer):
                name = f"dense(capacity={layer.slots})"
            elif isinstance(layer, HeavyLayer):
                name = layer.describe()
            else:
                extra = f", sinks={layer.sinks}, {layer.sink_positions}" if layer.sinks else ""
                name = f"ring(window={layer.window}{extra})"
            names[name] = names.get(name, 0) + 1
        return " + ".join(f"{n} x {name}" for name, n in names.items())

    def storage(self) -> KVQuant | None:
        """The quantized layout the cache holds (None: full precision), read from the first
        quantized layer's arrays."""
        for layer in self.layers:
            if layer.k_scale is None:
                continue
            dtype = "int4" if packed(layer.k.dtype) else "int8"
            group = getattr(layer, "group", 0)
            if layer.k_scale.ndim == 4:
                scales = "kivi"
            elif layer.k_scale.shape[1] == 1 and layer.k.shape[1] > 1:
                scales = "token"
            else:
                scales = "head"
            return KVQuant(dtype, scales, group or 32, bool(getattr(layer, "residual", False)))
        return None

    def plan_write(self, positions: Array) -> WritePlan:
        """Plan the write of S new tokens per row (`positions` int32 [B, S], -1: not stored).
        With dense layers, a write that does not fit in the capacity stores nothing."""
        s = positions.shape[1]
        valid = positions >= 0
        if self.has_dense:
            valid &= self.index + s <= self.capacity
        return WritePlan(
            index=self.index,
            valid=valid,
            positions=positions.astype(jnp.int32),
            old_positions=self.positions,
        )

    def commit(
        self, plan: WritePlan, layers: tuple[Any, ...], after: Array | None = None
    ) -> KVCache:
        """The cache after `plan`, with the layers each layer wrote; the dense position table
        is updated after `after` ([B, S], from the model's final activations: every layer's
        mask read the table). `index` moves past the last column in which any row stored a
        token, so a step in which no row stores anything leaves the cache unchanged."""
        table, index = self.positions, self.index
        if self.has_dense:
            s = plan.valid.shape[1]
            cols = jnp.arange(1, s + 1, dtype=jnp.int32)
            used = jnp.max(jnp.where(plan.valid, cols[None, :], 0))
            table = write_slots(table, plan.positions, plan.index, plan.valid, 1, after)
            index = index + used
        return KVCache(
            layers=tuple(layers),
            positions=table,
            lengths=self.lengths + jnp.sum(plan.valid, axis=1, dtype=jnp.int32),
            index=index,
        )

    def reset(self) -> KVCache:
        """The cache emptied (traceable): every slot marked empty, lengths and index 0, values
        zeroed in the donated buffers (keys keep their contents: masked scores never read them),
        so a cache is reused without allocating anything."""
        return KVCache(
            layers=tuple(layer.reset() for layer in self.layers),
            positions=jnp.full_like(self.positions, -1),
            lengths=jnp.zeros_like(self.lengths),
            index=jnp.zeros_like(self.index),
        )

    def truncate(self, keep: Any) -> KVCache:
        """The cache with row b keeping only its positions below keep[b] (an int or [B] ints):
        later tokens are forgotten (rolled back), so the row continues at position
        min(lengths[b], keep[b]). No K/V is copied: freed slots are masked by position -1, and
        `index` moves back to just past the last dense slot still held.

        A ring cannot give back what it evicted: rolling a row back further than its ring
        still holds the window for raises ValueError."""
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
        if any(isinstance(x, RingLayer) for x in self.layers):
            self._check_ring_rollback(np.broadcast_to(arr, (self.batch_size,)))
        keep = jnp.broadcast_to(jnp.asarray(arr, jnp.int32), self.lengths.shape)
        table = jnp.where(self.positions < keep[:, None], self.positions, -1)
        held = jnp.any(table >= 0, axis=0)
        slots = jnp.arange(1, self.capacity + 1, dtype=jnp.int32)
        index = jnp.max(jnp.where(held, slots, 0), initial=0) if self.has_dense else self.index
        return KVCache(
            layers=tuple(layer.truncate(keep, self.positions) for layer in self.layers),
            positions=table,
            lengths=jnp.minimum(self.lengths, keep),
            index=index,
        )

    def _check_ring_rollback(self, keep: np.ndarray) -> None:
        lengths = np.asarray(self.lengths)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, RingLayer):
                continue
            for b, (n, k) in enumerate(zip(lengths.tolist(), keep.tolist(), strict=True)):
                if k < n - 1 and n - layer.window > layer.sinks:
                    raise ValueError(
                        f"row {b} holds {n} tokens but layer {i}'s ring of window "
                        f"{layer.window} no longer has positions {layer.sinks}.."
                        f"{n - layer.window - 1}; it cannot roll back to {k} tokens (at most "
                        f"1 token back once a ring has evicted)"
                    )

    def check_live(self) -> None:
        """Raise ValueError if an earlier call consumed this cache (its buffers were donated)."""
        for x in jax.tree.leaves(self):
            if isinstance(x, jax.Array) and x.is_deleted():
                raise ValueError(
                    "this cache was donated to an earlier call (decode_step, extend, generate, "
                    "resume ...) and its buffers now belong to the cache that call returned: "
                    "use the returned cache"
                )

    def check_compatible(self, config: ModelConfig, batch_size: int | None = None) -> None:
        """Raise ValueError if this cache cannot serve `config` (and `batch_size`)."""
        self.check_live()
        if self.n_layers != config.n_layers:
            raise ValueError(
                f"cache has {self.n_layers} layers but the config has n_layers={config.n_layers}"
            )
        b, n, h = self.batch_size, config.n_kv_heads, config.head_dim
        for i, layer in enumerate(self.layers):
            c, stored = layer.slots, h // 2 if packed(layer.k.dtype) else h
            want = {"k": (b, n, stored, c), "v": (b, n, c, stored)}
            dims = {
                "k": f"(batch, n_kv_heads={n}, head_dim={h}, slots)",
                "v": f"(batch, n_kv_heads={n}, slots, head_dim={h})",
            }
            for name, shape in layer.shapes().items():
                if name in want and shape != want[name]:
                    raise ValueError(
                        f"cache layer {i} {name} has shape {shape}, but the config needs "
                        f"{dims[name]} = {want[name]}"
                    )
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"cache was built for batch size {self.batch_size}, got {batch_size} rows"
            )

    def nbytes(self) -> int:
        """Bytes of every array of the cache."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def check_storage(kinds: tuple[Kind, ...], cache_dtype: Any) -> KVQuant | None:
    """The quantized layout of `cache_dtype` (None: full precision), after checking that the
    resolved layer kinds can store it; raises ValueError naming what cannot."""
    spec = quant_spec(cache_dtype)
    if spec is None:
        return None
    scored = sorted({type(k).__name__ for k in kinds if isinstance(k, (Heavy, SnapKV))})
    if scored and spec.scales != "head":
        raise ValueError(
            f"{' and '.join(scored)} layers keep different tokens in each KV head's slots: "
            f"their quantized storage has a scale per token and head, not {spec.describe()}"
        )
    if spec.grouped:
        others = sorted({type(k).__name__ for k in kinds if not isinstance(k, Dense)})
        if others:
            raise ValueError(
                f"{spec.describe()} keeps the group being filled in full precision, which "
                f"only dense layers have; this cache also has {', '.join(others)} layers"
            )
    return spec


def cache_memory_bytes(
    config: ModelConfig,
    batch_size: int,
    capacity: int | None,
    dtype: Any = None,
    kinds: Kind | Sequence[Kind] | None = None,
) -> int:
    """Bytes a `KVCache` of this shape occupies (computed from shapes, nothing allocated): K and
    V of every layer, the position tables and lengths."""
    shapes = jax.eval_shape(lambda: KVCache.init(config, batch_size, capacity, dtype, kinds))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


__all__ = ["Dense", "Heavy", "KVCache", "SnapKV", "Window", "cache_memory_bytes"]
