"""Input validation at the API boundary, in plain Python before anything is traced.

Every error names the values involved. Nothing is clamped, truncated or converted silently.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxkv.config import ModelConfig


def _as_int_row(row: Any, i: int) -> np.ndarray:
    if isinstance(row, (str, bytes)):
        raise TypeError(f"prompt {i} is a {type(row).__name__}; encode it to token ids first")
    if hasattr(row, "dtype") and hasattr(row, "shape"):  # numpy or jax array
        arr = np.asarray(row)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"prompt {i} holds non-integer tokens (dtype {arr.dtype}); token ids must be ints"
            )
    else:
        row = list(row)
        for t in row:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
                raise TypeError(
                    f"prompt {i} holds non-integer tokens (e.g. {t!r}); token ids must be ints"
                )
        arr = np.asarray(row, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"prompt {i} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    return arr.astype(np.int64)


def token_rows(prompts: Any, vocab_size: int) -> list[np.ndarray]:
    """Validate a batch of prompts (a 2-D int array or a sequence of int sequences) and return
    one int64 array per row."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts is a string; encode it to token ids first")
    if hasattr(prompts, "ndim") and getattr(prompts, "ndim", None) == 1:
        raise ValueError(
            f"prompts must be a batch (2-D, [batch, length]), got a 1-D array of shape "
            f"{tuple(prompts.shape)}; wrap a single prompt in a list"
        )
    if not isinstance(prompts, (Sequence, np.ndarray)) and not hasattr(prompts, "__array__"):
        raise TypeError(f"prompts must be a sequence of token sequences, got {type(prompts)}")
    if len(prompts) and all(
        isinstance(t, (numbers.Integral, np.integer)) and not isinstance(t, bool) for t in prompts
    ):
        raise ValueError(
            f"prompts must be a batch of token sequences, got one flat sequence of "
            f"{len(prompts)} ints; wrap a single prompt in a list: [[{prompts[0]}, ...]]"
        )
    rows = [_as_int_row(row, i) for i, row in enumerate(prompts)]
    if not rows:
        raise ValueError("the batch is empty; give at least one prompt")
    for i, row in enumerate(rows):
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"prompt {i} has token id {bad} outside the vocabulary [0, {vocab_size})"
            )
    return rows


def check_token_id(name: str, value: Any, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int token id, got {value!r}")
    if not 0 <= int(value) < vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")
    return int(value)


def check_max_new_tokens(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return int(max_new_tokens)


def check_fits(
    longest_prompt: int, max_new_tokens: int, capacity: int, config: ModelConfig
) -> None:
    """The longest prompt plus the new tokens must fit in the cache (and, for a learned
    position table, in the model's max_seq_len)."""
    total = longest_prompt + max_new_tokens
    if total > capacity:
        raise ValueError(
            f"prompt length {longest_prompt} + max_new_tokens {max_new_tokens} = {total} "
            f"exceeds the cache capacity {capacity}"
        )
    if config.position == "learned" and total > config.max_seq_len:
        raise ValueError(
            f"prompt length {longest_prompt} + max_new_tokens {max_new_tokens} = {total} "
            f"exceeds the model's max_seq_len {config.max_seq_len} (learned positions)"
        )


def check_capacity(capacity: Any) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    return int(capacity)


def eos_tuple(eos_ids: Any, vocab_size: int) -> tuple[int, ...]:
    """Normalise EOS ids (None, one int, or several) to a tuple of valid ids."""
    if eos_ids is None:
        return ()
    if isinstance(eos_ids, (numbers.Integral, np.integer)) and not isinstance(eos_ids, bool):
        eos_ids = (eos_ids,)
    return tuple(check_token_id("eos id", e, vocab_size) for e in eos_ids)
