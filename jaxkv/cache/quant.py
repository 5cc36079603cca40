"""Quantized K/V storage, an option of every cache kind (not a kind of its own).

int8 with one absmax scale per token and KV head: a stored key or value vector x (head_dim
wide) is q = round(x / s) with s = max|x| / 127, so |x - q * s| <= s / 2 per element. The
scales ([B, N, slots], float32) sit beside the int8 buffers and attention applies them
without dequantizing the cache: the keys' scales multiply the scores (one per slot), the
values' scales multiply the probabilities before p @ V.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
QUANTIZED = ("int8",)


def is_quantized(dtype: Any) -> bool:
    return jnp.dtype(dtype) == jnp.int8


def quantize(x: Array) -> tuple[Array, Array]:
    """x [..., head_dim] -> (int8 [..., head_dim], float32 scale [...])."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xf / safe[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(q: Array, scale: Array | None, axis: int, dtype: Any) -> Array:
    """A stored buffer in full precision: q times its scale broadcast over the head_dim axis
    (`axis` is the slot axis of q; scale is [B, N, slots]). Unquantized: q as it is."""
    if scale is None:
        return q.astype(dtype)
    shape = list(q.shape)
    shape[-1 if axis == 2 else 2] = 1
    return (q.astype(jnp.float32) * scale.reshape(shape)).astype(dtype)
