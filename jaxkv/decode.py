"""Generation from the host: validate in plain Python, lay out the batch, call a compiled
program of jaxkv.loops.

Batch layout: prompts are left-padded to the longest prompt P of the batch, so every row's last
prompt token sits in column P - 1 and every decode step writes one shared dense slot (one
`dynamic_update_slice` per leaf; ring layers place tokens by position and ignore the padding).
The padded batch is then right-padded to a size bucket (a power of two, at least 16, at most
the capacity), so a new prompt length in a seen bucket compiles nothing new. Padding has
position -1: it is never stored as a valid slot and never attended to.

The cache: `cache=` picks its kinds (`Dense()`, `Window(size, sinks=...)`, one per layer, or
None for what the model's layers need: see jaxkv.cache.kinds), or passes a `KVCache` to reuse:
it is emptied inside the compiled program and its buffers are donated, so repeated generations
of one shape allocate nothing.

Prompts longer than `prefill_chunk` run through the model in chunks (`jaxkv.prefill.feed`),
inside the same compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import checks
from jaxkv.cache import Kind, KVCache, layer_kinds
from jaxkv.cache.kinds import needs_capacity
from jaxkv.cache.kvcache import check_storage
from jaxkv.cache.quant import KVQuant, quant_spec, storage_dtype
from jaxkv.config import ModelConfig
from jaxkv.loops import (
    DecodeState,
    Loop,
    decode_groups,
    decode_step_jit,
    generate_jit,
    prefill_jit,
    resume_jit,
    start_jit,
)
from jaxkv.model import Params
from jaxkv.prefill import PREFILL_CHUNK, attention_span, bucket_length, check_chunk
from jaxkv.sampling import GREEDY, SamplingConfig
from jaxkv.sharding import Mesh, Rules, check_batch, put_replicated, put_rows, rules_for

Array = jax.Array
CacheArg = KVCache | Kind | Sequence[Kind] | None
_NO_LIMIT = 1 << 62

__all__ = [
    "DecodeState",
    "GenerationResult",
    "decode_step",
    "generate",
    "generate_stream",
    "prefill",
    "resume",
]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """tokens: int32 [B, N], padded with pad_id after a row stops. lengths: int32 [B], tokens
    each row emitted (an EOS included). state: pass it to `resume` to continue."""

    tokens: Array
    lengths: Array
    state: DecodeState


@dataclasses.dataclass(frozen=True)
class _Batch:
    tokens: np.ndarray  # int32 [B, S]
    positions: np.ndarray  # int32 [B, S]
    longest: int  # P


def _layout(rows: Sequence[np.ndarray], capacity: int | None, pad_id: int) -> _Batch:
    longest = max(len(r) for r in rows)
    s = bucket_length(longest, capacity or _NO_LIMIT)
    tokens = np.full((len(rows), s), pad_id, np.int32)
    positions = np.full((len(rows), s), -1, np.int32)
    for b, row in enumerate(rows):
        start = longest - len(row)
        tokens[b, start:longest] = row
        positions[b, start:longest] = np.arange(len(row))
    return _Batch(tokens, positions, longest)


def _key(key: Array | int | None) -> Array:
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    return key


def _rules(config: ModelConfig, mesh: Mesh | None, batch: int) -> Rules | None:
    if mesh is None:
        return None
    rules = rules_for(config, mesh)
    check_batch(rules, batch)
    return rules


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a generation's cache comes from: a given cache (reused) or a fresh one."""

    cache: KVCache | None
    capacity: int | None  # dense slots per row (None: no dense layer)
    kinds: tuple[Kind, ...] | None


def _cache_layout(
    config: ModelConfig,
    cache: CacheArg,
    batch: int,
    capacity: int | None,
    default_cap: int | None,
    caller: str,
    cache_dtype: Any = None,
) -> _Layout:
    """Validate `cache=` and `capacity=`: a KVCache to reuse, or the kinds of a fresh one
    (dense layers get `capacity`, else `default_cap`; with neither, dense layers are an
    error)."""
    if isinstance(cache, KVCache):
        cache.check_compatible(config, batch)
        if capacity is not None and capacity != cache.capacity:
            raise ValueError(
                f"capacity={capacity} was given with a cache of capacity {cache.capacity}; "
                "give one or the other"
            )
        held = cache.layers[0].k.dtype
        if cache_dtype is not None and storage_dtype(cache_dtype) != held:
            raise ValueError(
                f"cache_dtype={cache_dtype} was given with a cache stored as {held}; give one "
                "or the other"
            )
        spec, layout = quant_spec(cache_dtype), cache.storage()
        if spec is not None and layout is not None and not _same_storage(spec, layout, cache):
            raise ValueError(
                f"cache_dtype={spec.describe()} was given with a cache stored as "
                f"{layout.describe()}; give one or the other"
            )
        return _Layout(cache, cache.capacity if cache.has_dense else None, None)
    capacity = checks.check_capacity(capacity) if capacity is not None else default_cap
    kinds = layer_kinds(config, cache, capacity)
    check_storage(kinds, cache_dtype)
    if not needs_capacity(kinds):
        return _Layout(None, None, kinds)
    if capacity is None:
        raise ValueError(f"{caller} needs capacity= (slots per row) for a cache with dense layers")
    return _Layout(None, capacity, kinds)


def _same_storage(spec: KVQuant, layout: KVQuant, cache: KVCache) -> bool:
    """Whether a cache stored as `layout` holds `spec`. With one KV head, scales per token and
    per token and head are the same arrays (the cache reads as the latter)."""
    if spec == layout:
        return True
    one_head = cache.layers[0].k.shape[1] == 1
    per_token = {"head", "token"}
    return (
        one_head
        and {spec.scales, layout.scales} <= per_token
        and dataclasses.replace(spec, scales="head") == dataclasses.replace(layout, scales="head")
    )


@dataclasses.dataclass(frozen=True)
class _Request:
    """A validated generation request: device inputs, the static program and the cache."""

    tokens: Any
    positions: Any
    key: Any
    eos: Any
    pad_id: Any
    cache: KVCache | None
    loop: Loop
    max_new_tokens: int
    span: int | None  # the whole generation's reach (streams use one span throughout)


def _loop_args(
    config: ModelConfig, max_new_tokens: Any, sampling: Any, eos_ids: Any, pad_id: Any
) -> tuple[int, SamplingConfig, np.ndarray, int]:
    """Validate what every generation loop takes: (max_new_tokens, sampling, eos, pad_id)."""
    max_new_tokens = checks.check_max_new_tokens(max_new_tokens)
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    pad_id = checks.check_token_id("pad_id", pad_id, config.vocab_size)
    eos = np.asarray(checks.eos_tuple(eos_ids, config.vocab_size), np.int32)
    return max_new_tokens, sampling, eos, pad_id


def default_capacity(longest: int, max_new_tokens: int) -> int:
    """Dense slots per row `generate` gives a fresh cache by default: the longest prompt's
    bucket plus the new tokens."""
    return bucket_length(longest, _NO_LIMIT) + max_new_tokens


def _dtype_name(cache_dtype: Any) -> Any:
    """A hashable name of a cache dtype for the static Loop (quantized storage as its
    `KVQuant` layout)."""
    if cache_dtype is None:
        return None
    spec = quant_spec(cache_dtype)
    return spec if spec is not None else jnp.dtype(cache_dtype).name


def _span(reach: int, capacity: int | None) -> int | None:
    if capacity is None:
        return None
    span = attention_span(min(reach, capacity), capacity)
    return None if span >= capacity else span


def _request(
    config: ModelConfig,
    prompts: Any,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_ids: Any,
    pad_id: int,
    key: Any,
    capacity: int | None,
    mesh: Mesh | None,
    prefill_chunk: int,
    cache: CacheArg,
    cache_dtype: Any,
) -> _Request:
    """Validate everything in plain Python, then lay out and place the inputs."""
    max_new_tokens, sampling, eos, pad_id = _loop_args(
        config, max_new_tokens, sampling, eos_ids, pad_id
    )
    chunk = check_chunk(prefill_chunk)
    rows = checks.token_rows(prompts, config.vocab_size)
    longest = max(len(r) for r in rows)
    default_cap = default_capacity(longest, max_new_tokens)
    layout = _cache_layout(config, cache, len(rows), capacity, default_cap, "generate", cache_dtype)
    checks.check_fits(longest, max_new_tokens, layout.capacity or _NO_LIMIT, config)
    rules = _rules(config, mesh, len(rows))
    batch = _layout(rows, layout.capacity, pad_id)
    s = batch.tokens.shape[1]
    dense = layout.capacity is not None
    loop = Loop(
        config=config,
        sampling=sampling,
        steps=decode_groups(s, max_new_tokens - 1, layout.capacity or 0, dense),
        chunk=chunk,
        capacity=layout.capacity,
        cache_dtype=_dtype_name(cache_dtype),
        kinds=layout.kinds,
        rules=rules,
    )
    return _Request(
        tokens=put_rows(batch.tokens, rules),
        positions=put_rows(batch.positions, rules),
        key=put_replicated(_key(key), rules),
        eos=put_replicated(eos, rules),
        pad_id=put_replicated(np.int32(pad_id), rules),
        cache=layout.cache,
        loop=loop,
        max_new_tokens=max_new_tokens,
        span=_span(s + max_new_tokens, layout.capacity),
    )


def prefill(
    params: Params,
    config: ModelConfig,
    prompts: Any,
    *,
    capacity: int | None = None,
    pad_id: int = 0,
    cache_dtype: Any = None,
    mesh: Mesh | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    cache: CacheArg = None,
) -> tuple[Array, KVCache]:
    """Run a batch of prompts of any lengths into a cache; returns the float32 logits of each
    row's last prompt token, [B, vocab], and the cache.

    cache: the kinds of a fresh cache (default: what the model's layers need) with `capacity`
    slots per row on its dense layers, or a `KVCache` to reuse (emptied, donated).
    With `mesh` (params placed by `shard_params`), the cache is sharded as jaxkv.sharding says.
    Prompts longer than `prefill_chunk` tokens run in chunks of that many (peak memory follows
    the chunk, not the prompt).
    """
    chunk = check_chunk(prefill_chunk)
    pad_id = checks.check_token_id("pad_id", pad_id, config.vocab_size)
    rows = checks.token_rows(prompts, config.vocab_size)
    longest = max(len(r) for r in rows)
    layout = _cache_layout(config, cache, len(rows), capacity, None, "prefill", cache_dtype)
    if layout.capacity is not None and longest > layout.capacity:
        raise ValueError(f"prompt length {longest} exceeds the cache capacity {layout.capacity}")
    rules = _rules(config, mesh, len(rows))
    batch = _layout(rows, layout.capacity, pad_id)
    loop = Loop(
        config=config,
        chunk=chunk,
        capacity=layout.capacity,
        cache_dtype=_dtype_name(cache_dtype),
        kinds=layout.kinds,
        rules=rules,
    )
    return prefill_jit(
        params,
        put_rows(batch.tokens, rules),
        put_rows(batch.positions, rules),
        layout.cache,
        loop=loop,
    )


def decode_step(
    params: Params,
    config: ModelConfig,
    cache: KVCache,
    tokens: Any,
    *,
    active: Any = None,
    span: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[Array, KVCache]:
    """Feed one token per row; returns float32 logits [B, vocab] and the updated cache.

    The cache's buffers are donated (updated in place): do not use `cache` after this call.
    A row with `active` False (default: all active), or with no room left in the cache, stores
    nothing. `span` limits the dense layers' attention to their first `span` slots (a compile
    per distinct value); it must cover the slot this step writes, which costs one
    device-to-host read to check. Tokens are range-checked on the host (one read of a device
    array).
    """
    cache.check_compatible(config)
    arr = np.asarray(tokens)
    if arr.shape != (cache.batch_size,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"tokens must be int [{cache.batch_size}] (one per cache row), got {arr.dtype} "
            f"{arr.shape}"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= config.vocab_size):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    if active is None:
        active = np.ones((cache.batch_size,), bool)
    if np.shape(active) != (cache.batch_size,):
        raise ValueError(f"active must be bool [{cache.batch_size}], got {np.shape(active)}")
    if span is not None and cache.has_dense:
        index = int(cache.index)
        low = min(index + 1, cache.capacity)  # a full cache writes nothing: any span reads
        if not low <= span <= cache.capacity:
            raise ValueError(
                f"span {span} must cover the slot being written ({index}) and be at most the "
                f"capacity {cache.capacity}"
            )
    if span is not None and (not cache.has_dense or span >= cache.capacity):
        span = None  # rings read every slot; a span of the whole capacity is no span
    rules = _rules(config, mesh, cache.batch_size)
    if not isinstance(tokens, jax.Array):
        tokens = put_rows(arr.astype(np.int32), rules)
    if not isinstance(active, jax.Array):
        active = put_rows(np.asarray(active, bool), rules)
    loop = Loop(config=config, span=span, rules=rules)
    return decode_step_jit(params, cache, tokens, active, loop=loop)


def generate(
    params: Params,
    config: ModelConfig,
    prompts: Any,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    eos_ids: int | Sequence[int] | None = None,
    pad_id: int = 0,
    key: Array | int | None = None,
    capacity: int | None = None,
    cache_dtype: Any = None,
    mesh: Mesh | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    cache: CacheArg = None,
) -> GenerationResult:
    """Prefill the prompts, then sample `max_new_tokens` per row in one compiled program.

    prompts: a sequence of token-id sequences (any lengths) or an int array [B, S].
    capacity: dense slots per row (default: the prompt bucket + max_new_tokens).
    cache: the kinds of the cache (e.g. `Window(256, sinks=4)` for every layer; default: what
    the model's layers need), or a `KVCache` to reuse (emptied and donated: use the one in
    the result's state afterwards).
    key: a PRNG key or an int seed; each sampling step splits it once.
    mesh: a ('data', 'model') mesh to run on, with params placed by `shard_params`.
    prefill_chunk: prompts longer than this run through the model in chunks of this many tokens.
    """
    r = _request(
        config,
        prompts,
        max_new_tokens,
        sampling,
        eos_ids,
        pad_id,
        key,
        capacity,
        mesh,
        prefill_chunk,
        cache,
        cache_dtype,
    )
    tokens, lengths, state = generate_jit(
        params, r.tokens, r.positions, r.key, r.eos, r.pad_id, r.cache, loop=r.loop
    )
    return GenerationResult(tokens=tokens, lengths=lengths, state=state)


def resume(
    params: Params,
    config: ModelConfig,
    state: DecodeState,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    eos_ids: int | Sequence[int] | None = None,
    pad_id: int = 0,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Continue a generation from its returned state for `max_new_tokens` more steps.

    With the same sampling and EOS ids, generate(N) then resume(M) gives the tokens of
    generate(N + M). `state` is donated. Stopped rows stay stopped.
    """
    max_new_tokens, sampling, eos, pad_id = _loop_args(
        config, max_new_tokens, sampling, eos_ids, pad_id
    )
    cache = state.cache
    cache.check_compatible(config)
    room = cache.room()
    if room is not None and room < max_new_tokens:
        index = cache.capacity - room
        raise ValueError(
            f"cache holds {index} of {cache.capacity} slots; {max_new_tokens} more tokens "
            f"need {index + max_new_tokens}, over the capacity {cache.capacity}"
        )
    rules = _rules(config, mesh, cache.batch_size)
    first = 0 if room is None else cache.capacity - room
    loop = Loop(
        config=config,
        sampling=sampling,
        steps=decode_groups(first, max_new_tokens, cache.capacity, room is not None),
        rules=rules,
    )
    state, toks, ok, _ = resume_jit(
        params,
        state,
        put_replicated(eos, rules),
        put_replicated(np.int32(pad_id), rules),
        None,
        loop=loop,
    )
    return GenerationResult(tokens=toks, lengths=jnp.sum(ok, axis=1, dtype=jnp.int32), state=state)


def generate_stream(
    params: Params,
    config: ModelConfig,
    prompts: Any,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    eos_ids: int | Sequence[int] | None = None,
    pad_id: int = 0,
    key: Array | int | None = None,
    capacity: int | None = None,
    cache_dtype: Any = None,
    chunk_size: int = 16,
    mesh: Mesh | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    cache: CacheArg = None,
) -> Iterator[np.ndarray]:
    """Like `generate`, but yields tokens as they are made: first the token from the prefill
    ([B, 1]), then chunks of up to `chunk_size` steps ([B, <= chunk_size], numpy). Stops as
    soon as every row has stopped. The concatenated chunks equal `generate`'s tokens up to
    that point (after it, generate only has padding)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    r = _request(
        config,
        prompts,
        max_new_tokens,
        sampling,
        eos_ids,
        pad_id,
        key,
        capacity,
        mesh,
        prefill_chunk,
        cache,
        cache_dtype,
    )
    return _stream(params, r, chunk_size)


def _stream(params: Params, r: _Request, chunk_size: int) -> Iterator[np.ndarray]:
    state, first, done = start_jit(
        params, r.tokens, r.positions, r.key, r.eos, r.cache, loop=r.loop
    )
    yield np.asarray(first)[:, None]
    # One program for every chunk: a fixed number of steps over the generation's whole reach.
    loop = dataclasses.replace(r.loop, steps=((chunk_size, r.span),))
    left = r.max_new_tokens - 1
    while left > 0 and not bool(done):
        state, toks, _, done = resume_jit(
            params, state, r.eos, r.pad_id, put_replicated(np.int32(left), r.loop.rules), loop=loop
        )
        n = min(left, chunk_size)
        left -= n
        yield np.asarray(toks[:, :n])
