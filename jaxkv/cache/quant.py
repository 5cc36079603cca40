"""Quantized K/V storage, an option of every cache kind (not a kind of its own).

`cache_dtype="int8"`: one byte per element; `"int4"`: two 4-bit values per byte, packed along
head_dim (stored as uint8, the low nibble first). Both keep one absmax scale per token and KV
head: a key or value vector x (head_dim wide) is stored as q = round(x / s), s = max|x| / qmax
(qmax 127 or 7), so |x - q * s| <= s / 2 per element. The scales ([B, N, slots], float32) sit
beside the quantized buffers and a decode step applies them without dequantizing the cache:
the keys' scales multiply the scores (one per slot), the values' scales multiply the
attention weights before p @ V.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
QUANTIZED = ("int8", "int4")


def storage_dtype(dtype: Any) -> np.dtype:
    """The dtype of the K/V buffers for a cache dtype ("int4" is stored packed in uint8)."""
    if isinstance(dtype, str) and dtype == "int4":
        return np.dtype(np.uint8)
    return jnp.dtype(dtype)


def is_quantized(dtype: Any) -> bool:
    return np.dtype(dtype) in (np.dtype(np.int8), np.dtype(np.uint8))


def packed(dtype: Any) -> bool:
    """Two 4-bit values per byte (int4 storage)."""
    return np.dtype(dtype) == np.dtype(np.uint8)


def quantize(x: Array, pack: bool = False) -> tuple[Array, Array]:
    """x [..., head_dim] -> (int8 [..., head_dim] or packed uint8 [..., head_dim / 2],
    float32 scale [...])."""
    qmax = 7.0 if pack else 127.0
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / qmax
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xf / safe[..., None]), -qmax, qmax).astype(jnp.int8)
    if not pack:
        return q, scale
    nib = (q + 8).astype(jnp.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4), scale


def unpack(q: Array, axis: int) -> Array:
    """int8 values of a stored buffer: packed uint8 unpacked along `axis` (its head_dim),
    int8 as it is."""
    if not packed(q.dtype):
        return q
    lo = (q & 15).astype(jnp.int8) - 8
    hi = (q >> 4).astype(jnp.int8) - 8
    both = jnp.stack([lo, hi], axis=axis + 1)
    shape = list(q.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def dequantize(q: Array, scale: Array | None, axis: int, dtype: Any) -> Array:
    """A stored buffer in full precision: q times its scale broadcast over head_dim (`axis` is
    the slot axis of q: 3 for keys [B, N, H, T], 2 for values [B, N, T, H]; scale is
    [B, N, T]). Unquantized: q as it is."""
    if scale is None:
        return q.astype(dtype)
    head_axis = 2 if axis == 3 else 3
    q = unpack(q, head_axis)
    shape = list(q.shape)
    shape[head_axis] = 1
    return (q.astype(jnp.float32) * scale.reshape(shape)).astype(dtype)
