"""Quantized K/V storage, an option of every cache kind (not a kind of its own).

`cache_dtype="int8"`: one byte per element; `"int4"`: two 4-bit values per byte, packed along
head_dim (stored as uint8, the low nibble first). A vector x is stored as q = round(x / s),
s = max|x| / qmax (qmax 127 or 7) over the elements sharing the scale, so |x - q * s| <= s / 2
per element. The scales (float32) sit beside the quantized buffers and a decode step applies
them without dequantizing the cache: the keys' scales multiply the scores, the values' scales
multiply the attention weights before p @ V.

Scale layouts (`KVQuant(dtype, scales=...)`; a plain "int8" / "int4" is `scales="head"`):

- "head": one scale per token and KV head (scales [B, N, slots]), every cache kind;
- "token": one scale per token shared by its KV heads ([B, 1, slots]), dense and ring layers;
- "kivi": keys per channel over groups of `group` consecutive slots ([B, N, head_dim,
  slots / group]: outliers live in a few key channels, KIVI), values per token and head;
  dense layers only. The group being filled is re-quantized at every write from its
  full-precision copy, so a group's scales are final once it is complete.

`residual=True` (dense layers) keeps the group being filled (the newest 1..group tokens) in
full precision beside the quantized store, and attention reads those tokens from it (KIVI's
residual); quantized storage of them is still written, so nothing is lost when the group
completes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
QUANTIZED = ("int8", "int4")
SCALES = ("head", "token", "kivi")


@dataclasses.dataclass(frozen=True)
class KVQuant:
    """Quantized K/V storage: `dtype` "int8" or "int4", the scale layout `scales` ("head",
    "token" or "kivi"), the `group` of slots that "kivi" key scales and the residual cover,
    and `residual` (read the group being filled in full precision). See the module
    docstring."""

    dtype: str = "int8"
    scales: str = "head"
    group: int = 32
    residual: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in QUANTIZED:
            raise ValueError(f"KVQuant.dtype must be one of {QUANTIZED}, got {self.dtype!r}")
        if self.scales not in SCALES:
            raise ValueError(f"KVQuant.scales must be one of {SCALES}, got {self.scales!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"KVQuant.group must be an int >= 1, got {self.group!r}")
        if not isinstance(self.residual, bool):
            raise TypeError(f"KVQuant.residual must be a bool, got {self.residual!r}")

    @property
    def grouped(self) -> bool:
        """Whether layers keep a full-precision copy of the group being filled."""
        return self.scales == "kivi" or self.residual

    def describe(self) -> str:
        extra = f", group={self.group}" if self.grouped else ""
        res = ", residual" if self.residual else ""
        return f"{self.dtype} ({self.scales} scales{extra}{res})"


def quant_spec(cache_dtype: Any) -> KVQuant | None:
    """The quantized layout a cache dtype asks for (None: full precision)."""
    if cache_dtype is None or isinstance(cache_dtype, KVQuant):
        return cache_dtype
    if isinstance(cache_dtype, str) and cache_dtype in QUANTIZED:
        return KVQuant(cache_dtype)
    if np.dtype(cache_dtype) == np.dtype(np.int8):
        return KVQuant("int8")
    return None


def storage_dtype(dtype: Any) -> np.dtype:
    """The dtype of the K/V buffers for a cache dtype ("int4" is stored packed in uint8)."""
    if isinstance(dtype, KVQuant):
        dtype = dtype.dtype
    if isinstance(dtype, str) and dtype == "int4":
        return np.dtype(np.uint8)
    return jnp.dtype(dtype)


def is_quantized(dtype: Any) -> bool:
    return np.dtype(dtype) in (np.dtype(np.int8), np.dtype(np.uint8))


def packed(dtype: Any) -> bool:
    """Two 4-bit values per byte (int4 storage)."""
    return np.dtype(dtype) == np.dtype(np.uint8)


def quantize(x: Array, pack: bool = False, shared: bool = False) -> tuple[Array, Array]:
    """x [..., N, head_dim] -> (int8 [..., N, head_dim] or packed uint8 [..., N, head_dim / 2],
    float32 scale [..., N], or with `shared` one scale per token [..., 1])."""
    qmax = 7.0 if pack else 127.0
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=(-2, -1) if shared else -1)
    scale = (scale[..., None] if shared else scale) / qmax
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xf / safe[..., None]), -qmax, qmax).astype(jnp.int8)
    return (pack_pairs(q) if pack else q), scale


def quantize_channels(x: Array, group: int, pack: bool = False) -> tuple[Array, Array]:
    """Keys [B, N, H, L] (L a multiple of `group`) -> (int8 [B, N, H, L], or packed uint8
    [B, N, H / 2, L], float32 scales [B, N, H, L / group]): one absmax scale per channel and
    group of `group` consecutive slots (KIVI's key layout)."""
    qmax = 7.0 if pack else 127.0
    b, n, h, length = x.shape
    xf = x.astype(jnp.float32).reshape(b, n, h, length // group, group)
    scale = jnp.max(jnp.abs(xf), axis=-1) / qmax
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xf / safe[..., None]), -qmax, qmax).astype(jnp.int8)
    q = q.reshape(b, n, h, length)
    if pack:
        q = pack_pairs(q.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    return q, scale


def pack_pairs(q: Array) -> Array:
    """int8 values in [-8, 7] two to a byte along the last axis (the low nibble first)."""
    nib = (q + 8).astype(jnp.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


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
    [B, N, T] or [B, 1, T], or for keys per channel [B, N, H, T / group]). Unquantized: q as
    it is."""
    if scale is None:
        return q.astype(dtype)
    head_axis = 2 if axis == 3 else 3
    q = unpack(q, head_axis)
    if scale.ndim == 4:  # keys per channel and group of slots
        scale = jnp.repeat(scale, q.shape[3] // scale.shape[3], axis=3)
    else:
        scale = jnp.expand_dims(scale, head_axis)
    return (q.astype(jnp.float32) * scale).astype(dtype)
