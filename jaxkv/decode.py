"""Prefill, decode_step and generation as compiled loops.

    prompts ─prefill─▶ KVCache ─decode_step─▶ logits ─sample─▶ token
                          ▲                        │
                          └──── returned, donated ─┘   (lax.scan runs this N times)

Batch layout: prompts are left-padded to the longest prompt P of the batch, so every row's last
prompt token sits in column P - 1 and every decode step writes one shared cache slot (one
`dynamic_update_slice` per leaf). The padded batch is then right-padded to a size bucket (a
power of two, at least 16, at most the capacity), so a new prompt length in a seen bucket
compiles nothing new. Padding has position -1: it is never stored as a valid slot and never
attended to.

Attention span: a generation of N tokens from a bucket of S can only touch the first S + N
slots, so the compiled loop attends over that many slots (rounded up to a multiple of
`SPAN_ALIGN`, see `jaxkv.prefill.attention_span`), not over the whole capacity. Step cost
follows the tokens, not the cache size.

Prompts longer than `prefill_chunk` run through the model in chunks (`jaxkv.prefill.feed`),
inside the same compiled program.

Stopping: a row stops after it emits one of the EOS ids, or when the cache has no room for its
next token. A stopped row emits `pad_id`, stores nothing and its cache rows stop changing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import checks
from jaxkv.cache import KVCache
from jaxkv.config import ModelConfig
from jaxkv.model import Params, apply
from jaxkv.prefill import (
    PREFILL_CHUNK,
    attention_span,
    bucket_length,
    check_chunk,
    feed,
)
from jaxkv.sampling import GREEDY, SamplingConfig, sample
from jaxkv.sharding import (
    Mesh,
    Rules,
    check_batch,
    constrain_cache,
    put_replicated,
    put_rows,
    replicate,
    rules_for,
)

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The loop state of generation.

    cache: the KV cache (holds everything before `tokens`).
    tokens: int32 [B], each row's last emitted token, not yet written to the cache.
    done: bool [B], rows that have stopped.
    key: the PRNG key the next sampling step splits (greedy steps leave it as it is).
    """

    cache: KVCache
    tokens: Array
    done: Array
    key: Array


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """tokens: int32 [B, N], padded with pad_id after a row stops. lengths: int32 [B], tokens
    each row emitted (an EOS included). state: pass it to `resume` to continue."""

    tokens: Array
    lengths: Array
    state: DecodeState


# --------------------------------------------------------------------------- traced core


def _prefill(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    positions: Array,
    capacity: int,
    cache_dtype: Any,
    chunk: int,
    rules: Rules | None = None,
) -> tuple[Array, KVCache]:
    cache = constrain_cache(KVCache.init(config, tokens.shape[0], capacity, cache_dtype), rules)
    last = jnp.max(positions)  # the longest row ends in column P - 1 == its last position
    last_col = jnp.full((tokens.shape[0],), last, jnp.int32)
    # In one piece, a fresh cache holds nothing to attend to (span 0): the prompt attends to
    # itself. In chunks, each chunk also attends to the slots earlier chunks wrote.
    s = tokens.shape[1]
    span = 0 if s <= chunk else s
    return feed(
        params,
        config,
        cache,
        tokens,
        positions,
        chunk=chunk,
        span=span,
        logits_at=last_col,
        rules=rules,
    )


def _decode(
    params: Params,
    config: ModelConfig,
    cache: KVCache,
    tokens: Array,
    active: Array,
    span: int | None,
    rules: Rules | None = None,
) -> tuple[Array, KVCache]:
    positions = jnp.where(active.astype(bool), cache.lengths, -1)[:, None]
    tokens = tokens.astype(jnp.int32)[:, None]
    logits, cache = apply(params, config, tokens, positions, cache, span=span)
    return logits[:, 0], constrain_cache(cache, rules)


def _split(key: Array, sampling: SamplingConfig) -> tuple[Array, Array]:
    """(next key, key for this step's draw). Greedy steps draw nothing and keep the key (the
    split is a handful of kernels per step on CPU)."""
    if sampling.greedy:
        return key, key
    key, sub = jax.random.split(key)
    return key, sub


def _start(
    logits: Array, cache: KVCache, key: Array, sampling: SamplingConfig, eos: Array
) -> DecodeState:
    key, sub = _split(key, sampling)
    tokens = sample(logits, sub, sampling)
    return DecodeState(cache=cache, tokens=tokens, done=jnp.isin(tokens, eos), key=key)


def _step(
    params: Params,
    config: ModelConfig,
    sampling: SamplingConfig,
    span: int,
    eos: Array,
    pad_id: Array,
    state: DecodeState,
    allowed: Array | bool = True,
    rules: Rules | None = None,
) -> tuple[DecodeState, tuple[Array, Array]]:
    """Feed each active row's pending token, sample the next. Returns the new state and
    (emitted tokens [B], emitted mask [B])."""
    active = ~state.done & allowed
    logits, cache = _decode(params, config, state.cache, state.tokens, active, span, rules)
    stored = cache.lengths > state.cache.lengths  # False where the cache had no room
    key, sub = _split(state.key, sampling)
    nxt = sample(logits, sub, sampling)
    emitted = jnp.where(stored, nxt, pad_id)
    done = state.done | (active & ~stored) | (stored & jnp.isin(nxt, eos))
    new = DecodeState(cache=cache, tokens=jnp.where(stored, nxt, state.tokens), done=done, key=key)
    return new, (emitted, stored)


def _scan_steps(
    params: Params,
    state: DecodeState,
    eos: Array,
    pad_id: Array,
    budget: Array | None,
    *,
    config: ModelConfig,
    sampling: SamplingConfig,
    n_steps: int,
    span: int,
    rules: Rules | None = None,
) -> tuple[DecodeState, Array, Array, Array]:
    """n_steps decode steps in one lax.scan; steps at or past `budget` do nothing. The
    emitted tokens and masks come back whole on every device (the host reads them)."""

    def body(st: DecodeState, i: Array) -> tuple[DecodeState, tuple[Array, Array]]:
        allowed = True if budget is None else i < budget
        return _step(params, config, sampling, span, eos, pad_id, st, allowed, rules)

    state, (toks, ok) = lax.scan(body, state, jnp.arange(n_steps))
    all_done = replicate(jnp.all(state.done), rules)
    return state, replicate(toks.T, rules), replicate(ok.T, rules), all_done


_STATIC = ("config", "sampling", "n_steps", "span", "rules")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "capacity", "cache_dtype", "chunk"))
def _generate_jit(
    params: Params,
    tokens: Array,
    positions: Array,
    key: Array,
    eos: Array,
    pad_id: Array,
    *,
    config: ModelConfig,
    sampling: SamplingConfig,
    n_steps: int,
    span: int,
    capacity: int,
    cache_dtype: Any,
    chunk: int,
    rules: Rules | None = None,
) -> tuple[Array, Array, DecodeState]:
    logits, cache = _prefill(params, config, tokens, positions, capacity, cache_dtype, chunk, rules)
    state = _start(logits, cache, key, sampling, eos)
    first = replicate(state.tokens, rules)
    state, toks, ok, _ = _scan_steps(
        params,
        state,
        eos,
        pad_id,
        None,
        config=config,
        sampling=sampling,
        n_steps=n_steps,
        span=span,
        rules=rules,
    )
    out = jnp.concatenate([first[:, None], toks], axis=1)
    lengths = 1 + jnp.sum(ok, axis=1, dtype=jnp.int32)
    return out, lengths, state


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def _resume_jit(
    params: Params,
    state: DecodeState,
    eos: Array,
    pad_id: Array,
    budget: Array | None,
    *,
    config: ModelConfig,
    sampling: SamplingConfig,
    n_steps: int,
    span: int,
    rules: Rules | None = None,
) -> tuple[DecodeState, Array, Array, Array]:
    return _scan_steps(
        params,
        state,
        eos,
        pad_id,
        budget,
        config=config,
        sampling=sampling,
        n_steps=n_steps,
        span=span,
        rules=rules,
    )


@functools.partial(
    jax.jit, static_argnames=("config", "sampling", "capacity", "cache_dtype", "chunk", "rules")
)
def _start_jit(
    params: Params,
    tokens: Array,
    positions: Array,
    key: Array,
    eos: Array,
    *,
    config: ModelConfig,
    sampling: SamplingConfig,
    capacity: int,
    cache_dtype: Any,
    chunk: int,
    rules: Rules | None = None,
) -> tuple[DecodeState, Array, Array]:
    logits, cache = _prefill(params, config, tokens, positions, capacity, cache_dtype, chunk, rules)
    state = _start(logits, cache, key, sampling, eos)
    return state, replicate(state.tokens, rules), replicate(jnp.all(state.done), rules)


@functools.partial(jax.jit, static_argnames=("config", "capacity", "cache_dtype", "chunk", "rules"))
def _prefill_jit(
    params: Params,
    tokens: Array,
    positions: Array,
    *,
    config: ModelConfig,
    capacity: int,
    cache_dtype: Any,
    chunk: int,
    rules: Rules | None = None,
) -> tuple[Array, KVCache]:
    logits, cache = _prefill(params, config, tokens, positions, capacity, cache_dtype, chunk, rules)
    return replicate(logits, rules), cache


@functools.partial(jax.jit, static_argnames=("config", "span", "rules"), donate_argnames=("cache",))
def _decode_step_jit(
    params: Params,
    cache: KVCache,
    tokens: Array,
    active: Array,
    *,
    config: ModelConfig,
    span: int | None,
    rules: Rules | None = None,
) -> tuple[Array, KVCache]:
    logits, cache = _decode(params, config, cache, tokens, active, span, rules)
    return replicate(logits, rules), cache


# --------------------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True)
class _Batch:
    tokens: np.ndarray  # int32 [B, S]
    positions: np.ndarray  # int32 [B, S]
    longest: int  # P


def _layout(rows: Sequence[np.ndarray], capacity: int, pad_id: int) -> _Batch:
    longest = max(len(r) for r in rows)
    s = bucket_length(longest, capacity)
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
class _Request:
    """A validated generation request: device inputs and the static shape decisions."""

    tokens: Any
    positions: Any
    key: Any
    eos: Any
    pad_id: Any
    capacity: int
    span: int
    sampling: SamplingConfig
    max_new_tokens: int
    chunk: int
    rules: Rules | None


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
) -> _Request:
    """Validate everything in plain Python, then lay out and place the inputs."""
    max_new_tokens, sampling, eos, pad_id = _loop_args(
        config, max_new_tokens, sampling, eos_ids, pad_id
    )
    chunk = check_chunk(prefill_chunk)
    rows = checks.token_rows(prompts, config.vocab_size)
    longest = max(len(r) for r in rows)
    if capacity is None:
        capacity = bucket_length(longest, 1 << 62) + max_new_tokens
    capacity = checks.check_capacity(capacity)
    checks.check_fits(longest, max_new_tokens, capacity, config)
    rules = _rules(config, mesh, len(rows))
    batch = _layout(rows, capacity, pad_id)
    return _Request(
        tokens=put_rows(batch.tokens, rules),
        positions=put_rows(batch.positions, rules),
        key=put_replicated(_key(key), rules),
        eos=put_replicated(eos, rules),
        pad_id=put_replicated(np.int32(pad_id), rules),
        capacity=capacity,
        span=attention_span(batch.tokens.shape[1] + max_new_tokens, capacity),
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        chunk=chunk,
        rules=rules,
    )


def prefill(
    params: Params,
    config: ModelConfig,
    prompts: Any,
    *,
    capacity: int,
    pad_id: int = 0,
    cache_dtype: Any = None,
    mesh: Mesh | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> tuple[Array, KVCache]:
    """Run a batch of prompts of any lengths into a fresh cache of `capacity` slots per row.

    Returns the float32 logits of each row's last prompt token, [B, vocab], and the cache.
    With `mesh` (params placed by `shard_params`), the cache is sharded as jaxkv.sharding says.
    Prompts longer than `prefill_chunk` tokens run in chunks of that many (peak memory follows
    the chunk, not the prompt).
    """
    capacity = checks.check_capacity(capacity)
    chunk = check_chunk(prefill_chunk)
    pad_id = checks.check_token_id("pad_id", pad_id, config.vocab_size)
    rows = checks.token_rows(prompts, config.vocab_size)
    longest = max(len(r) for r in rows)
    if longest > capacity:
        raise ValueError(f"prompt length {longest} exceeds the cache capacity {capacity}")
    rules = _rules(config, mesh, len(rows))
    batch = _layout(rows, capacity, pad_id)
    return _prefill_jit(
        params,
        put_rows(batch.tokens, rules),
        put_rows(batch.positions, rules),
        config=config,
        capacity=capacity,
        cache_dtype=cache_dtype,
        chunk=chunk,
        rules=rules,
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
    nothing. `span` limits attention to the first `span` slots (a compile per distinct value);
    it must cover the slot this step writes, which costs one device-to-host read to check.
    """
    cache.check_compatible(config)
    shape, dtype = np.shape(tokens), getattr(tokens, "dtype", np.asarray(tokens).dtype)
    if shape != (cache.batch_size,) or not np.issubdtype(dtype, np.integer):
        raise ValueError(
            f"tokens must be int [{cache.batch_size}] (one per cache row), got {dtype} {shape}"
        )
    if active is None:
        active = np.ones((cache.batch_size,), bool)
    if np.shape(active) != (cache.batch_size,):
        raise ValueError(f"active must be bool [{cache.batch_size}], got {np.shape(active)}")
    if span is not None:
        index = int(cache.index)
        if not index < span <= cache.capacity:
            raise ValueError(
                f"span {span} must cover the slot being written ({index}) and be at most the "
                f"capacity {cache.capacity}"
            )
        if span == cache.capacity:
            span = None
    rules = _rules(config, mesh, cache.batch_size)
    if not isinstance(tokens, jax.Array):
        tokens = put_rows(np.asarray(tokens), rules)
    if not isinstance(active, jax.Array):
        active = put_rows(np.asarray(active, bool), rules)
    return _decode_step_jit(params, cache, tokens, active, config=config, span=span, rules=rules)


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
) -> GenerationResult:
    """Prefill the prompts, then sample `max_new_tokens` per row in one compiled lax.scan.

    prompts: a sequence of token-id sequences (any lengths) or an int array [B, S].
    capacity: cache slots per row (default: the prompt bucket + max_new_tokens).
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
    )
    tokens, lengths, state = _generate_jit(
        params,
        r.tokens,
        r.positions,
        r.key,
        r.eos,
        r.pad_id,
        config=config,
        sampling=r.sampling,
        n_steps=r.max_new_tokens - 1,
        span=r.span,
        capacity=r.capacity,
        cache_dtype=cache_dtype,
        chunk=r.chunk,
        rules=r.rules,
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
    index = int(cache.index)
    if index + max_new_tokens > cache.capacity:
        raise ValueError(
            f"cache holds {index} of {cache.capacity} slots; {max_new_tokens} more tokens "
            f"need {index + max_new_tokens}, over the capacity {cache.capacity}"
        )
    rules = _rules(config, mesh, cache.batch_size)
    state, toks, ok, _ = _resume_jit(
        params,
        state,
        put_replicated(eos, rules),
        put_replicated(np.int32(pad_id), rules),
        None,
        config=config,
        sampling=sampling,
        n_steps=max_new_tokens,
        span=attention_span(index + max_new_tokens, cache.capacity),
        rules=rules,
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
    )
    return _stream(params, config, r, cache_dtype, chunk_size)


def _stream(
    params: Params, config: ModelConfig, r: _Request, cache_dtype: Any, chunk_size: int
) -> Iterator[np.ndarray]:
    state, first, done = _start_jit(
        params,
        r.tokens,
        r.positions,
        r.key,
        r.eos,
        config=config,
        sampling=r.sampling,
        capacity=r.capacity,
        cache_dtype=cache_dtype,
        chunk=r.chunk,
        rules=r.rules,
    )
    yield np.asarray(first)[:, None]
    left = r.max_new_tokens - 1
    while left > 0 and not bool(done):
        state, toks, _, done = _resume_jit(
            params,
            state,
            r.eos,
            r.pad_id,
            put_replicated(np.int32(left), r.rules),
            config=config,
            sampling=r.sampling,
            n_steps=chunk_size,
            span=r.span,
            rules=r.rules,
        )
        n = min(left, chunk_size)
        left -= n
        yield np.asarray(toks[:, :n])
