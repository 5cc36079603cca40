"""Token sampling: pure functions of (logits, key).

`sample(logits, key, config)` applies, in this order:

1. temperature 0 (or below GREEDY_BELOW): greedy argmax (nothing below applies);
2. temperature: logits / temperature;
3. top-k: keep the k largest logits;
4. top-p (nucleus): keep the smallest set of tokens, in order of probability, whose
   probability sums to at least top_p (the most likely token is always kept);
5. min-p: keep tokens whose probability is at least min_p times the most likely one's;
6. draw from the softmax of what is left (`jax.random.categorical`).

Probabilities in 4 and 5 are those after the earlier steps. This is the order Hugging Face
transformers applies its warpers in. Removed tokens get -inf; the top token is never removed,
so a draw always has a candidate. A disabled filter costs nothing (no sort without top-p).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

Array = jax.Array


GREEDY_BELOW = 1e-6


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Hashable: it is a static argument of the compiled loop.

    temperature: 0 for greedy, otherwise > 0. A temperature below GREEDY_BELOW (1e-6) also
        samples greedily: float32 logits divided by it overflow or, below float32's smallest
        normal, divide by zero; its distribution is the argmax's anyway.
    top_k: None or 0 to disable, otherwise >= 1.
    top_p: in (0, 1]; 1 disables.
    min_p: in [0, 1); 0 disables.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {t!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, numbers.Integral)
            or self.top_k < 0
        ):
            raise ValueError(f"top_k must be None or an int >= 0, got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        m = self.min_p
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 <= m < 1:
            raise ValueError(f"min_p must be in [0, 1), got {m!r}")
        if self.top_k == 0:
            object.__setattr__(self, "top_k", None)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


GREEDY = SamplingConfig(temperature=0.0)


def greedy(logits: Array) -> Array:
    """The most likely token of each row: int32 [B] from logits [B, V]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def apply_temperature(logits: Array, temperature: float) -> Array:
    return logits.astype(jnp.float32) / temperature


def top_k_filter(logits: Array, k: int) -> Array:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Array, p: float) -> Array:
    """Keep the smallest most-probable set whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of all more likely tokens
    keep = before < p  # the top token has before == 0, so it is always kept
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def min_p_filter(logits: Array, min_p: float) -> Array:
    """Keep tokens with probability >= min_p * the top probability."""
    if min_p <= 0.0:
        return logits
    top = jnp.max(logits, axis=-1, keepdims=True)
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    return jnp.where(logits < top + jnp.log(min_p), -jnp.inf, logits)


def sample(logits: Array, key: Array, config: SamplingConfig) -> Array:
    """Next token of each row: int32 [B] from logits [B, V]. See the module docstring."""
    if config.greedy:
        return greedy(logits)
    x = apply_temperature(logits, config.temperature)
    if config.top_k is not None:
        x = top_k_filter(x, config.top_k)
    x = top_p_filter(x, config.top_p)
    x = min_p_filter(x, config.min_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
