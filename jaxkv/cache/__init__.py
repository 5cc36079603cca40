"""The KV cache: one interface, several kinds (one small module each).

- `base`: the write plan, the `Segment`s attention reads, the `LayerCache` protocol;
- `dense`: one slot per token up to a capacity (`DenseLayer`);
- `heavy`: heavy hitters + recent tokens (H2O) per row and KV head, and SnapKV's prefill
  compression (`HeavyLayer`);
- `quant`: int8 / int4 storage, an option of every kind;
- `ring`: a sliding window with optional attention sinks in a fixed number of slots
  (`RingLayer`);
- `kinds`: what a user picks (`Dense()`, `Window(size, sinks=...)`, `Heavy`, `SnapKV`)
  and how it resolves per layer;
- `kvcache`: the model's cache (`KVCache`): per-layer caches plus per-row lengths.
"""

from jaxkv.cache.base import LayerCache, Segment, WritePlan
from jaxkv.cache.dense import DenseLayer, LayerKV
from jaxkv.cache.heavy import HeavyLayer
from jaxkv.cache.kinds import Dense, Heavy, Kind, SnapKV, Window, layer_kinds
from jaxkv.cache.kvcache import KVCache, cache_memory_bytes
from jaxkv.cache.quant import KVQuant
from jaxkv.cache.ring import RingLayer

__all__ = [
    "Dense",
    "DenseLayer",
    "Heavy",
    "HeavyLayer",
    "KVCache",
    "KVQuant",
    "Kind",
    "LayerCache",
    "LayerKV",
    "RingLayer",
    "Segment",
    "SnapKV",
    "Window",
    "WritePlan",
    "cache_memory_bytes",
    "layer_kinds",
]
