"""Feeding many tokens per row into a cache: chunked prefill and `extend`.

`feed` (traced) runs a [B, S] block of tokens through the model into a cache, `chunk` columns at
a time: a `lax.scan` over the full chunks (the cache is the carry, updated in place), then one
call for the remainder. Attention materialises scores for one chunk only,
[B, heads, chunk, span], so peak memory follows the chunk, not the prompt, and the whole feed
is still one compiled program (`generate` runs it before its decode loop).

`extend` (host side) appends a ragged batch of new tokens to an existing cache: each row's new
tokens continue at that row's length (its next position), right-padded to a shared size
bucket. It returns the logits of the new tokens. That is the base of chat turns, prefix reuse
and speculative verification: prefill(a) + extend(b) + extend(c) == prefill(a + b + c).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import checks
from jaxkv.cache import KVCache
from jaxkv.config import ModelConfig
from jaxkv.model import Params, apply
from jaxkv.sharding import Mesh, Rules, check_batch, constrain_cache, put_rows, replicate, rules_for

Array = jax.Array

# Columns per prefill chunk. 512 keeps a chunk's float32 scores at
# heads * 512 * span * 4 bytes per row (SmolLM2, 9 heads, span 16384: 302 MB) while the
# projections still run as large matrix products.
PREFILL_CHUNK = 512
# A prompt of at least 2 * PREFILL_GROUPS chunks runs as this many scans with growing spans.
PREFILL_GROUPS = 4
MIN_BUCKET = 16
SPAN_ALIGN = 128


def bucket_length(n: int, capacity: int) -> int:
    """The padded length of a block whose longest row has n tokens: the next power of two
    (at least MIN_BUCKET), but never more than the capacity."""
    b = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return min(b, capacity)


def attention_span(last_slot: int, capacity: int, few_compiles: bool = False) -> int:
    """Slots attention covers when nothing is written past `last_slot` (exclusive): that many,
    rounded up to SPAN_ALIGN, or with `few_compiles` to SPAN_ALIGN times a power of two (for
    callers that compile one program per span as a conversation grows: extend, chat). On CPU,
    where reading a prefix of the cache copies it first, a span over half the capacity reads
    the whole cache instead (measured as fast or faster: llama-3m at position 1024 of 2048,
    0.65 ms/step whole against 0.75 for a 1152 span)."""
    blocks = max(1, -(-last_slot // SPAN_ALIGN))
    if few_compiles:
        blocks = 1 << (blocks - 1).bit_length()
    span = min(capacity, blocks * SPAN_ALIGN)
    if jax.default_backend() == "cpu" and 2 * span > capacity:
        return capacity
    return span


def check_chunk(chunk: Any) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive int, got {chunk!r}")
    return int(chunk)


def feed(
    params: Params,
    config: ModelConfig,
    cache: KVCache,
    tokens: Array,
    positions: Array,
    *,
    chunk: int,
    span: int | None,
    logits_at: Array | None = None,
    rules: Rules | None = None,
) -> tuple[Array, KVCache]:
    """Run tokens [B, S] (positions [B, S], -1 = padding) into `cache`, `chunk` columns at a
    time, attending over the first `span` slots (None: all). Returns the logits of column
    `logits_at` ([B]) of each row, [B, V], or with `logits_at` None, of every column,
    [B, S, V].

    With many chunks, they run as PREFILL_GROUPS scans in a row, each attending only over the
    slots written up to its last chunk: the early chunks of a long prompt do not read the
    empty end of the cache (attention work ~0.6 of one scan over the whole span)."""
    b, s = tokens.shape

    def run(
        cache: KVCache, toks: Array, pos: Array, at: Array | None, span: int | None
    ) -> tuple[Array, KVCache]:
        logits, cache = apply(params, config, toks, pos, cache, span=span, logits_at=at)
        return logits, constrain_cache(cache, rules)

    if s <= chunk:
        logits, cache = run(cache, tokens, positions, logits_at, span)
        return (logits if logits_at is None else logits[:, 0]), cache
    n = s // chunk
    head = n * chunk

    def split(x: Array) -> Array:  # [B, n*chunk] -> [n, B, chunk]
        return x[:, :head].reshape(b, n, chunk).swapaxes(0, 1)

    def body_for(span: int) -> Any:
        def body(carry: tuple[KVCache, Array], xs: tuple[Array, Array, Array]) -> Any:
            cache, last = carry
            toks, pos, start = xs
            if logits_at is None:
                logits, cache = run(cache, toks, pos, None, span)
                return (cache, last), logits
            local = jnp.clip(logits_at - start, 0, chunk - 1)
            logits, cache = run(cache, toks, pos, local, span)
            inside = (logits_at >= start) & (logits_at < start + chunk)
            return (cache, jnp.where(inside[:, None], logits[:, 0], last)), None

        return body

    # Writes of this block land below `base` + the columns fed so far (the block fits below
    # the span, which covers whatever the cache held before it).
    # (Spans bound the dense layers only; a cache of rings reads its rings whole.)
    total = cache.capacity if span is None else span
    base = total - s
    groups = PREFILL_GROUPS if n >= 2 * PREFILL_GROUPS and cache.has_dense else 1
    bounds = [n * g // groups for g in range(groups + 1)]
    xs = (split(tokens), split(positions), jnp.arange(n, dtype=jnp.int32) * chunk)
    carry = (cache, jnp.zeros((b, config.vocab_size), jnp.float32))
    outs = []
    for lo, hi in itertools.pairwise(bounds):
        part = jax.tree.map(lambda x, lo=lo, hi=hi: x[lo:hi], xs)
        group_span = min(total, base + hi * chunk) if cache.has_dense else None
        carry, stacked = lax.scan(body_for(group_span), carry, part)
        outs.append(stacked)
    cache, last = carry
    if logits_at is None:
        stacked = jnp.concatenate(outs, axis=0).swapaxes(0, 1).reshape(b, head, -1)
    if head < s:  # the remainder, narrower than a chunk
        at = None if logits_at is None else jnp.clip(logits_at - head, 0, s - head - 1)
        rest_span = total if cache.has_dense else None
        rest, cache = run(cache, tokens[:, head:], positions[:, head:], at, rest_span)
        if logits_at is None:
            return jnp.concatenate([stacked, rest], axis=1), cache
        last = jnp.where((logits_at >= head)[:, None], rest[:, 0], last)
    return (stacked if logits_at is None else last), cache


@functools.partial(
    jax.jit,
    static_argnames=("config", "chunk", "span", "all_logits", "rules"),
    donate_argnames=("cache",),
)
def _extend_jit(
    params: Params,
    cache: KVCache,
    tokens: Array,
    positions: Array,
    last_col: Array,
    *,
    config: ModelConfig,
    chunk: int,
    span: int | None,
    all_logits: bool,
    rules: Rules | None = None,
) -> tuple[Array, KVCache]:
    at = None if all_logits else last_col
    logits, cache = feed(
        params,
        config,
        cache,
        tokens,
        positions,
        chunk=chunk,
        span=span,
        logits_at=at,
        rules=rules,
    )
    return replicate(logits, rules), cache


def extend(
    params: Params,
    config: ModelConfig,
    cache: KVCache,
    tokens: Any,
    *,
    logits: Literal["all", "last"] = "all",
    pad_id: int = 0,
    prefill_chunk: int = PREFILL_CHUNK,
    mesh: Mesh | None = None,
) -> tuple[Array, KVCache]:
    """Append one block of new tokens per row to `cache`; returns (logits, cache).

    tokens: one token sequence per cache row (rows may differ in length, each at least one
    token). Row b's tokens take positions cache.lengths[b], cache.lengths[b] + 1, ....
    logits: "all" gives float32 [B, L, vocab] for every new token (L = the longest row; a
    shorter row's columns past its length are padding), "last" gives [B, vocab] for each row's
    last new token. The cache is donated: do not use `cache` after this call. Long blocks run
    in chunks of `prefill_chunk` columns.
    """
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    chunk = check_chunk(prefill_chunk)
    cache.check_compatible(config)
    pad_id = checks.check_token_id("pad_id", pad_id, config.vocab_size)
    rows = checks.token_rows(tokens, config.vocab_size)
    if len(rows) != cache.batch_size:
        raise ValueError(
            f"extend got {len(rows)} rows of tokens for a cache of batch size {cache.batch_size}"
        )
    room, lengths = cache.room(), np.asarray(cache.lengths)
    longest = max(len(r) for r in rows)
    index = 0 if room is None else cache.capacity - room
    if room is not None and longest > room:
        raise ValueError(
            f"the cache holds {index} of {cache.capacity} slots; extending by {longest} tokens "
            f"needs {index + longest}, over the capacity {cache.capacity}"
        )
    if config.position == "learned":
        end = max(int(lengths[b]) + len(r) for b, r in enumerate(rows))
        if end > config.max_seq_len:
            raise ValueError(
                f"extending reaches position {end - 1}, beyond max_seq_len {config.max_seq_len}"
            )
    s = bucket_length(longest, (1 << 62) if room is None else room)
    toks = np.full((len(rows), s), pad_id, np.int32)
    pos = np.full((len(rows), s), -1, np.int32)
    for b, row in enumerate(rows):
        toks[b, : len(row)] = row
        pos[b, : len(row)] = int(lengths[b]) + np.arange(len(row))
    last_col = np.array([len(r) - 1 for r in rows], np.int32)
    rules = None
    if mesh is not None:
        rules = rules_for(config, mesh)
        check_batch(rules, len(rows))
    out, cache = _extend_jit(
        params,
        cache,
        put_rows(toks, rules),
        put_rows(pos, rules),
        put_rows(last_col, rules),
        config=config,
        chunk=chunk,
        span=None
        if room is None
        else _span_or_none(attention_span(index + s, cache.capacity, True), cache.capacity),
        all_logits=logits == "all",
        rules=rules,
    )
    if logits == "all":
        out = out[:, :longest]
    return out, cache


def _span_or_none(span: int, capacity: int) -> int | None:
    return None if span >= capacity else span
