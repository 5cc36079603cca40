"""Sharding over a device mesh with JAX's own engine (Mesh, NamedSharding, jax.distributed).

The mesh has axes ('data', 'model'):

- batch rows on 'data': tokens, the cache's rows, per-row state;
- heads and the MLP hidden dimension on 'model' (Megatron style): the fused q/k/v weight and
  the KV cache split over KV heads, the output projection over the same heads, the MLP's
  input projection over its hidden units and its output projection over the same units, the
  LM head over the vocabulary. Each layer then needs one all-reduce after attention and one
  after the MLP.

Fallbacks (documented, with a warning): a dimension the 'model' axis does not divide stays
whole on every model shard: KV heads (then attention weights and the KV cache are replicated
over 'model' and attention is computed redundantly), MLP hidden units, or the vocabulary.
A batch the 'data' axis does not divide is an error.

Single-device use never touches this module: every function takes `mesh=None` by default.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkv.config import ModelConfig

DATA, MODEL = "data", "model"


def make_mesh(data: int, model: int, devices: Any = None) -> Mesh:
    """A ('data', 'model') mesh over `data * model` devices (default: all of them, in order;
    across processes, jax.devices() lists every process's devices)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if data * model != devices.size:
        raise ValueError(
            f"mesh ({data}, {model}) needs {data * model} devices, but {devices.size} are given"
        )
    return Mesh(devices.reshape(data, model), (DATA, MODEL))


@dataclasses.dataclass(frozen=True)
class Rules:
    """Which dimensions a mesh splits for one config; hashable (a static jit argument)."""

    mesh: Mesh
    heads: bool  # KV heads (and so q heads, attention weights and the cache) on 'model'
    hidden: bool  # MLP hidden units on 'model'
    vocab: bool  # vocabulary (embedding rows, LM head columns) on 'model'

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA]

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)


def rules_for(config: ModelConfig, mesh: Mesh) -> Rules:
    """Sharding rules for `config` on `mesh`, warning about each replicated fallback."""
    if tuple(mesh.axis_names) != (DATA, MODEL):
        raise ValueError(f"mesh axes must be ('data', 'model'), got {mesh.axis_names}")
    m = mesh.shape[MODEL]
    heads = config.n_kv_heads % m == 0
    hidden = config.ffn_dim % m == 0
    vocab = config.vocab_size % m == 0
    fallbacks = [
        f"{name}={n}"
        for name, n, ok in (
            ("n_kv_heads", config.n_kv_heads, heads),
            ("ffn_dim", config.ffn_dim, hidden),
            ("vocab_size", config.vocab_size, vocab),
        )
        if not ok
    ]
    if fallbacks:
        warnings.warn(
            f"the 'model' axis ({m} devices) does not divide {', '.join(fallbacks)}; those "
            "dimensions are replicated over 'model' instead of split",
            stacklevel=2,
        )
    return Rules(mesh=mesh, heads=heads, hidden=hidden, vocab=vocab)


def check_batch(rules: Rules, batch: int) -> None:
    if batch % rules.data_size:
        raise ValueError(
            f"batch size {batch} is not divisible by the mesh's 'data' axis ({rules.data_size})"
        )


def _param_spec(path: tuple[str, ...], ndim: int, rules: Rules) -> P:
    h = MODEL if rules.heads else None
    f = MODEL if rules.hidden else None
    v = MODEL if rules.vocab else None
    name = path[-1]
    parent = path[-2] if len(path) > 1 else ""
    if name == "embed":
        return P(v, None)
    if name == "lm_head":
        return P(None, v)
    if parent == "attn":
        return {
            "qkv": P(None, h, None, None),
            "qkv_bias": P(h, None, None),
            "o": P(h, None, None, None),
        }.get(name, P())
    if parent == "mlp":
        return {"wi": P(None, None, f), "bi": P(None, f), "wo": P(f, None)}.get(name, P())
    return P(*([None] * ndim))


def param_shardings(params: Any, rules: Rules) -> Any:
    """A NamedSharding for every param leaf."""

    def spec(path: Any, leaf: Any) -> NamedSharding:
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        return rules.named(_param_spec(keys, leaf.ndim, rules))

    return jax.tree_util.tree_map_with_path(spec, params)


def place(x: Any, sharding: NamedSharding) -> Any:
    """Put a value that every process holds whole (host or local device) onto `sharding`,
    which may span several processes: each process keeps only its own shards."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, config: ModelConfig, mesh: Mesh) -> Any:
    """Place params on `mesh` following the rules above (do this once, then pass mesh= to
    prefill / decode_step / generate). Every process passes the same params."""
    rules = rules_for(config, mesh)
    return jax.tree.map(place, params, param_shardings(params, rules))


def cache_specs(rules: Rules) -> dict[str, P]:
    h = MODEL if rules.heads else None
    return {
        "kv": P(DATA, h, None, None),  # k [B, N, H, C] and v [B, N, C, H]: heads second
        "positions": P(DATA, None),
        "lengths": P(DATA),
        "index": P(),
    }


def constrain_cache(cache: Any, rules: Rules | None) -> Any:
    """The cache with its sharding pinned (inside jit), so no step reshards it. Every kind
    follows one rule by rank: K/V buffers ([B, N, ...], rank 4) and per-head tables (scales,
    H2O's positions and scores, [B, N, T]) split rows and KV heads, position tables ([B, T])
    and lengths split rows, scalars are replicated."""
    if rules is None:
        return cache
    s = cache_specs(rules)
    h = MODEL if rules.heads else None
    by_rank = {4: s["kv"], 3: P(DATA, h, None), 2: s["positions"], 1: s["lengths"], 0: s["index"]}

    def pin(x: Any) -> Any:
        return jax.lax.with_sharding_constraint(x, rules.named(by_rank[x.ndim]))

    return jax.tree.map(pin, cache)


def constrain_rows(x: Any, rules: Rules | None) -> Any:
    """Pin an array whose leading axis is the batch to the 'data' axis (inside jit)."""
    if rules is None:
        return x
    spec = P(DATA, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, rules.named(spec))


def replicate(x: Any, rules: Rules | None) -> Any:
    """Pin an array to be whole on every device (inside jit): small outputs the host reads."""
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, rules.named(P()))


def put_rows(x: np.ndarray, rules: Rules | None) -> Any:
    """Place a host array with the batch on 'data' (outside jit). Every process passes the
    same whole array; each keeps its own shards."""
    if rules is None:
        return x
    return place(x, rules.named(P(DATA, *([None] * (x.ndim - 1)))))


def put_replicated(x: Any, rules: Rules | None) -> Any:
    if rules is None:
        return x
    return place(x, rules.named(P()))
