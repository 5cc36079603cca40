"""Real text and perplexity, for judging cache policies on a real model.

`eval_text()` is English prose every machine has without a download: the paragraphs of the
Python documentation that the standard library ships in `pydoc_data/topics.py` (code samples,
grammar rules and heading underlines dropped). It follows the running Python's version.

`perplexity(params, config, tokens)` feeds the text token by token through the KV cache, one
`decode_step` per token inside one `lax.scan` (the StreamingLLM evaluation protocol: each
token is scored with exactly the cache a generation would have at that point), and returns the
perplexity and the per-token negative log-likelihoods. Cache policies that keep less than the
whole history are scored by the same loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import checks
from jaxkv.cache import Kind, KVCache, layer_kinds
from jaxkv.cache.kvcache import check_storage
from jaxkv.config import ModelConfig
from jaxkv.model import Params, apply

Array = jax.Array


def eval_text() -> str:
    """Prose paragraphs of the Python documentation shipped with the standard library."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            lines = para.split("\n")
            if not para.strip() or any(line.startswith(" ") for line in lines):
                continue  # code samples, grammar and tables are indented
            if any(set(line.strip()) <= set("*=-~^") for line in lines):
                continue  # headings
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


@functools.partial(
    jax.jit, static_argnames=("config", "capacity", "kinds", "cache_dtype", "prompt")
)
def _nll(
    params: Params,
    tokens: Array,
    *,
    config: ModelConfig,
    capacity: int,
    kinds: Any = None,
    cache_dtype: str | None = None,
    prompt: int = 0,
) -> tuple[Array, Array]:
    """Negative log-likelihood of tokens[1:] given everything before, fed one token per step
    after the first `prompt` tokens (fed as one block), and the most likely token at each
    step."""
    cache = KVCache.init(config, 1, capacity, cache_dtype, kinds)
    head_nll = head_top1 = None
    if prompt:
        pos = jnp.arange(prompt, dtype=jnp.int32)[None]
        logits, cache = apply(params, config, tokens[None, :prompt], pos, cache)
        logp = jax.nn.log_softmax(logits[0].astype(jnp.float32))
        head_nll = -jnp.take_along_axis(logp, tokens[1 : prompt + 1, None], axis=-1)[:, 0]
        head_top1 = jnp.argmax(logp, axis=-1).astype(jnp.int32)

    def step(cache: KVCache, xs: tuple[Array, Array, Array]) -> tuple[KVCache, Array]:
        tok, nxt, pos = xs
        logits, cache = apply(params, config, tok[None, None], pos[None, None], cache)
        logp = jax.nn.log_softmax(logits[0, 0])
        return cache, (-logp[nxt], jnp.argmax(logp).astype(jnp.int32))

    n = tokens.shape[0] - 1
    xs = (tokens[prompt:-1], tokens[prompt + 1 :], jnp.arange(prompt, n, dtype=jnp.int32))
    _, (nll, top1) = lax.scan(step, cache, xs)
    if prompt:
        nll, top1 = jnp.concatenate([head_nll, nll]), jnp.concatenate([head_top1, top1])
    return nll, top1


def perplexity(
    params: Params,
    config: ModelConfig,
    tokens: Any,
    *,
    capacity: int | None = None,
    cache: Kind | Sequence[Kind] | None = None,
    cache_dtype: str | None = None,
    prompt: int = 0,
) -> tuple[float, np.ndarray]:
    """(perplexity, per-token NLL [len - 1]) of one token sequence, scored token by token
    through a cache of `capacity` slots (default: the sequence length) of the kinds `cache`
    picks (e.g. `Window(512, sinks=4)`; default: what the model's layers need) stored as
    `cache_dtype` (e.g. "int8").

    `prompt` > 0: the first `prompt` tokens are fed as one block (a prefill, which a bounded
    cache compresses when it does not fit, e.g. `SnapKV`), the rest token by token; the
    perplexity is then that of the continuation, tokens[prompt + 1:] (the NLLs returned still
    cover every token: the prompt's from the prefill's logits)."""
    nll, _ = token_scores(
        params,
        config,
        tokens,
        capacity=capacity,
        cache=cache,
        cache_dtype=cache_dtype,
        prompt=prompt,
    )
    return math.exp(float(nll[prompt:].mean())), nll


def token_scores(
    params: Params,
    config: ModelConfig,
    tokens: Any,
    *,
    capacity: int | None = None,
    cache: Kind | Sequence[Kind] | None = None,
    cache_dtype: str | None = None,
    prompt: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(NLL of each next token [len - 1], the most likely next token at each step [len - 1]),
    token by token through the cache after a `prompt`-token block (see `perplexity`)."""
    (row,) = checks.token_rows([tokens], config.vocab_size)
    if len(row) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(row)}")
    if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt < len(row) - 1:
        raise ValueError(
            f"prompt must be an int in [0, {len(row) - 1}) for {len(row)} tokens (at least one "
            f"token is scored after it), got {prompt!r}"
        )
    capacity = checks.check_capacity(capacity if capacity is not None else len(row))
    if capacity < len(row) - 1:
        raise ValueError(
            f"{len(row)} tokens need {len(row) - 1} cache slots, over the capacity {capacity}"
        )
    kinds = None if cache is None else layer_kinds(config, cache, capacity)
    check_storage(layer_kinds(config, kinds, capacity), cache_dtype)
    nll, top1 = _nll(
        params,
        jnp.asarray(row, jnp.int32),
        config=config,
        capacity=capacity,
        kinds=kinds,
        cache_dtype=cache_dtype,
        prompt=prompt,
    )
    return np.asarray(nll, np.float64), np.asarray(top1)


def recompute_perplexity(
    params: Params,
    config: ModelConfig,
    tokens: Any,
    *,
    sinks: int,
    window: int,
    batch: int | None = None,
    stride: int = 1,
) -> tuple[float, np.ndarray]:
    """The recompute oracle of a sinks + window cache: token t + 1 is scored by the uncached
    forward on tokens[:sinks] + tokens[t - window + 1 : t + 1] at positions 0..sinks+window-1
    (every layer recomputed from the kept tokens alone; StreamingLLM's "sliding window with
    re-computation" baseline, with sinks): one forward of sinks + window tokens per scored
    token, so `stride` > 1 scores every stride-th token only (a sample, for large models).
    Windows run `batch` at a time (default: as many as keep the scores small; 32 windows of
    1152 tokens were killed for memory here). Returns (perplexity, NLL of the scored
    tokens)."""
    from jaxkv.model import forward

    (row,) = checks.token_rows([tokens], config.vocab_size)
    scored = np.arange(0, len(row) - 1, stride)
    n, width = len(scored), sinks + window
    if batch is None:  # scores of one forward stay near 2**22 elements per head and layer
        batch = max(1, min(32, (1 << 22) // (width * width)))
    windows = np.zeros((n, width), np.int32)
    positions = np.full((n, width), -1, np.int32)
    last = np.zeros(n, np.int64)
    for i, t in enumerate(scored):
        kept = (
            row[: t + 1]
            if t + 1 <= width
            else np.concatenate([row[:sinks], row[t + 1 - window : t + 1]])
        )
        windows[i, : len(kept)] = kept
        positions[i, : len(kept)] = np.arange(len(kept))
        last[i] = len(kept) - 1
    nll = np.zeros(n)
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        rows = np.zeros((batch, width), np.int32)
        pos = np.full((batch, width), -1, np.int32)
        rows[: hi - lo], pos[: hi - lo] = windows[lo:hi], positions[lo:hi]
        logits = np.asarray(forward(params, config, rows, pos), np.float64)
        picked = logits[np.arange(hi - lo), last[lo:hi]]
        top = picked.max(axis=-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(picked - top).sum(axis=-1))
        nll[lo:hi] = logz - picked[np.arange(hi - lo), row[scored[lo:hi] + 1]]
    return math.exp(float(nll.mean())), nll
