"""Cache kinds as a user picks them: `Dense()`, `Window(size, sinks=...)`, `Heavy(heavy,
recent)` and `SnapKV(budget)`, resolved into one layer kind per layer of a model.

By default (`kinds=None`) each layer gets what its attention needs: a full-attention layer a
dense cache of `capacity` slots, a sliding-window layer (`ModelConfig.sliding_window` /
`layer_types`) a ring of `sliding_window` slots, or a dense cache when the capacity is no
larger than the window (then it holds everything the window could see, in fewer slots).
`Window` on every layer bounds the whole cache (a long chat or rollout in constant memory);
a sequence of kinds, one per layer, mixes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxkv.cache.heavy import POLICIES, SNAP_DECODE
from jaxkv.cache.ring import SINK_POSITIONS
from jaxkv.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Dense:
    """One slot per token, up to the cache's capacity."""


@dataclasses.dataclass(frozen=True)
class Window:
    """A ring of the last `size` tokens (queries see `size` positions, themselves included),
    behind `sinks` attention sinks (each row's first tokens, kept forever). `positions`:
    "cache" scores the sinks at positions within the cache (StreamingLLM), "original" at
    the tokens' original positions."""

    size: int
    sinks: int = 0
    positions: str = "cache"

    def __post_init__(self) -> None:
        for name in ("size", "sinks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Window.{name} must be an int, got {value!r}")
        if self.size < 1:
            raise ValueError(f"Window.size must be >= 1, got {self.size}")
        if self.sinks < 0:
            raise ValueError(f"Window.sinks must be >= 0, got {self.sinks}")
        if self.positions not in SINK_POSITIONS:
            raise ValueError(
                f"Window.positions must be one of {SINK_POSITIONS}, got {self.positions!r}"
            )


@dataclasses.dataclass(frozen=True)
class Heavy:
    """Heavy hitters + recent tokens (H2O) in `heavy + recent` slots per row and KV head:
    the `recent` newest tokens and the `heavy` ones with the most accumulated attention.
    `policy="random"` evicts at random instead (the baseline)."""

    heavy: int
    recent: int
    policy: str = "h2o"

    def __post_init__(self) -> None:
        for name, low in (("heavy", 0), ("recent", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Heavy.{name} must be an int >= {low}, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"Heavy.policy must be one of {POLICIES}, got {self.policy!r}")


@dataclasses.dataclass(frozen=True)
class SnapKV:
    """Prefill compression (SnapKV) in `budget` slots per row and KV head: when a block (a
    prompt, a chunk of one, an extension) does not fit, its last `window` queries vote on
    what each KV head keeps; their attention, averaged over `kernel` neighbouring positions,
    picks the top `budget - window` older tokens, kept beside the window. Decoding then
    continues in the budget by `decode`: "h2o" (heavy hitters, `window` recent slots) or
    "ring" (the selected tokens stay; the others slide as a window)."""

    budget: int
    window: int = 32
    kernel: int = 7
    decode: str = "h2o"

    def __post_init__(self) -> None:
        for name, low in (("budget", 2), ("window", 1), ("kernel", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SnapKV.{name} must be an int >= {low}, got {value!r}")
        if self.window >= self.budget:
            raise ValueError(
                f"SnapKV.window ({self.window}) must be smaller than the budget ({self.budget}): "
                "the budget holds the window plus the selected tokens"
            )
        if self.kernel % 2 == 0:
            raise ValueError(f"SnapKV.kernel must be odd (centred pooling), got {self.kernel}")
        if self.decode not in SNAP_DECODE:
            raise ValueError(f"SnapKV.decode must be one of {SNAP_DECODE}, got {self.decode!r}")


Kind = Dense | Window | Heavy | SnapKV
KINDS = (Dense, Window, Heavy, SnapKV)


def layer_kinds(
    config: ModelConfig, kinds: Kind | Sequence[Kind] | None, capacity: int | None
) -> tuple[Kind, ...]:
    """One resolved kind per layer (see the module docstring). A layer's ring never exceeds
    the model's own window on that layer: its mask is the smaller of the two."""
    if kinds is None:
        out = []
        for w in config.layer_windows:
            if w is None or (capacity is not None and capacity <= w):
                out.append(Dense())
            else:
                out.append(Window(w))
        return tuple(out)
    if isinstance(kinds, KINDS):
        kinds = (kinds,) * config.n_layers
    kinds = tuple(kinds)
    if len(kinds) != config.n_layers:
        raise ValueError(f"got {len(kinds)} cache kinds for a model of {config.n_layers} layers")
    out = []
    for i, kind in enumerate(kinds):
        if not isinstance(kind, KINDS):
            raise TypeError(
                f"cache kind of layer {i} must be Dense, Window, Heavy or SnapKV, got {kind!r}"
            )
        if isinstance(kind, (Heavy, SnapKV)) and config.layer_window(i) is not None:
            name = "heavy-hitter eviction" if isinstance(kind, Heavy) else "SnapKV"
            raise ValueError(
                f"layer {i} has a sliding window ({config.layer_window(i)}); {name} applies "
                "to full-attention layers"
            )
        w = config.layer_window(i)
        if isinstance(kind, Window) and w is not None and kind.size > w:
            kind = dataclasses.replace(kind, size=w)
        if isinstance(kind, Window) and kind.sinks and kind.positions == "cache":
            if config.position != "rope":
                raise ValueError(
                    "attention sinks at cache positions need rotary positions; this model has "
                    f"position={config.position!r}: use Window(..., positions='original')"
                )
        out.append(kind)
    return tuple(out)


def needs_capacity(kinds: tuple[Any, ...]) -> bool:
    """Whether any layer is dense (then the cache has a capacity)."""
    return any(isinstance(k, Dense) for k in kinds)
