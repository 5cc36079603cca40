"""The compiled programs of generation: prefill, one decode step, and the decode loop.

    prompts ─prefill─▶ KVCache ─decode step─▶ logits ─sample─▶ token
                          ▲                        │
                          └──── returned, donated ─┘   (lax.scan runs this N times)

Every jitted entry point takes the same static description, `Loop`: the model config, the
sampling rule, the decode groups (steps and attention span of each scan), the prefill chunk,
the layout of a fresh cache (capacity, dtype, kinds) and the sharding rules. One `Loop` is one
compiled program per entry point; the host API (jaxkv.decode) builds it.

Attention span: the dense layers of a step that writes slot i only need slots < i + 1, so the
decode loop runs as a few scans in a row (`Loop.steps`), each attending over the slots filled
by its last step (rounded to `SPAN_ALIGN`): the cost of a step follows the filled length, not
the final reach of the generation. Rings read their `sinks + window` slots whatever the span.

Stopping: a row stops after it emits one of the EOS ids, or when the cache has no room for its
next token (dense layers full). A stopped row emits `pad_id`, stores nothing and its cache rows
stop changing.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv.cache import KVCache
from jaxkv.config import ModelConfig
from jaxkv.model import Params, apply
from jaxkv.prefill import PREFILL_CHUNK, attention_span, feed
from jaxkv.sampling import GREEDY, SamplingConfig, sample
from jaxkv.sharding import Rules, constrain_cache, replicate

Array = jax.Array

# A decode loop of at least this many steps per group runs as several scans with growing
# spans (at most MAX_DECODE_GROUPS: each is one more compiled loop body).
STEPS_PER_GROUP = 256
MAX_DECODE_GROUPS = 8


@dataclasses.dataclass(frozen=True)
class Loop:
    """The static description of a compiled generation program (hashable).

    steps: the decode loop as scans in a row, (number of steps, attention span) each; a span
        of None attends over every slot.
    capacity / cache_dtype / kinds: the layout of a fresh cache (unused when a cache is given).
    span: the attention span of a single `decode_step` (None: every slot).
    """

    config: ModelConfig
    sampling: SamplingConfig = GREEDY
    steps: tuple[tuple[int, int | None], ...] = ()
    chunk: int = PREFILL_CHUNK
    capacity: int | None = None
    cache_dtype: Any = None
    kinds: Any = None
    span: int | None = None
    rules: Rules | None = None

    @property
    def n_steps(self) -> int:
        return sum(n for n, _ in self.steps)


def decode_groups(
    first_slot: int, n_steps: int, capacity: int, dense: bool
) -> tuple[tuple[int, int | None], ...]:
    """Split n_steps decode steps, the first writing dense slot `first_slot` (or earlier),
    into scans with growing spans (see the module docstring). Without dense layers: one scan
    over every slot."""
    if n_steps == 0:
        return ()
    if not dense:
        return ((n_steps, None),)
    groups = max(1, min(MAX_DECODE_GROUPS, n_steps // STEPS_PER_GROUP))
    bounds = [n_steps * g // groups for g in range(groups + 1)]
    out: list[tuple[int, int | None]] = []
    for lo, hi in itertools.pairwise(bounds):
        span = attention_span(min(first_slot + hi, capacity), capacity)
        span = None if span >= capacity else span
        if out and out[-1][1] == span:
            out[-1] = (out[-1][0] + hi - lo, span)
        else:
            out.append((hi - lo, span))
    return tuple(out)


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


# --------------------------------------------------------------------------- traced core


def _cache_for(loop: Loop, batch: int, cache: KVCache | None) -> KVCache:
    """A fresh cache of the loop's layout, or the given one emptied (reused in place)."""
    if cache is None:
        cache = KVCache.init(loop.config, batch, loop.capacity, loop.cache_dtype, loop.kinds)
    else:
        cache = cache.reset()
    return constrain_cache(cache, loop.rules)


def _prefill(
    params: Params, tokens: Array, positions: Array, cache: KVCache | None, loop: Loop
) -> tuple[Array, KVCache]:
    cache = _cache_for(loop, tokens.shape[0], cache)
    last = jnp.max(positions)  # the longest row ends in column P - 1 == its last position
    last_col = jnp.full((tokens.shape[0],), last, jnp.int32)
    # In one piece, an empty cache holds nothing to attend to (span 0): the prompt attends to
    # itself. In chunks, each chunk also attends to the slots earlier chunks wrote.
    s = tokens.shape[1]
    span = 0 if s <= loop.chunk else (s if cache.has_dense else None)
    return feed(
        params,
        loop.config,
        cache,
        tokens,
        positions,
        chunk=loop.chunk,
        span=span,
        logits_at=last_col,
        rules=loop.rules,
    )


def _decode(
    params: Params, cache: KVCache, tokens: Array, active: Array, span: int | None, loop: Loop
) -> tuple[Array, KVCache]:
    positions = jnp.where(active.astype(bool), cache.lengths, -1)[:, None]
    tokens = tokens.astype(jnp.int32)[:, None]
    logits, cache = apply(params, loop.config, tokens, positions, cache, span=span)
    return logits[:, 0], constrain_cache(cache, loop.rules)


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
    loop: Loop,
    span: int | None,
    eos: Array,
    pad_id: Array,
    state: DecodeState,
    allowed: Array | bool = True,
) -> tuple[DecodeState, tuple[Array, Array]]:
    """Feed each active row's pending token, sample the next. Returns the new state and
    (emitted tokens [B], emitted mask [B])."""
    active = ~state.done & allowed
    logits, cache = _decode(params, state.cache, state.tokens, active, span, loop)
    stored = cache.lengths > state.cache.lengths  # False where the cache had no room
    key, sub = _split(state.key, loop.sampling)
    nxt = sample(logits, sub, loop.sampling)
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
    loop: Loop,
) -> tuple[DecodeState, Array, Array, Array]:
    """The loop's decode steps, one lax.scan per group; steps at or past `budget` do nothing.
    The emitted tokens and masks come back whole on every device (the host reads them)."""
    toks, oks, start = [], [], 0
    for n, span in loop.steps:

        def body(st: DecodeState, i: Array, span: int | None = span) -> Any:
            allowed = True if budget is None else i < budget
            return _step(params, loop, span, eos, pad_id, st, allowed)

        state, (t, ok) = lax.scan(body, state, jnp.arange(start, start + n))
        toks.append(t)
        oks.append(ok)
        start += n
    tok = jnp.concatenate(toks, axis=0).T if toks else jnp.zeros((state.tokens.shape[0], 0))
    ok = jnp.concatenate(oks, axis=0).T if oks else jnp.zeros((state.tokens.shape[0], 0), bool)
    all_done = replicate(jnp.all(state.done), loop.rules)
    return state, replicate(tok.astype(jnp.int32), loop.rules), replicate(ok, loop.rules), all_done


# --------------------------------------------------------------------------- entry points


@functools.partial(jax.jit, static_argnames=("loop",), donate_argnames=("cache",), keep_unused=True)
def generate_jit(
    params: Params,
    tokens: Array,
    positions: Array,
    key: Array,
    eos: Array,
    pad_id: Array,
    cache: KVCache | None,
    *,
    loop: Loop,
) -> tuple[Array, Array, DecodeState]:
    """Prefill, sample the first token, then the decode loop: one program."""
    logits, cache = _prefill(params, tokens, positions, cache, loop)
    state = _start(logits, cache, key, loop.sampling, eos)
    first = replicate(state.tokens, loop.rules)
    state, toks, ok, _ = _scan_steps(params, state, eos, pad_id, None, loop)
    out = jnp.concatenate([first[:, None], toks], axis=1)
    lengths = 1 + jnp.sum(ok, axis=1, dtype=jnp.int32)
    return out, lengths, state


@functools.partial(jax.jit, static_argnames=("loop",), donate_argnames=("state",))
def resume_jit(
    params: Params,
    state: DecodeState,
    eos: Array,
    pad_id: Array,
    budget: Array | None,
    *,
    loop: Loop,
) -> tuple[DecodeState, Array, Array, Array]:
    """The decode loop from a state (donated)."""
    return _scan_steps(params, state, eos, pad_id, budget, loop)


@functools.partial(jax.jit, static_argnames=("loop",), donate_argnames=("cache",), keep_unused=True)
def start_jit(
    params: Params,
    tokens: Array,
    positions: Array,
    key: Array,
    eos: Array,
    cache: KVCache | None,
    *,
    loop: Loop,
) -> tuple[DecodeState, Array, Array]:
    """Prefill and sample the first token (a stream's first program)."""
    logits, cache = _prefill(params, tokens, positions, cache, loop)
    state = _start(logits, cache, key, loop.sampling, eos)
    return state, replicate(state.tokens, loop.rules), replicate(jnp.all(state.done), loop.rules)


@functools.partial(jax.jit, static_argnames=("loop",), donate_argnames=("cache",), keep_unused=True)
def prefill_jit(
    params: Params, tokens: Array, positions: Array, cache: KVCache | None, *, loop: Loop
) -> tuple[Array, KVCache]:
    logits, cache = _prefill(params, tokens, positions, cache, loop)
    return replicate(logits, loop.rules), cache


@functools.partial(jax.jit, static_argnames=("loop",), donate_argnames=("cache",), keep_unused=True)
def decode_step_jit(
    params: Params, cache: KVCache, tokens: Array, active: Array, *, loop: Loop
) -> tuple[Array, KVCache]:
    logits, cache = _decode(params, cache, tokens, active, loop.span, loop)
    return replicate(logits, loop.rules), cache
