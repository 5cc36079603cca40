"""The heavy-hitter kind (H2O): a fixed budget of `heavy + recent` slots per row and per KV
head, keeping the `recent` newest tokens and the `heavy` tokens with the most accumulated
attention probability.

Attention hands the cache what it needs (`needs_probs`): the probability each stored slot and
each new token received this step. With grouped-query attention the query heads of a group
vote together: their probabilities are summed into the one KV head they share (a token that
any head of the group attends to is kept for the group). Scores accumulate every step,
prefill included.

- Decode (one token): while a head has a free slot the token takes it; then it replaces the
  slot with the lowest accumulated score among those not in the recent window (the new token
  and the `recent - 1` newest stored ones). One scatter per (row, head), ordered after
  attention's read: in place.
- A block (prefill, extend): the stored slots and the block's tokens are ranked together (the
  `recent` newest first, then by score) and the top `heavy + recent` kept: a gather, once per
  block.

`policy="random"` evicts by a fixed pseudo-random score of each position instead (the
baseline any policy must beat), through the same code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv.cache.base import Segment, WritePlan, kv_zeros, ordered_after

Array = jax.Array
POLICIES = ("h2o", "random")


def _random_score(pos: Array) -> Array:
    """A fixed pseudo-random score in [0, 1) of each position (the random-eviction baseline)."""
    x = jnp.sin(pos.astype(jnp.float32) * 12.9898 + 78.233) * 43758.5453
    return x - jnp.floor(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeavyLayer:
    """k `[B, N, H, T]`, v `[B, N, T, H]`, pos int32 `[B, N, T]` (per KV head: heads keep
    different tokens; -1 empty), score float32 `[B, N, T]` (accumulated attention), with
    T = heavy + recent."""

    k: Array
    v: Array
    pos: Array
    score: Array
    heavy: int = dataclasses.field(metadata=dict(static=True), default=0)
    recent: int = dataclasses.field(metadata=dict(static=True), default=1)
    policy: str = dataclasses.field(metadata=dict(static=True), default="h2o")
    window = None
    sinks = 0
    sink_positions = "original"
    needs_probs = True
    k_scale = None
    v_scale = None

    @classmethod
    def zeros(
        cls,
        batch_size: int,
        heavy: int,
        recent: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: Any,
        policy: str = "h2o",
    ) -> HeavyLayer:
        slots = heavy + recent
        return cls(
            **kv_zeros(batch_size, slots, n_kv_heads, head_dim, dtype),
            pos=jnp.full((batch_size, n_kv_heads, slots), -1, jnp.int32),
            score=jnp.zeros((batch_size, n_kv_heads, slots), jnp.float32),
            heavy=heavy,
            recent=recent,
            policy=policy,
        )

    @property
    def slots(self) -> int:
        return self.pos.shape[-1]

    def segments(self, plan: WritePlan, span: int | None) -> tuple[Segment, ...]:
        if span == 0:
            return ()
        return (Segment(self.k, self.v, self.pos),)

    def _scores(self, acc: Array, pos: Array) -> Array:
        return _random_score(pos) if self.policy == "random" else acc

    def write(
        self,
        k_new: Array,
        v_new: Array,
        plan: WritePlan,
        after: Array | None = None,
        probs: tuple[list[Array], Array] | None = None,
    ) -> HeavyLayer:
        seg_probs, new_probs = probs
        acc = self.score + seg_probs[0] if seg_probs else self.score
        if k_new.shape[1] == 1:
            return self._write_one(k_new, v_new, plan, after, acc, new_probs[:, :, 0])
        return self._write_block(k_new, v_new, plan, acc, new_probs)

    def _write_one(
        self, k_new: Array, v_new: Array, plan: WritePlan, after: Array | None, acc, new_prob
    ) -> HeavyLayer:
        valid, p = plan.valid[:, 0], plan.positions[:, 0]  # [B]
        acc = jnp.where(valid[:, None, None], acc, self.score)
        free = self.pos < 0
        protected = self.pos > p[:, None, None] - self.recent  # the recent window, new included
        ranked = jnp.where(protected | free, jnp.inf, self._scores(acc, self.pos))
        slot = jnp.where(jnp.any(free, -1), jnp.argmax(free, -1), jnp.argmin(ranked, -1))
        slot = jnp.where(valid[:, None], slot, self.slots).astype(jnp.int32)  # [B, N]
        b = jnp.arange(slot.shape[0])[:, None]
        n = jnp.arange(slot.shape[1])[None, :]
        dep = None if after is None else after[:, 0]  # [B, N, H]
        k = self.k.at[b, n, :, slot].set(ordered_after(k_new[:, 0], dep), mode="drop")
        v = self.v.at[b, n, slot].set(ordered_after(v_new[:, 0], dep), mode="drop")
        small = None if after is None else after[:, 0, :, 0]  # [B, N]
        pos = jnp.broadcast_to(p[:, None], slot.shape)
        return dataclasses.replace(
            self,
            k=k,
            v=v,
            pos=self.pos.at[b, n, slot].set(ordered_after(pos, small), mode="drop"),
            score=acc.at[b, n, slot].set(ordered_after(new_prob, small), mode="drop"),
        )

    def _write_block(
        self, k_new: Array, v_new: Array, plan: WritePlan, acc: Array, new_probs: Array
    ) -> HeavyLayer:
        n = self.pos.shape[1]
        new_pos = jnp.where(plan.valid, plan.positions, -1)[:, None, :]  # [B, 1, S]
        new_pos = jnp.broadcast_to(new_pos, (new_pos.shape[0], n, new_pos.shape[2]))
        pos = jnp.concatenate([self.pos, new_pos], axis=-1)  # [B, N, T + S]
        score = jnp.concatenate([acc, jnp.where(new_pos >= 0, new_probs, 0.0)], axis=-1)
        last = jnp.max(pos, axis=-1, keepdims=True)
        recent = pos > last - self.recent
        rank = jnp.where(recent, jnp.inf, self._scores(score, pos))
        rank = jnp.where(pos < 0, -jnp.inf, rank)
        _, keep = lax.top_k(rank, self.slots)  # [B, N, T]
        k = jnp.concatenate([self.k, k_new.transpose(0, 2, 3, 1).astype(self.k.dtype)], axis=3)
        v = jnp.concatenate([self.v, v_new.transpose(0, 2, 1, 3).astype(self.v.dtype)], axis=2)
        pos = jnp.take_along_axis(pos, keep, axis=-1)
        v = jnp.take_along_axis(v, keep[..., None], axis=2)
        return dataclasses.replace(
            self,
            k=jnp.take_along_axis(k, keep[:, :, None, :], axis=3),
            v=jnp.where((pos >= 0)[..., None], v, 0).astype(self.v.dtype),
            pos=pos,
            score=jnp.where(pos >= 0, jnp.take_along_axis(score, keep, axis=-1), 0.0),
        )

    def reset(self) -> HeavyLayer:
        return dataclasses.replace(
            self,
            v=jnp.zeros_like(self.v),
            pos=jnp.full_like(self.pos, -1),
            score=jnp.zeros_like(self.score),
        )

    def truncate(self, keep: Array, table: Array | None = None) -> HeavyLayer:
        """Forget positions >= keep[b] (what was evicted stays evicted)."""
        freed = self.pos >= keep[:, None, None]
        return dataclasses.replace(
            self,
            v=jnp.where(freed[..., None], 0, self.v).astype(self.v.dtype),
            pos=jnp.where(freed, -1, self.pos),
            score=jnp.where(freed, 0.0, self.score),
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": tuple(self.k.shape), "v": tuple(self.v.shape), "pos": tuple(self.pos.shape)}
