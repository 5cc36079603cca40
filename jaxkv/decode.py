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
`SPAN_ALIGN`), not over the whole capacity. Step cost follows the tokens, not the cache size.

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
from jaxkv.sampling import GREEDY, SamplingConfig, sample

Array = jax.Array

MIN_BUCKET = 16
SPAN_ALIGN = 128


def bucket_length(n: int, capacity: int) -> int:
    """The padded prefill length for a longest prompt of n tokens: the next power of two
    (at least MIN_BUCKET), but never more than the capacity."""
    b = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return min(b, capacity)


def attention_span(last_slot: int, capacity: int) -> int:
    """Slots attention must cover when nothing is written past `last_slot` (exclusive)."""
    return min(capacity, -(-last_slot // SPAN_ALIGN) * SPAN_ALIGN)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The loop state of generation.

    cache: the KV cache (holds everything before `tokens`).
    tokens: int32 [B], each row's last emitted token, not yet written to the cache.
    done: bool [B], rows that have stopped.
    key: the PRNG key the next step splits.
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
) -> tuple[Array, KVCache]:
    cache = KVCache.init(config, tokens.shape[0], capacity, cache_dtype)
    last = jnp.max(positions)  # the longest row ends in column P - 1 == its last position
    last_col = jnp.full((tokens.shape[0],), last, jnp.int32)
    logits, cache = apply(
        params, config, tokens, positions, cache, span=tokens.shape[1], logits_at=last_col
    )
    return logits[:, 0], cache


def _decode(
    params: Params,
    config: ModelConfig,
    cache: KVCache,
    tokens: Array,
    active: Array,
    span: int | None,
) -> tuple[Array, KVCache]:
    positions = jnp.where(active.astype(bool), cache.lengths, -1)[:, None]
    tokens = tokens.astype(jnp.int32)[:, None]
    logits, cache = apply(params, config, tokens, positions, cache, span=span)
    return logits[:, 0], cache


def _start(
    logits: Array, cache: KVCache, key: Array, sampling: SamplingConfig, eos: Array
) -> DecodeState:
    key, sub = jax.random.split(key)
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
) -> tuple[DecodeState, tuple[Array, Array]]:
    """Feed each active row's pending token, sample the next. Returns the new state and
    (emitted tokens [B], emitted mask [B])."""
    active = ~state.done & allowed
    logits, cache = _decode(params, config, state.cache, state.tokens, active, span)
    stored = cache.lengths > state.cache.lengths  # False where the cache had no room
    key, sub = jax.random.split(state.key)
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
) -> tuple[DecodeState, Array, Array]:
    """n_steps decode steps in one lax.scan; steps at or past `budget` do nothing."""

    def body(st: DecodeState, i: Array) -> tuple[DecodeState, tuple[Array, Array]]:
        allowed = True if budget is None else i < budget
        return _step(params, config, sampling, span, eos, pad_id, st, allowed)

    state, (toks, ok) = lax.scan(body, state, jnp.arange(n_steps))
    return state, toks.T, ok.T


_STATIC = ("config", "sampling", "n_steps", "span")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "capacity", "cache_dtype"))
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
) -> tuple[Array, Array, DecodeState]:
    logits, cache = _prefill(params, config, tokens, positions, capacity, cache_dtype)
    state = _start(logits, cache, key, sampling, eos)
    first = state.tokens
    state, toks, ok = _scan_steps(
        params,
        state,
        eos,
        pad_id,
        None,
        config=config,
        sampling=sampling,
        n_steps=n_steps,
        span=span,
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
) -> tuple[DecodeState, Array, Array]:
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
    )


@functools.partial(jax.jit, static_argnames=("config", "sampling", "capacity", "cache_dtype"))
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
) -> DecodeState:
    logits, cache = _prefill(params, config, tokens, positions, capacity, cache_dtype)
    return _start(logits, cache, key, sampling, eos)


@functools.partial(jax.jit, static_argnames=("config", "capacity", "cache_dtype"))
def _prefill_jit(
    params: Params,
    tokens: Array,
    positions: Array,
    *,
    config: ModelConfig,
    capacity: int,
    cache_dtype: Any,
) -> tuple[Array, KVCache]:
    return _prefill(params, config, tokens, positions, capacity, cache_dtype)


@functools.partial(jax.jit, static_argnames=("config", "span"), donate_argnames=("cache",))
def _decode_step_jit(
    params: Params,
    cache: KVCache,
    tokens: Array,
    active: Array,
    *,
    config: ModelConfig,
    span: int | None,
) -> tuple[Array, KVCache]:
    return _decode(params, config, cache, tokens, active, span)


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


def _prepare(
    config: ModelConfig, prompts: Any, max_new_tokens: int, capacity: int | None, pad_id: int
) -> tuple[_Batch, int]:
    rows = checks.token_rows(prompts, config.vocab_size)
    longest = max(len(r) for r in rows)
    if capacity is None:
        capacity = bucket_length(longest, 1 << 62) + max_new_tokens
    capacity = checks.check_capacity(capacity)
    checks.check_fits(longest, max_new_tokens, capacity, config)
    return _layout(rows, capacity, pad_id), capacity


def _key(key: Array | int | None) -> Array:
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    return key


def _check_sampling(sampling: SamplingConfig) -> SamplingConfig:
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    return sampling


def prefill(
    params: Params,
    config: ModelConfig,
    prompts: Any,
    *,
    capacity: int,
    pad_id: int = 0,
    cache_dtype: Any = None,
) -> tuple[Array, KVCache]:
    """Run a batch of prompts of any lengths into a fresh cache of `capacity` slots per row.

    Returns the float32 logits of each row's last prompt token, [B, vocab], and the cache.
    """
    capacity = checks.check_capacity(capacity)
    pad_id = checks.check_token_id("pad_id", pad_id, config.vocab_size)
    rows = checks.token_rows(prompts, config.vocab_size)
    longest = max(len(r) for r in rows)
    if longest > capacity:
        raise ValueError(f"prompt length {longest} exceeds the cache capacity {capacity}")
    batch = _layout(rows, capacity, pad_id)
    return _prefill_jit(
        params,
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.positions),
        config=config,
        capacity=capacity,
        cache_dtype=cache_dtype,
    )


def decode_step(
    params: Params,
    config: ModelConfig,
    cache: KVCache,
    tokens: Any,
    *,
    active: Any = None,
    span: int | None = None,
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
    tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
    return _decode_step_jit(params, cache, tokens, active, config=config, span=span)


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
) -> GenerationResult:
    """Prefill the prompts, then sample `max_new_tokens` per row in one compiled lax.scan.

    prompts: a sequence of token-id sequences (any lengths) or an int array [B, S].
    capacity: cache slots per row (default: the prompt bucket + max_new_tokens).
    key: a PRNG key or an int seed; each step splits it once.
    """
    max_new_tokens = checks.check_max_new_tokens(max_new_tokens)
    sampling = _check_sampling(sampling)
    pad_id = checks.check_token_id("pad_id", pad_id, config.vocab_size)
    eos = np.asarray(checks.eos_tuple(eos_ids, config.vocab_size), np.int32)
    batch, capacity = _prepare(config, prompts, max_new_tokens, capacity, pad_id)
    span = attention_span(batch.tokens.shape[1] + max_new_tokens, capacity)
    tokens, lengths, state = _generate_jit(
        params,
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.positions),
        _key(key),
        eos,
        np.int32(pad_id),
        config=config,
        sampling=sampling,
        n_steps=max_new_tokens - 1,
        span=span,
        capacity=capacity,
        cache_dtype=cache_dtype,
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
) -> GenerationResult:
    """Continue a generation from its returned state for `max_new_tokens` more steps.

    With the same sampling and EOS ids, generate(N) then resume(M) gives the tokens of
    generate(N + M). `state` is donated. Stopped rows stay stopped.
    """
    max_new_tokens = checks.check_max_new_tokens(max_new_tokens)
    sampling = _check_sampling(sampling)
    pad_id = checks.check_token_id("pad_id", pad_id, config.vocab_size)
    eos = np.asarray(checks.eos_tuple(eos_ids, config.vocab_size), np.int32)
    cache = state.cache
    cache.check_compatible(config)
    index = int(cache.index)
    if index + max_new_tokens > cache.capacity:
        raise ValueError(
            f"cache holds {index} of {cache.capacity} slots; {max_new_tokens} more tokens "
            f"need {index + max_new_tokens}, over the capacity {cache.capacity}"
        )
    span = attention_span(index + max_new_tokens, cache.capacity)
    state, toks, ok = _resume_jit(
        params,
        state,
        eos,
        np.int32(pad_id),
        None,
        config=config,
        sampling=sampling,
        n_steps=max_new_tokens,
        span=span,
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
) -> Iterator[np.ndarray]:
    """Like `generate`, but yields tokens as they are made: first the token from the prefill
    ([B, 1]), then chunks of up to `chunk_size` steps ([B, <= chunk_size], numpy). Stops as
    soon as every row has stopped. The concatenated chunks equal `generate`'s tokens up to
    that point (after it, generate only has padding)."""
    max_new_tokens = checks.check_max_new_tokens(max_new_tokens)
    sampling = _check_sampling(sampling)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    pad_id = checks.check_token_id("pad_id", pad_id, config.vocab_size)
    eos = np.asarray(checks.eos_tuple(eos_ids, config.vocab_size), np.int32)
    batch, capacity = _prepare(config, prompts, max_new_tokens, capacity, pad_id)
    span = attention_span(batch.tokens.shape[1] + max_new_tokens, capacity)
    return _stream(
        params,
        config,
        batch,
        key,
        eos,
        pad_id,
        sampling,
        capacity,
        cache_dtype,
        span,
        max_new_tokens,
        chunk_size,
    )


def _stream(
    params: Params,
    config: ModelConfig,
    batch: _Batch,
    key: Any,
    eos: Array,
    pad_id: int,
    sampling: SamplingConfig,
    capacity: int,
    cache_dtype: Any,
    span: int,
    max_new_tokens: int,
    chunk_size: int,
) -> Iterator[np.ndarray]:
    state = _start_jit(
        params,
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.positions),
        _key(key),
        eos,
        config=config,
        sampling=sampling,
        capacity=capacity,
        cache_dtype=cache_dtype,
    )
    yield np.asarray(state.tokens)[:, None]
    left = max_new_tokens - 1
    while left > 0 and not bool(jnp.all(state.done)):
        state, toks, _ = _resume_jit(
            params,
            state,
            eos,
            np.int32(pad_id),
            np.int32(left),
            config=config,
            sampling=sampling,
            n_steps=chunk_size,
            span=span,
        )
        n = min(left, chunk_size)
        left -= n
        yield np.asarray(toks[:, :n])
