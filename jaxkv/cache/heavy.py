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

SnapKV (`snap_kernel` > 0, the `SnapKV` kind): a block instead keeps what its last `recent`
queries (the observation window, per row: its `recent` newest positions) attend to. Their
probabilities (summed over the window's queries and the group's query heads) are the votes
of every older candidate, stored or new; the votes are averaged over a kernel of
`snap_kernel` neighbouring positions (zero beyond the candidates and for the window itself,
as SnapKV's `avg_pool1d(padding=kernel // 2)`), and the top `heavy` are kept beside the
window. Decode then continues as H2O (`policy="h2o"`, the scores accumulated from every
query) or as a ring (`policy="ring"`: the block's selected tokens stay, the oldest of the
others is evicted; `score` then holds 1 for a selected slot, 0 otherwise). With a chunked
prefill each chunk is a block, voted on by its own last queries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv.cache.base import Received, Segment, WritePlan, kv_zeros, ordered_after, store

Array = jax.Array
POLICIES = ("h2o", "random")
SNAP_DECODE = ("h2o", "ring")


def _random_score(pos: Array) -> Array:
    """A fixed pseudo-random score in [0, 1) of each position (the random-eviction baseline)."""
    x = jnp.sin(pos.astype(jnp.float32) * 12.9898 + 78.233) * 43758.5453
    return x - jnp.floor(x)


def pool_by_position(pos: Array, x: Array, kernel: int) -> Array:
    """Average of x over the `kernel` positions centred on each candidate's (pos [..., T],
    distinct per row, -1 empty; x [..., T] in the same order), absent positions counting 0:
    `avg_pool1d(x, kernel, stride=1, padding=kernel // 2)` over a sequence of positions,
    whatever order the slots hold them in."""
    half = kernel // 2
    order = jnp.argsort(pos, axis=-1)
    sp = jnp.take_along_axis(pos, order, axis=-1)
    sx = jnp.take_along_axis(x, order, axis=-1)
    pad = [(0, 0)] * (pos.ndim - 1) + [(half, half)]
    pp = jnp.pad(sp, pad, constant_values=-1)
    px = jnp.pad(sx, pad)
    n = pos.shape[-1]
    total = jnp.zeros_like(sx)
    for d in range(kernel):  # neighbours at sorted offsets -half..half
        p_d, x_d = pp[..., d : d + n], px[..., d : d + n]
        near = (p_d >= 0) & (sp >= 0) & (jnp.abs(p_d - sp) <= half)
        total = total + jnp.where(near, x_d, 0.0)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(total / kernel, inverse, axis=-1)


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
    k_scale: Array | None = None  # [B, N, T] with quantized storage (per token and head)
    v_scale: Array | None = None
    heavy: int = dataclasses.field(metadata=dict(static=True), default=0)
    recent: int = dataclasses.field(metadata=dict(static=True), default=1)
    policy: str = dataclasses.field(metadata=dict(static=True), default="h2o")
    snap_kernel: int = dataclasses.field(metadata=dict(static=True), default=0)
    window = None
    sinks = 0
    sink_positions = "original"
    needs_probs = True

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
        snap_kernel: int = 0,
    ) -> HeavyLayer:
        slots = heavy + recent
        return cls(
            **kv_zeros(batch_size, slots, n_kv_heads, head_dim, dtype),
            pos=jnp.full((batch_size, n_kv_heads, slots), -1, jnp.int32),
            score=jnp.zeros((batch_size, n_kv_heads, slots), jnp.float32),
            heavy=heavy,
            recent=recent,
            policy=policy,
            snap_kernel=snap_kernel,
        )

    @property
    def slots(self) -> int:
        return self.pos.shape[-1]

    @property
    def vote_queries(self) -> int:
        """How many of a block's last positions vote (SnapKV's window; 0: no vote)."""
        return self.recent if self.snap_kernel else 0

    def describe(self) -> str:
        if self.snap_kernel:
            return (
                f"snapkv(budget={self.slots}, window={self.recent}, kernel={self.snap_kernel}, "
                f"decode={self.policy})"
            )
        return f"{self.policy}(heavy={self.heavy}, recent={self.recent})"

    def segments(self, plan: WritePlan, span: int | None) -> tuple[Segment, ...]:
        if span == 0:
            return ()
        return (Segment(self.k, self.v, self.pos, 0, self.k_scale, self.v_scale),)

    def _scores(self, acc: Array, pos: Array) -> Array:
        """What decode evicts the lowest of: accumulated attention (h2o), a fixed random
        score (random), or the position (ring: the oldest)."""
        if self.policy == "random":
            return _random_score(pos)
        return pos.astype(jnp.float32) if self.policy == "ring" else acc

    def write(
        self,
        k_new: Array,
        v_new: Array,
        plan: WritePlan,
        after: Array | None = None,
        probs: Received | None = None,
    ) -> HeavyLayer:
        ring = self.policy == "ring"
        acc = self.score + probs.stored[0] if probs.stored and not ring else self.score
        if k_new.shape[1] == 1:
            new = jnp.zeros_like(probs.new[:, :, 0]) if ring else probs.new[:, :, 0]
            return self._write_one(k_new, v_new, plan, after, acc, new)
        return self._write_block(k_new, v_new, plan, acc, probs)

    def _write_one(
        self, k_new: Array, v_new: Array, plan: WritePlan, after: Array | None, acc, new_prob
    ) -> HeavyLayer:
        valid, p = plan.valid[:, 0], plan.positions[:, 0]  # [B]
        acc = jnp.where(valid[:, None, None], acc, self.score)
        free = self.pos < 0
        protected = self.pos > p[:, None, None] - self.recent  # the recent window, new included
        if self.policy == "ring":  # the oldest slot not selected by the last block
            protected = self.score > 0
        ranked = jnp.where(protected | free, jnp.inf, self._scores(acc, self.pos))
        slot = jnp.where(jnp.any(free, -1), jnp.argmax(free, -1), jnp.argmin(ranked, -1))
        slot = jnp.where(valid[:, None], slot, self.slots).astype(jnp.int32)  # [B, N]
        b = jnp.arange(slot.shape[0])[:, None]
        n = jnp.arange(slot.shape[1])[None, :]
        dep = None if after is None else after[:, 0]  # [B, N, H]
        (k_new, k_scale), (v_new, v_scale) = self._store(k_new, v_new)
        if dep is not None:  # shaped like what is stored (int4 packs head_dim in halves)
            dep = dep[..., : k_new.shape[-1]]
        k = self.k.at[b, n, :, slot].set(ordered_after(k_new[:, 0], dep), mode="drop")
        v = self.v.at[b, n, slot].set(ordered_after(v_new[:, 0], dep), mode="drop")
        small = None if after is None else after[:, 0, :, 0]  # [B, N]
        pos = jnp.broadcast_to(p[:, None], slot.shape)
        scales = {}
        if k_scale is not None:
            for name, new in (("k_scale", k_scale), ("v_scale", v_scale)):
                buf = getattr(self, name)
                scales[name] = buf.at[b, n, slot].set(ordered_after(new[:, 0], small), mode="drop")
        # The score is rewritten whole (acc touches every slot), so the new token's entry goes
        # in by a select in that same pass, not a scatter into acc: on the GPU the scatter made
        # XLA copy the score array once more per layer and step (seen on an H200).
        chosen = jnp.arange(self.slots) == slot[..., None]  # no slot for paused rows
        return dataclasses.replace(
            self,
            **scales,
            k=k,
            v=v,
            pos=self.pos.at[b, n, slot].set(ordered_after(pos, small), mode="drop"),
            score=jnp.where(chosen, ordered_after(new_prob, small)[..., None], acc),
        )

    def _write_block(
        self, k_new: Array, v_new: Array, plan: WritePlan, acc: Array, probs: Received
    ) -> HeavyLayer:
        n = self.pos.shape[1]
        new_pos = jnp.where(plan.valid, plan.positions, -1)[:, None, :]  # [B, 1, S]
        new_pos = jnp.broadcast_to(new_pos, (new_pos.shape[0], n, new_pos.shape[2]))
        pos = jnp.concatenate([self.pos, new_pos], axis=-1)  # [B, N, T + S]
        score = jnp.concatenate([acc, jnp.where(new_pos >= 0, probs.new, 0.0)], axis=-1)
        last = jnp.max(pos, axis=-1, keepdims=True)
        recent = (pos > last - self.recent) & (pos >= 0)
        if self.snap_kernel:  # SnapKV: the window's pooled votes rank the older candidates
            stored = probs.vote_stored[0] if probs.vote_stored else jnp.zeros_like(acc)
            votes = jnp.concatenate([stored, probs.vote_new], axis=-1)
            votes = jnp.where(recent | (pos < 0), 0.0, votes)
            rank = pool_by_position(pos, votes, self.snap_kernel)
        else:
            rank = self._scores(score, pos)
        if self.policy == "ring":  # selected: 1, the window: 0 (evicted oldest first)
            score = jnp.where(recent, 0.0, 1.0)
        rank = jnp.where(recent, jnp.inf, rank)
        rank = jnp.where(pos < 0, -jnp.inf, rank)
        _, keep = lax.top_k(rank, self.slots)  # [B, N, T]
        (k_new, k_scale), (v_new, v_scale) = self._store(k_new, v_new)
        k = jnp.concatenate([self.k, k_new.transpose(0, 2, 3, 1).astype(self.k.dtype)], axis=3)
        v = jnp.concatenate([self.v, v_new.transpose(0, 2, 1, 3).astype(self.v.dtype)], axis=2)
        pos = jnp.take_along_axis(pos, keep, axis=-1)
        v = jnp.take_along_axis(v, keep[..., None], axis=2)
        scales = {}
        if k_scale is not None:
            for name, new in (("k_scale", k_scale), ("v_scale", v_scale)):
                both = jnp.concatenate([getattr(self, name), new.transpose(0, 2, 1)], axis=-1)
                kept = jnp.take_along_axis(both, keep, axis=-1)
                scales[name] = jnp.where(pos >= 0, kept, 0.0) if name == "v_scale" else kept
        return dataclasses.replace(
            self,
            **scales,
            k=jnp.take_along_axis(k, keep[:, :, None, :], axis=3),
            v=jnp.where((pos >= 0)[..., None], v, 0).astype(self.v.dtype),
            pos=pos,
            score=jnp.where(pos >= 0, jnp.take_along_axis(score, keep, axis=-1), 0.0),
        )

    def _store(self, k_new: Array, v_new: Array) -> tuple[tuple, tuple]:
        return store(k_new, self.k, self.k_scale), store(v_new, self.v, self.v_scale)

    def reset(self) -> HeavyLayer:
        scales = {} if self.v_scale is None else {"v_scale": jnp.zeros_like(self.v_scale)}
        return dataclasses.replace(
            self,
            **scales,
            v=jnp.zeros_like(self.v),
            pos=jnp.full_like(self.pos, -1),
            score=jnp.zeros_like(self.score),
        )

    def truncate(self, keep: Array, table: Array | None = None) -> HeavyLayer:
        """Forget positions >= keep[b] (what was evicted stays evicted)."""
        freed = self.pos >= keep[:, None, None]
        scales = {}
        if self.v_scale is not None:
            scales["v_scale"] = jnp.where(freed, 0.0, self.v_scale)
        return dataclasses.replace(
            self,
            **scales,
            v=jnp.where(freed[..., None], 0, self.v).astype(self.v.dtype),
            pos=jnp.where(freed, -1, self.pos),
            score=jnp.where(freed, 0.0, self.score),
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": tuple(self.k.shape), "v": tuple(self.v.shape), "pos": tuple(self.pos.shape)}
