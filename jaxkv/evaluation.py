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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import checks
from jaxkv.cache import KVCache
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


@functools.partial(jax.jit, static_argnames=("config", "capacity"))
def _nll(params: Params, tokens: Array, *, config: ModelConfig, capacity: int) -> Array:
    """Negative log-likelihood of tokens[1:] given everything before, fed one token per step."""
    cache = KVCache.init(config, 1, capacity)

    def step(cache: KVCache, xs: tuple[Array, Array, Array]) -> tuple[KVCache, Array]:
        tok, nxt, pos = xs
        logits, cache = apply(params, config, tok[None, None], pos[None, None], cache)
        logp = jax.nn.log_softmax(logits[0, 0])
        return cache, -logp[nxt]

    n = tokens.shape[0] - 1
    xs = (tokens[:-1], tokens[1:], jnp.arange(n, dtype=jnp.int32))
    _, nll = lax.scan(step, cache, xs)
    return nll


def perplexity(
    params: Params, config: ModelConfig, tokens: Any, *, capacity: int | None = None
) -> tuple[float, np.ndarray]:
    """(perplexity, per-token NLL [len - 1]) of one token sequence, scored token by token
    through a cache of `capacity` slots (default: the sequence length)."""
    (row,) = checks.token_rows([tokens], config.vocab_size)
    if len(row) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(row)}")
    capacity = checks.check_capacity(capacity if capacity is not None else len(row))
    if capacity < len(row) - 1:
        raise ValueError(
            f"{len(row)} tokens need {len(row) - 1} cache slots, over the capacity {capacity}"
        )
    nll = np.asarray(
        _nll(params, jnp.asarray(row, jnp.int32), config=config, capacity=capacity),
        np.float64,
    )
    return math.exp(float(nll.mean())), nll
